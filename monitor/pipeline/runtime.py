"""Per-process wiring: the store, the model registry and the ingestor, built once; and the
Redis clients of the store and of the broker, for each topology (standalone, cluster, sentinel).

Celery forks its pool processes; each builds its own Redis connection lazily on first use,
never sharing a socket with the parent.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

import redis
from pydantic import SecretStr
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from monitor.config import NO_CLUSTER_BROKER, Settings, sentinel_address
from monitor.lazy import ProcessLocal
from monitor.store.base import BucketPolicy, Store
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

if TYPE_CHECKING:  # loaded on first use: the exporter needs the clients, not the ingestor
    from monitor.pipeline.ingest import Ingestor
    from monitor.pipeline.registry import ModelRegistry

T = TypeVar("T")
# The store's client: the store uses only what both serve on keys of one model's slot.
StoreClient: TypeAlias = redis.Redis | RedisCluster


def bucket_policy(settings: Settings) -> BucketPolicy:
    longest = max(settings.windows.values(), default=settings.coarse_bucket_seconds)
    return BucketPolicy(
        fine_seconds=settings.bucket_seconds,
        coarse_seconds=settings.coarse_bucket_seconds,
        fine_retention=settings.fine_retention_seconds,
        coarse_retention=max(longest, settings.coarse_bucket_seconds),
        partial_ttl=settings.partial_ttl_seconds,
        seen_ttl=2 * settings.partial_ttl_seconds,
        windows=tuple(sorted(settings.windows.items(), key=lambda kv: (kv[1], kv[0]))),
        window_mode=settings.window_mode,
        decay_min_weight=settings.decay_min_weight,
        tracked_half_life=settings.tracked_half_life_seconds,
    )


def _tls_options(url: str | None, settings: Settings) -> dict[str, Any]:
    """ssl_* options (redis-py and Celery's broker take the same names) for a rediss:// URL."""
    if not (url or "").startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = settings.redis_tls_cert_file
    if settings.redis_tls_key_file:
        options["ssl_keyfile"] = settings.redis_tls_key_file
    return options


def redis_ssl_options(settings: Settings) -> dict[str, Any]:
    """TLS options of the store (and, with no broker_url, the broker): rediss:// redis_url."""
    return _tls_options(settings.redis_url, settings)


def broker_ssl_options(settings: Settings) -> dict[str, Any]:
    """TLS options of the broker: a rediss:// broker_url, or the store's without broker_url.

    A sentinel:// broker_url has no TLS variant in Celery's transport: none.
    """
    return _tls_options(settings.broker_url or settings.redis_url, settings)


class _Retry(Retry):
    """Retries connection trouble with backoff, but never a refused password: redis-py's
    AuthenticationError is a ConnectionError, and retrying it made a missing password take
    45 s to surface instead of failing at once. Sentinels that all refuse the password come
    back as a MasterNotFoundError naming their AuthenticationErrors: not retried either."""

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
            if isinstance(error, MasterNotFoundError) and "Authentication" in str(error):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def _connection_options(io_timeout: float | None) -> dict[str, Any]:
    """Service clients retry with backoff; an `io_timeout` client (a scrape, a probe) answers
    within that many seconds or fails: no retries, no health-check pings."""
    if io_timeout is not None:
        return {
            "socket_timeout": io_timeout,
            "socket_connect_timeout": io_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
    return {
        "retry": _Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=5),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "socket_timeout": 30.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
    }


def _secret(value: SecretStr | None) -> dict[str, str]:
    return {} if value is None else {"password": value.get_secret_value()}


def sentinel_master(
    addresses: Sequence[str],
    master: str,
    url: str,
    settings: Settings,
    *,
    password: SecretStr | None,
    io_timeout: float | None = None,
) -> redis.Redis:
    """A client of the master that `addresses` (sentinels, host:port) know as `master`.

    `url` gives the ACL username, database and scheme (rediss://: TLS to the master and the
    sentinels); its host is ignored. After a failover the next command's retry asks the
    sentinels again and reaches the new master.
    """
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    tls = options.pop("connection_class", None) is SSLConnection
    for name in ("host", "port"):
        options.pop(name, None)
    tls_options = {"ssl": True, **_tls_options("rediss://", settings)} if tls else {}
    sentinel_kwargs: dict[str, Any] = {  # one try per sentinel: the master's retry asks again
        "socket_timeout": io_timeout or 5.0,
        "socket_connect_timeout": io_timeout or 5.0,
        "retry": Retry(NoBackoff(), 0),
        **_secret(settings.redis_sentinel_password),
        **tls_options,
    }
    kwargs = {**_connection_options(io_timeout), **tls_options, **_secret(password), **options}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(a) for a in addresses], sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    client = sentinel.master_for(master, redis_class=redis.Redis)  # type: ignore[no-untyped-call]
    return cast(redis.Redis, client)


