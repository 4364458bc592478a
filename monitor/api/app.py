"""The HTTP ingest API: `create_api(settings)` builds the FastAPI app of `collapse-monitor api`.

Why the request path looks the way it does:
- Auth comes first (constant-time bearer comparison), so a stranger learns nothing, not even
  which models exist, and never makes the server read a large body.
- The body is read by hand with a byte cap (Content-Length checked, then the stream counted),
  because a framework body parameter would buffer any size before a limit could apply, and
  because msgpack bodies are accepted next to JSON.
- Feature batches are decoded and checked *synchronously* with the same decoder the workers use,
  so bad input gets its 4xx now (with the worker's reason slug) instead of vanishing in a queue.
- Everything that touches Redis (enqueue, counters, readiness ping) runs in a small thread pool
  with a deadline: an unreachable store answers 503 JSON in seconds, never hangs a request.
- Every refusal is counted by reason (`count_rejection`), the same counter the workers feed.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis
from celery import Celery
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from monitor import __version__
from monitor.api.schemas import (
    BODY_MODELS,
    ERROR_RESPONSES,
    SAMPLE_KINDS,
    Accepted,
    ErrorBody,
    FeatureSamples,
    Health,
    Ready,
    Refused,
    TextSamples,
    TokenSamples,
    claimed_samples,
    describe_errors,
    error_response,
    install_error_handlers,
    media_kind,
    openapi_document,
    parse_body,
    read_body,
)
from monitor.config import Settings
from monitor.errors import CollapseMonitorError, InvalidInput
from monitor.pipeline.celery_app import TASK_EMBED, TASK_INGEST, create_app
from monitor.pipeline.embed import embed_payload, parse_text_payload
from monitor.pipeline.ingest import count_rejection
from monitor.pipeline.payload import SCHEMA_VERSION, decode_batch, encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.stats.validation import check_batch

log = logging.getLogger(__name__)
T = TypeVar("T")

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OperationalError, OSError)
REALM = 'Bearer realm="collapse-monitor"'


class ApiConfigError(CollapseMonitorError):
    """The API cannot start safely with these settings (e.g. no token outside embedded mode)."""


class Ingress:
    """Everything the samples endpoint does besides HTTP plumbing, synchronous and testable."""

    def __init__(self, settings: Settings, runtime: Runtime, io_timeout: float) -> None:
        self.settings, self.runtime, self.io_timeout = settings, runtime, io_timeout
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self._token = token.encode() if token is not None else None
        self._secrets = [s for s in (token, _password(settings)) if s]
        self.celery = None if settings.embedded else _fail_fast(create_app(settings), io_timeout)
        # Separate pools: a flood of refusals (counted) or probes can never starve enqueueing.
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="collapse-api-io")
        self.count_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="collapse-api-count")
        self._was_ready: bool | None = None
        self._ping: Future[bool] | None = None
        self._ping_lock = threading.Lock()
        self._warned: dict[str, float] = {}

    # ------------------------------------------------------------------ gates
    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Bearer token check; `hmac.compare_digest` so timing reveals nothing of the token."""
        if self._token is None:
            return
        if credentials is None:
            raise Refused(
                "unauthorized",
                "missing 'Authorization: Bearer <token>' header",
                headers={"WWW-Authenticate": REALM},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), self._token):
            raise Refused(
                "unauthorized",
                "invalid bearer token",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )

    def check_model(self, model: str) -> None:
        if model not in self.runtime.registry.names:
            raise Refused("unknown_model", f"model {model!r} is not declared (COLLAPSE_MODELS)")

    # ---------------------------------------------------------------- submit
    def submit(self, model: str, kind: str, body: bytes) -> Accepted:
        """Parse, validate and hand on one submission; raises `Refused` for anything bad."""
        document = parse_body(kind, body)
        keys = [key for key in SAMPLE_KINDS if key in document]
        if len(keys) != 1:
            raise Refused(
                "malformed_payload",
                "give exactly one of 'features', 'texts', 'token_ids'",
                samples=claimed_samples(document),
            )
        try:
            request = SAMPLE_KINDS[keys[0]].model_validate(document)
        except ValidationError as exc:
            raise Refused(
                "malformed_payload", describe_errors(exc), samples=claimed_samples(document)
            ) from exc
        if request.model is not None and request.model != model:
            raise Refused("model_mismatch", "the body's 'model' differs from the path's")
        batch_id = request.batch_id if request.batch_id is not None else uuid.uuid4().hex
        ts = request.ts if request.ts is not None else time.time()
        if isinstance(request, FeatureSamples):
            return self._features(model, request, batch_id, ts)
        assert isinstance(request, TextSamples | TokenSamples)
        return self._texts(model, request, batch_id, ts)

    def _features(self, model: str, request: FeatureSamples, batch_id: str, ts: float) -> Accepted:
        payload: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "model": model,
            "batch_id": batch_id,
            "ts": ts,
            "features": request.features.model_dump(),
            "labels": request.labels.model_dump(),
        }
        if request.nc4 is not None:
            payload["nc4"] = request.nc4.model_dump()
        settings = self.settings
        claimed = min(claimed_samples(payload), settings.max_batch_samples)
        for what in ("features", "labels"):
            dims = payload[what]["shape"]
            # Shapes whose element count overflows int64 would crash numpy, not refuse cleanly.
            if min(dims, default=0) >= 0 and math.prod(dims) > settings.max_payload_bytes:
                message = f"{what} shape {dims} exceeds any allowed body"
                raise Refused("length_mismatch", message, samples=claimed)
        try:
            batch = decode_batch(
                payload,
                max_samples=settings.max_batch_samples,
                max_bytes=settings.max_payload_bytes,
            )
            shape = self.runtime.registry.shape(model)
            check_batch(batch.features, batch.labels, dim=shape.dim, num_classes=shape.vocab_size)
        except InvalidInput as exc:
            raise Refused(exc.reason, str(exc), samples=claimed) from exc
        nc4 = (batch.nc4_hits, batch.nc4_total) if batch.nc4_total else None
        wire = encode_batch(
            model, batch.features, batch.labels, batch_id=batch_id, ts=batch.ts, nc4=nc4
        )
        if self.celery is None:  # embedded: the worker's own code path, in this process
            self._inline(lambda: self.runtime.ingestor.ingest(wire))
        else:
            self._enqueue(TASK_INGEST, wire)
        return Accepted(batch_id=batch_id, samples=len(batch))

    def _texts(
        self, model: str, request: TextSamples | TokenSamples, batch_id: str, ts: float
    ) -> Accepted:
        key = "texts" if isinstance(request, TextSamples) else "token_ids"
        items: list[Any] = request.texts if isinstance(request, TextSamples) else request.token_ids
        payload = {"v": SCHEMA_VERSION, "model": model, "batch_id": batch_id, "ts": ts, key: items}
        settings = self.settings
        try:
            parse_text_payload(payload, settings.max_batch_samples, settings.max_payload_bytes)
        except InvalidInput as exc:
            raise Refused(exc.reason, str(exc), samples=max(len(items), 1)) from exc
        if self.runtime.registry.spec(model).checkpoint is None:
            raise Refused(
                "no_checkpoint",
                f"model {model!r} is features-only (no checkpoint): send features instead",
                samples=len(items),
            )
        if isinstance(request, TokenSamples):
            self._check_token_range(model, request.token_ids)
        if self.celery is None:
            runtime = self.runtime
            self._inline(lambda: embed_payload(runtime, payload))
        else:
            self._enqueue(TASK_EMBED, payload)
        return Accepted(batch_id=batch_id, samples=len(items))

    def _check_token_range(self, model: str, sequences: list[list[int]]) -> None:
        try:
            vocab = self.runtime.registry.shape(model).vocab_size
        except Exception:  # config unreadable here: the worker checks it when it loads the model
            log.debug("vocabulary of %r unknown to the API; token range left to the worker", model)
            return
        for seq in sequences:
            if any(t < 0 or t >= vocab for t in seq):
                raise Refused(
                    "token_out_of_range",
                    f"token ids must lie in [0, {vocab})",
                    samples=len(sequences),
                )

    # ------------------------------------------------------------- Redis work
    def bounded(
        self, fn: Callable[[], T], timeout: float | None = None, pool: Executor | None = None
    ) -> T:
        """Run `fn` in the I/O pool with a deadline; a missed deadline raises `FutureTimeout`."""
        future = (pool or self.pool).submit(fn)
        try:
            return future.result(timeout=self.io_timeout if timeout is None else timeout)
        except FutureTimeout:
            future.cancel()  # not started yet: never runs; running: finishes in the background
            raise

    def _inline(self, fn: Callable[[], object]) -> None:
        """Embedded mode: run the pipeline step here; it counts its own rejections."""
        try:
            fn()
        except InvalidInput as exc:
            raise Refused(exc.reason, str(exc), counted=True) from exc

    def _enqueue(self, task: str, payload: dict[str, Any]) -> None:
        celery = self.celery
        assert celery is not None
        try:
            self.bounded(lambda: celery.send_task(task, args=[payload], retry=False))
        except (FutureTimeout, *UNREACHABLE) as exc:
            self.warn("broker", "broker unreachable, batches refused with 503: %s", exc)
            raise Refused(
                "broker_unavailable",
                "the queue is unreachable; retry later with the same batch_id",
                headers={"Retry-After": "5"},
            ) from exc

    def count(self, model: str | None, reason: str, samples: int) -> None:
        """Count a refusal if the store answers quickly; never let counting fail a response."""
        store = self.runtime.store
        try:
            count = lambda: count_rejection(store, model, reason, samples)  # noqa: E731
            self.bounded(count, timeout=1.0, pool=self.count_pool)
        except Exception as exc:
            self.warn("count", "refusals not counted, store unreachable: %s", exc)

    def warn(self, topic: str, message: str, exc: BaseException) -> None:
        """At most one warning per topic every 10 s: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._warned.get(topic, -math.inf) >= 10.0:
            self._warned[topic] = now
            log.warning(message, self.redact(exc))

    def ready(self) -> bool:
        """Store ping within the deadline; logs only when readiness changes (probes are many)."""
        store = self.runtime.store
        with self._ping_lock:  # single flight: probes share one ping, never pile up threads
            if self._ping is None or self._ping.done():
                self._ping = self.pool.submit(store.ping)
            ping = self._ping
        problem = "ping answered false"
        try:
            ok = bool(ping.result(timeout=self.io_timeout))
        except Exception as exc:
            ok, problem = False, self.redact(exc)
        if ok != self._was_ready:
            if ok:
                log.info("store reachable: ready")
            else:
                log.warning("store unreachable, not ready (retried on each /readyz): %s", problem)
            self._was_ready = ok
        return ok

    def redact(self, exc: BaseException) -> str:
        """`Type: message` with any configured secret blanked, safe for logs."""
        if isinstance(exc, FutureTimeout):
            return "no answer before the deadline"
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _fail_fast(celery: Celery, timeout: float) -> Celery:
    """A request must not wait out kombu's reconnect loop (~6 s by default): one quick retry,
    then 503; the client retries with the same batch id, which is harmless."""
    celery.conf.broker_connection_timeout = timeout
    celery.conf.broker_transport_options = {
        **(celery.conf.broker_transport_options or {}),
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }
    return celery


def _password(settings: Settings) -> str | None:
    return settings.redis_password.get_secret_value() if settings.redis_password else None


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
    if settings.api_token is not None and len(settings.api_token.get_secret_value()) < 16:
        log.warning("COLLAPSE_API_TOKEN is shorter than 16 characters; use a long random token")
    ingress = Ingress(settings, runtime if runtime is not None else Runtime(settings), io_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ingress.pool.submit(ingress.ready)  # logs a clear line at start if the store is down
        yield
        ingress.pool.shutdown(wait=False, cancel_futures=True)
        ingress.count_pool.shutdown(wait=False, cancel_futures=True)

    api = FastAPI(
        title="collapse-monitor ingest API",
        version=__version__,
        description="Submit hidden-state features (or texts / token ids) of a watched model.",
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
        responses=ERROR_RESPONSES,
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
        try:
            ingress.authorize(credentials)
            ingress.check_model(model)
            kind = media_kind(request.headers.get("content-type"))
            body = await read_body(request, settings.max_payload_bytes)
            accepted = await run_in_threadpool(ingress.submit, model, kind, body)
        except Refused as exc:
            owner = model if model in ingress.runtime.registry.names else None
            log.info("refused samples for %r: %s", model if owner else None, exc.reason)
            if not exc.counted:
                await run_in_threadpool(ingress.count, owner, exc.reason, exc.samples)
            return error_response(exc.status, exc.reason, exc.message, exc.headers)
        return JSONResponse(accepted.model_dump(), status_code=202)

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
