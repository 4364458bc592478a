"""The ingest API's wire contract: bodies, refusals, body decoding, the OpenAPI document.

The models do two jobs: they are the OpenAPI document producers in other languages read, and they
check the *structure* of a body (which keys, of which JSON types). The finer rules (dtype names,
shape arithmetic, batch-id syntax, label range, finite and float32-range values, time bounds,
NC4 counts) are deliberately left to the shared decoder (`monitor.pipeline.payload.decode_batch`,
`monitor.stats.validation`, gathered by `Ingestor.validate`), so an HTTP client and a Celery
producer are refused with the same reason slugs. Constraints that the decoder enforces appear
in the schema only as documentation (`json_schema_extra`, descriptions).

A refusal is a `Refused(reason, message)`; its HTTP status follows from the reason (`STATUS`,
400 otherwise), and every refusal leaves as the same `ErrorBody`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import msgpack
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic.config import JsonDict
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.pipeline.payload import FEATURE_DTYPES, LABEL_DTYPES, SCHEMA_VERSION, claimed_rows
from monitor.store.keys import BATCH_ID

log = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)

_BATCH_ID_DOC: JsonDict = {"pattern": BATCH_ID.pattern}


class _Common(BaseModel):
    """Fields every submission may carry; the path names the model."""

    model_config = _STRICT

    v: Literal[1] | None = Field(
        None, description=f"Payload schema version (only {SCHEMA_VERSION}); may be omitted."
    )
    model: str | None = Field(
        None,
        description="Optional; if present it must equal the model in the path (lets producers "
        "send the Celery payload map unchanged).",
    )
    batch_id: str | None = Field(
        None,
        description="Idempotency key: a batch id is counted once, so a retried request (after a "
        "timeout or a 503) is harmless. Generated when omitted.",
        json_schema_extra=_BATCH_ID_DOC,
    )
    ts: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Unix seconds the samples belong to (their time bucket); default: receipt. "
        "At most max_clock_skew_seconds ahead of the server's clock (else future_timestamp) "
        "and no older than the first bucket of the longest window (else stale_timestamp).",
    )


class ArrayPayload(BaseModel):
    """One little-endian array: base64 `data` in JSON, raw bytes in msgpack."""

    model_config = _STRICT

    dtype: str = Field(description="Element type name.")
    shape: list[int] = Field(
        description="Dimensions; their product times the item size is the length of `data`."
    )
    data: str | bytes = Field(
        description="Row-major little-endian bytes: a base64 string in JSON, bin in msgpack."
    )


class FeatureArray(ArrayPayload):
    dtype: str = Field(
        description="Element type of the (N, d) features.",
        json_schema_extra={"enum": list[JsonValue](sorted(FEATURE_DTYPES))},
    )


class LabelArray(ArrayPayload):
    dtype: str = Field(
        description="Element type of the (N,) next-token labels in [0, vocab_size).",
        json_schema_extra={"enum": list[JsonValue](sorted(LABEL_DTYPES))},
    )


class Nc4Counts(BaseModel):
    """NC4 agreement counted by the producer (nearest class mean vs. the LM head's argmax)."""

    model_config = _STRICT

    hits: int = Field(ge=0, description="Rows where the two decisions agreed (<= total).")
    total: int = Field(
        ge=0, description="Rows compared: at most the batch's rows N (else malformed_payload)."
    )


class FeatureSamples(_Common):
    """Hidden states with their next-token labels; validated now, summarised by a worker."""

    features: FeatureArray
    labels: LabelArray
    nc4: Nc4Counts | None = None


class TextSamples(_Common):
    """Texts for the `embed` workers to run through the model's checkpoint (teacher-forced)."""

    texts: list[str] = Field(description="Non-empty list of texts.")


class TokenSamples(_Common):
    """Token-id sequences for the `embed` workers (no tokenizer round trip)."""

    token_ids: list[list[int]] = Field(description="Non-empty list of token-id sequences.")


SAMPLE_KINDS: dict[str, type[_Common]] = {
    "features": FeatureSamples,
    "texts": TextSamples,
    "token_ids": TokenSamples,
}


class Accepted(BaseModel):
    """A submission was validated and handed on (embedded mode: already ingested)."""

    batch_id: str = Field(description="The id the batch is stored under (idempotency key).")
    samples: int = Field(description="Feature rows, or texts / token sequences submitted.")
    queued: Literal[True] = True


class ErrorDetail(BaseModel):
    reason: str = Field(
        description="Stable slug; rejected samples are counted by it "
        "(collapse_samples_rejected_total{reason})."
    )
    message: str = Field(description="What was wrong, for a human.")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool


JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
STATUS = {
    "unauthorized": 401,
    "unknown_model": 404,
    "oversized_payload": 413,
    "oversized_batch": 413,
    "unsupported_media_type": 415,
    "broker_unavailable": 503,
    "store_unavailable": 503,
}


class Refused(Exception):
    """A request refused with `reason`; `counted` when the pipeline already counted it."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        samples: int = 1,
        counted: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason, self.message, self.samples = reason, message, samples
        self.counted, self.headers = counted, headers or {}

    @property
    def status(self) -> int:
        return STATUS.get(self.reason, 400)


def error_response(
    status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody.model_validate({"error": {"reason": reason, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def parse_body(kind: str, body: bytes) -> dict[str, Any]:
    """JSON or msgpack to a map; never a 5xx for any byte string."""
    try:
        if kind == "json":
            document = json.loads(body)
        else:
            document = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # ValueError, RecursionError, msgpack's own: all the client's fault
        raise Refused(f"malformed_{kind}", f"the body is not valid {kind}") from exc
    if not isinstance(document, dict):
        raise Refused("malformed_payload", "the body must be a map (JSON object)")
    return document


def describe_errors(exc: ValidationError) -> str:
    """Where and what, without echoing the (possibly huge) offending input."""
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    ]
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


def claimed_samples(document: dict[str, Any]) -> int:
    """Samples a refused body carried (for the counter): the workers' own count
    (`claimed_rows`), so a declared shape of 2**63 counts the rows its bytes hold, not 9e18."""
    return claimed_rows(document)


def media_kind(content_type: str | None) -> str:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json"):
        return "json"
    if media in MSGPACK_TYPES:
        return "msgpack"
    raise Refused(
        "unsupported_media_type",
        f"Content-Type must be application/json or application/msgpack, not {media or 'none'!r}",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused("malformed_request", "invalid Content-Length header")
        if int(declared) > limit:
            raise Refused("oversized_payload", f"the body exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused("oversized_payload", f"the body exceeds the limit of {limit} bytes")
    return bytes(body)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed body or invalid samples (reason says which rule).",
        401: "Missing or wrong bearer token.",
        404: "The model is not declared.",
        413: "Body or batch larger than the configured limits.",
        415: "Content-Type is neither JSON nor msgpack.",
        503: "The queue is unreachable; retry with the same batch_id.",
    }.items()
}


BODY_MODELS: tuple[type[BaseModel], ...] = (FeatureSamples, TextSamples, TokenSamples)


def install_error_handlers(api: FastAPI) -> None:
    """Every error, the framework's included, gets the one JSON error body (never a 422)."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        reasons = {404: "not_found", 405: "method_not_allowed"}
        reason = reasons.get(exc.status_code, "http_error")
        return error_response(exc.status_code, reason, str(exc.detail), exc.headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, "malformed_request", "the request does not fit the API")

    async def internal_error(_: Request, exc: Exception) -> Response:
        log.error("internal error answering a request: %s", type(exc).__name__)
        return error_response(500, "internal_error", "internal error; see the server log")

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)


def openapi_document(api: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the hand-read body schemas, minus the 422 we never answer."""
    if api.openapi_schema is not None:
        return api.openapi_schema
    document = get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )
    _, defs = models_json_schema(
        [(model, "validation") for model in BODY_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    api.openapi_schema = document
    return document