def redis_client(settings: Settings, *, io_timeout: float | None = None) -> StoreClient:
    """The store's client: plain Redis, RedisCluster or a Sentinel-managed master.

    Responses stay bytes (`decode_responses=False`); the password comes from settings, not the
    URL; TLS files apply to every node. `io_timeout`: see `_connection_options`.
    """
    url = settings.redis_url
    if url is None:
        raise ValueError("no redis_url: embedded mode has no Redis client")
    options = {**_connection_options(io_timeout), **redis_ssl_options(settings)}
    options.update(_secret(settings.redis_password))
    if settings.redis_cluster:
        # Cluster nodes take no per-connection retry (the cluster client retries, refreshing
        # its slot map) and no retry_on_error or health checks.
        for name in ("retry_on_error", "health_check_interval"):
            options.pop(name)
        return RedisCluster.from_url(url, decode_responses=False, **options)
    if settings.redis_sentinels:
        assert settings.redis_sentinel_master is not None  # Settings checks they go together
        return sentinel_master(
            settings.redis_sentinels,
            settings.redis_sentinel_master,
            url,
            settings,
            password=settings.redis_password,
            io_timeout=io_timeout,
        )
    return redis.Redis.from_url(url, decode_responses=False, **options)


def broker_client(settings: Settings, *, io_timeout: float | None = None) -> redis.Redis | None:
    """A client of the Celery broker's Redis (queue depths: LLEN <queue>); None when embedded.

    Standalone or Sentinel-managed, never a cluster (Settings refuses a cluster broker).
    """
    if settings.embedded:
        return None
    url = settings.broker_url
    if url is None:  # the store's Redis is the broker
        client = redis_client(settings, io_timeout=io_timeout)
        if not isinstance(client, redis.Redis):
            raise ValueError(NO_CLUSTER_BROKER)
        return client
    if url.startswith("sentinel://"):
        assert settings.broker_sentinel_master is not None
        parts = [urlsplit(part) for part in url.split(";") if part]
        first = parts[0]
        user = f"{first.username}@" if first.username else ""
        return sentinel_master(
            [part.netloc.rpartition("@")[2] for part in parts],
            settings.broker_sentinel_master,
            f"redis://{user}broker{first.path}",
            settings,
            password=settings.broker_password,
            io_timeout=io_timeout,
        )
    options = {**_connection_options(io_timeout), **broker_ssl_options(settings)}
    options.update(_secret(settings.broker_password))
    return redis.Redis.from_url(url, decode_responses=False, **options)


@dataclass
class Runtime:
    settings: Settings

    @cached_property
    def store(self) -> Store:
        policy = bucket_policy(self.settings)
        if self.settings.embedded:
            return MemoryStore(policy)
        client = redis_client(self.settings)
        return RedisStore(client, policy, self.settings.redis_key_prefix)

    @cached_property
    def registry(self) -> ModelRegistry:
        from monitor.pipeline.registry import ModelRegistry

        return ModelRegistry(self.settings)

    @cached_property
    def ingestor(self) -> Ingestor:
        from monitor.pipeline.ingest import Ingestor

        return Ingestor(
            self.store,
            self.registry,
            max_samples=self.settings.max_batch_samples,
            max_bytes=self.settings.max_payload_bytes,
            tracked_refresh_seconds=self.settings.tracked_refresh_seconds,
        )


_runtime: ProcessLocal[Runtime] = ProcessLocal(lambda: Runtime(Settings()))


def get_runtime() -> Runtime:
    """This process's runtime, from the environment's settings."""
    return _runtime.get()


def set_runtime(runtime: Runtime | None) -> None:
    """Replace the process runtime (embedded mode and tests)."""
    _runtime.set(runtime)
