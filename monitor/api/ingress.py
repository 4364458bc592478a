"""`Ingress`: what the samples endpoint does besides HTTP plumbing, synchronous and testable.

A submission goes in two steps, so that the batch id exists before anything leaves the process:
`prepare` parses and validates the body and fixes the batch id (the client's, or a new one);
`send` hands the prepared batch to the queue (or, in embedded mode, ingests it here). When the
broker is slow, `send` answers after its deadline while the message may still reach the queue;
the endpoint then returns the batch id with its 503, and the client's retry with that id is
deduplicated by the store's `seen` marker: the batch is ingested exactly once.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from fastapi.security import HTTPAuthorizationCredentials
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from monitor.api.limits import BodyBudget, Limited, RateLimiter, RefusalTally, rate_limited
from monitor.api.schemas import (
    SAMPLE_KINDS,
    FeatureSamples,
    Refused,
    TextSamples,
    TokenSamples,
    claimed_samples,
    describe_errors,
    parse_body,
)
from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.pipeline.embed import embed_payload, parse_text_payload
from monitor.pipeline.payload import SCHEMA_VERSION, encode_batch
from monitor.pipeline.queues import TASK_EMBED, TASK_INGEST
from monitor.pipeline.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OperationalError, OSError)
REALM = 'Bearer realm="collapse-monitor"'
BROKER_SOCKET_TIMEOUT = 10.0  # a send stuck on a silent broker frees its thread after this

if TYPE_CHECKING:
    from celery import Celery


@dataclass(frozen=True)
class Prepared:
    """A validated submission with its batch id, ready for its queue."""

    batch_id: str
    samples: int
    task: str
    payload: dict[str, Any]


class Ingress:
    """Gates (token, model, rate), validation, sending and counting of submissions."""

    def __init__(self, settings: Settings, runtime: Runtime, io_timeout: float) -> None:
        self.settings, self.runtime, self.io_timeout = settings, runtime, io_timeout
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self._token = token.encode() if token is not None else None
        self._secrets = [s for s in (token, _password(settings)) if s]
        self.celery = None
        if not settings.embedded:  # Celery only where messages are sent
            from monitor.worker.app import create_app

            self.celery = _fail_fast(create_app(settings), io_timeout)
        # Separate pools: a flood of refusals (counted) or probes can never starve enqueueing.
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="collapse-api-io")
        self.count_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="collapse-api-count")
        self.budget = BodyBudget(settings.api_max_inflight_bytes)
        self.limiter = RateLimiter(settings.api_client_rate, settings.api_client_burst)
        self.tally = RefusalTally(
            runtime.store,
            self.count_pool,
            lambda exc: self.warn("count", "refusals not counted, store unreachable: %s", exc),
        )
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

    def admit(self, client: str) -> None:
        """The client's token bucket; refused with the seconds until it may send again."""
        wait = self.limiter.admit(client)
        if wait > 0:
            raise rate_limited(wait)

    # ---------------------------------------------------------------- prepare
    def prepare(self, model: str, kind: str, body: bytes) -> Prepared:
        """Parse and validate; fix the batch id. Raises `Refused` for anything bad."""
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

    def _features(self, model: str, request: FeatureSamples, batch_id: str, ts: float) -> Prepared:
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
        try:  # the worker's own validation: the same reasons, time bounds included, at the door
            batch = self.runtime.ingestor.validate(payload)
        except InvalidInput as exc:
            raise Refused(exc.reason, str(exc), samples=claimed) from exc
        nc4 = (batch.nc4_hits, batch.nc4_total) if batch.nc4_total else None
        wire = encode_batch(
            model, batch.features, batch.labels, batch_id=batch_id, ts=batch.ts, nc4=nc4
        )
        return Prepared(batch_id, len(batch), TASK_INGEST, wire)

    def _texts(
        self, model: str, request: TextSamples | TokenSamples, batch_id: str, ts: float
    ) -> Prepared:
        key = "texts" if isinstance(request, TextSamples) else "token_ids"
        items: list[Any] = request.texts if isinstance(request, TextSamples) else request.token_ids
        self._check_text_work(items, texts=isinstance(request, TextSamples))
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
        return Prepared(batch_id, len(items), TASK_EMBED, payload)

    def _check_text_work(self, items: list[Any], *, texts: bool) -> None:
        """Per-request bound on embed work: item count, then tokens (UTF-8 bytes of texts,
        an upper bound on their tokens for byte-level tokenizers). Texts must be encodable:
        JSON admits lone surrogates ("\\ud800"), which no tokenizer or queue can carry."""
        settings = self.settings
        samples = min(max(len(items), 1), settings.max_batch_samples)
        if len(items) > settings.api_max_texts:
            message = f"{len(items)} items exceed the limit of {settings.api_max_texts} a request"
            raise Limited("too_many_texts", message, samples=samples)
        if texts:
            try:
                size = sum(len(text.encode("utf-8")) for text in items)
            except UnicodeEncodeError as exc:
                message = "texts must be valid Unicode (a lone surrogate is not)"
                raise Refused("invalid_text", message, samples=samples) from exc
        else:
            size = sum(len(seq) for seq in items)
        if size > settings.api_max_text_tokens:
            unit = "UTF-8 bytes" if texts else "token ids"
            message = f"{size} {unit} exceed the limit of {settings.api_max_text_tokens} a request"
            raise Limited("too_many_tokens", message, samples=samples)

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

    # ------------------------------------------------------------------- send
    def send(self, prepared: Prepared) -> None:
        """Queue the batch (embedded: ingest it here). A 503 may follow a send that lands."""
        if self.celery is None:
            runtime, payload = self.runtime, prepared.payload
            if prepared.task == TASK_INGEST:
                self._inline(lambda: runtime.ingestor.ingest(payload))
            else:
                self._inline(lambda: embed_payload(runtime, payload))
            return
        celery = self.celery
        try:
            self.bounded(
                lambda: celery.send_task(prepared.task, args=[prepared.payload], retry=False)
            )
        except (FutureTimeout, *UNREACHABLE) as exc:
            self.warn("broker", "broker unreachable, batches refused with 503: %s", exc)
            raise Refused(
                "broker_unavailable",
                f"the queue did not confirm batch {prepared.batch_id} in time; it may still "
                "arrive: retry with the same batch_id (counted once)",
                headers={"Retry-After": "5"},
            ) from exc

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

    # ----------------------------------------------------------------- health
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

    def close(self) -> None:
        self.tally.flush(timeout=1.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.count_pool.shutdown(wait=False, cancel_futures=True)


def _fail_fast(celery: Celery, timeout: float) -> Celery:
    """A request must not wait out kombu's reconnect loop (~6 s by default): one quick retry,
    then 503 with the batch id, so the client's retry is harmless. A socket timeout frees a
    thread stuck on a broker that accepted the connection and went silent."""
    celery.conf.broker_connection_timeout = timeout
    celery.conf.broker_transport_options = {
        **(celery.conf.broker_transport_options or {}),
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
        "socket_timeout": BROKER_SOCKET_TIMEOUT,
    }
    return celery


def _password(settings: Settings) -> str | None:
    return settings.redis_password.get_secret_value() if settings.redis_password else None
