"""Per-process wiring: the store, the model registry and the ingestor, built once.

Celery forks its pool processes; each builds its own Redis connection lazily on first use,
never sharing a socket with the parent.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import redis
from redis.retry import Retry

from monitor.config import Settings
from monitor.pipeline.ingest import Ingestor
from monitor.pipeline.registry import ModelRegistry
from monitor.store.base import BucketPolicy, Store
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

T = TypeVar("T")


def bucket_policy(settings: Settings) -> BucketPolicy:
    longest = max(settings.windows.values(), default=settings.coarse_bucket_seconds)
    return BucketPolicy(
        fine_seconds=settings.bucket_seconds,
        coarse_seconds=settings.coarse_bucket_seconds,
        fine_retention=settings.fine_retention_seconds,
        coarse_retention=max(longest, settings.coarse_bucket_seconds),
        partial_ttl=settings.partial_ttl_seconds,
        seen_ttl=2 * settings.partial_ttl_seconds,
    )


def redis_ssl_options(settings: Settings) -> dict[str, Any]:
    """TLS options for redis-py and Celery's broker (both take the same ssl_* names)."""
    if not (settings.redis_url or "").startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = settings.redis_tls_cert_file
    if settings.redis_tls_key_file:
        options["ssl_keyfile"] = settings.redis_tls_key_file
    return options


class _Retry(Retry):
    """Retries connection trouble with backoff, but never a refused password: redis-py's
    AuthenticationError is a ConnectionError, and retrying it made a missing password take
    45 s to surface instead of failing at once."""

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def redis_client(settings: Settings) -> redis.Redis:
    """A client with retries and backoff; the password comes from settings, not the URL."""
    from redis.backoff import ExponentialBackoff

    assert settings.redis_url is not None
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    kwargs: dict[str, Any] = {
        "retry": _Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=5),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "socket_timeout": 30.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        **redis_ssl_options(settings),
    }
    if password is not None:
        kwargs["password"] = password
    return redis.Redis.from_url(settings.redis_url, **kwargs)


@dataclass
class Runtime:
    settings: Settings

    @cached_property
    def store(self) -> Store:
        policy = bucket_policy(self.settings)
        if self.settings.embedded:
            return MemoryStore(policy)
        return RedisStore(redis_client(self.settings), policy, self.settings.redis_key_prefix)

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings)

    @cached_property
    def ingestor(self) -> Ingestor:
        return Ingestor(
            self.store,
            self.registry,
            max_samples=self.settings.max_batch_samples,
            max_bytes=self.settings.max_payload_bytes,
        )


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime, from the environment's settings."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(Settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Replace the process runtime (embedded mode and tests)."""
    global _runtime
    with _lock:
        _runtime = runtime
