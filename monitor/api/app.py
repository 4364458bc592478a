"""The HTTP ingest API: `create_api(settings)` builds the FastAPI app of `collapse-monitor api`.

Why the request path looks the way it does:
- Auth comes first (constant-time bearer comparison), so a stranger learns nothing, not even
  which models exist, and never makes the server read a large body. Refusals before auth are
  counted under `_unknown`: a client without the token cannot move any model's series.
- Then the client's token bucket (429), then the body, read by hand with a byte cap, a deadline
  (408) and a share of the bytes-in-flight budget (503 with Retry-After); a framework body
  parameter would buffer any size, at any speed, before a limit could apply.
- Feature batches are decoded and checked *synchronously* with the same decoder the workers use,
  so bad input gets its 4xx now (with the worker's reason slug) instead of vanishing in a queue.
- The batch id is fixed before the send (the client's, or a new one) and returned with the 202
  and with a 503 from the queue (body `batch_id` and header `X-Batch-Id`): a send that missed
  its deadline may still land, and the retry with that id is then counted once.
- Everything that touches Redis runs in small thread pools with deadlines: an unreachable store
  or broker answers 503 JSON in seconds, never hangs a request.
- Every refusal is counted by reason (`collapse_samples_rejected_total{reason}`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from monitor import __version__
from monitor.api.ingress import Ingress
from monitor.api.limits import Hold, read_bounded
from monitor.api.schemas import (
    BODY_MODELS,
    ERROR_RESPONSES,
    Accepted,
    ErrorBody,
    ErrorDetail,
    Health,
    Ready,
    Refused,
    error_response,
    install_error_handlers,
    media_kind,
    openapi_document,
)
from monitor.config import Settings
from monitor.errors import CollapseMonitorError
from monitor.pipeline.runtime import Runtime

log = logging.getLogger(__name__)

BATCH_HEADER = "X-Batch-Id"
COUNT_WAIT = 1.0  # seconds a refusal waits for its counter write (never longer)


class ApiConfigError(CollapseMonitorError):
    """The API cannot start safely with these settings (e.g. no token outside embedded mode)."""


class RetryLater(ErrorBody):
    """A 503: nothing is wrong with the request; send it again after `Retry-After` seconds."""

    batch_id: str | None = Field(
        None,
        description="Present when the batch may have reached the queue (its send missed the "
        "deadline): retry with this batch_id and it is counted once. Absent: nothing was sent.",
    )


_HEADERS = {
    BATCH_HEADER: {
        "description": "The batch id (the client's, or the one the API generated).",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    202: {"description": "Accepted; the batch id is also in X-Batch-Id.",
          "headers": {BATCH_HEADER: _HEADERS[BATCH_HEADER]}},
    408: {"model": ErrorBody, "description": "The body did not arrive within api_body_timeout."},
    413: {"model": ErrorBody, "description": "Body, batch, texts or tokens over the limits."},
    429: {"model": ErrorBody, "description": "This client's rate bound (api_client_rate).",
          "headers": {"Retry-After": _HEADERS["Retry-After"]}},
    503: {"model": RetryLater, "headers": _HEADERS,
          "description": "Retry later: too many bytes in flight, or the queue did not confirm "
          "in time. With a batch_id, retry with that id (the batch may have been queued; the "
          "retry is counted once); without one, nothing was sent."},
}  # fmt: skip


def _refusal(exc: Refused, batch_id: str | None) -> Response:
    """The error body; once the batch id is fixed, its header, and with a 503 also `batch_id`
    in the body (the one answer after which the batch may still arrive)."""
    headers = {**exc.headers, BATCH_HEADER: batch_id} if batch_id else exc.headers
    if batch_id is None or exc.status != 503:
        return error_response(exc.status, exc.reason, exc.message, headers)
    body = RetryLater(error=ErrorDetail(reason=exc.reason, message=exc.message), batch_id=batch_id)
    return JSONResponse(body.model_dump(), status_code=exc.status, headers=headers)


def create_api(
    settings: Settings, runtime: Runtime | None = None, *, io_timeout: float = 3.0
) -> FastAPI:
    """The ingest API. Refuses to build an open API outside embedded mode."""
    if settings.api_token is not None and not settings.api_token.get_secret_value().strip():
        raise ApiConfigError("COLLAPSE_API_TOKEN is empty; set a long random token")
    if settings.api_token is None and not settings.embedded:
        raise ApiConfigError(
            "COLLAPSE_API_TOKEN is required when COLLAPSE_REDIS_URL is set "
            "(only embedded mode may run the API without a token)"
        )
    if settings.api_max_inflight_bytes < settings.max_payload_bytes:
        raise ApiConfigError(
            "COLLAPSE_API_MAX_INFLIGHT_BYTES must be at least COLLAPSE_MAX_PAYLOAD_BYTES "
            "(else a body of the allowed size could never be read)"
        )
    if settings.embedded and importlib.util.find_spec("torch") is None:
        raise ApiConfigError(
            "embedded mode (no COLLAPSE_REDIS_URL) computes statistics in this process and needs "
            "torch: pip install 'collapse-monitor[worker]', or set COLLAPSE_REDIS_URL"
        )
    if settings.api_token is not None and len(settings.api_token.get_secret_value()) < 16:
        log.warning("COLLAPSE_API_TOKEN is shorter than 16 characters; use a long random token")
    ingress = Ingress(settings, runtime if runtime is not None else Runtime(settings), io_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ingress.pool.submit(ingress.ready)  # logs a clear line at start if the store is down
        yield
        ingress.close()

    api = FastAPI(
        title="collapse-monitor ingest API",
        version=__version__,
        description="Submit hidden-state features (or texts / token ids) of a watched model. "
        "Every 202 and every 503 from the queue carries the batch id (body and X-Batch-Id): "
        "retry with it and the batch is ingested exactly once.",
        docs_url=None,  # the Swagger/ReDoc pages load scripts from a CDN; openapi.json suffices
        redoc_url=None,
        lifespan=lifespan,
    )
    api.state.ingress = ingress
    bearer = HTTPBearer(auto_error=False, description="The value of COLLAPSE_API_TOKEN.")
    body_schema = {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in BODY_MODELS]}

    @api.post(
        "/v1/models/{model}/samples",
        status_code=202,
        response_model=Accepted,
        responses=RESPONSES,
        summary="Submit samples of a model",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": body_schema},
                    "application/msgpack": {"schema": body_schema},
                },
            }
        },
    )
    async def submit_samples(
        model: str,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> Response:
        """Exactly one of `features` (+ `labels`), `texts` or `token_ids`; JSON or msgpack."""
        owner: str | None = None  # counted under a model only once the token is checked
        batch_id: str | None = None  # set just before the send: a 503 after it carries it
        hold = Hold(ingress.budget)
        try:
            ingress.authorize(credentials)
            ingress.check_model(model)
            owner = model
            ingress.admit(request.client.host if request.client else "unknown")
            kind = media_kind(request.headers.get("content-type"))
            body = await read_bounded(
                request, settings.max_payload_bytes, hold, settings.api_body_timeout
            )
            prepared = await run_in_threadpool(ingress.prepare, model, kind, body)
            del body  # the budget still counts it until the answer; the memory can go now
            batch_id = prepared.batch_id
            await run_in_threadpool(ingress.send, prepared)
        except Refused as exc:
            log.info("refused samples for %r: %s", owner, exc.reason)
            if not exc.counted:
                await ingress.tally.count(owner, exc.reason, exc.samples, COUNT_WAIT)
            return _refusal(exc, batch_id)
        except ClientDisconnect:  # nobody to answer; counted so an operator sees aborted uploads
            log.info("client of %r disconnected during the body", owner)
            await ingress.tally.count(owner, "client_disconnect", 1, COUNT_WAIT)
            return Response(status_code=400)
        finally:
            hold.release()
        accepted = Accepted(batch_id=prepared.batch_id, samples=prepared.samples)
        return JSONResponse(
            accepted.model_dump(), status_code=202, headers={BATCH_HEADER: prepared.batch_id}
        )

    @api.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @api.get(
        "/readyz",
        response_model=Ready,
        responses={503: {"model": ErrorBody, "description": "The store is unreachable."}},
        summary="Readiness: the store answers a ping",
    )
    async def readyz() -> Response:
        if await run_in_threadpool(ingress.ready):
            return JSONResponse(Ready(ready=True).model_dump())
        return error_response(503, "store_unavailable", "the store does not answer a ping")

    install_error_handlers(api)
    api.openapi = lambda: openapi_document(api)  # type: ignore[method-assign]
    return api
