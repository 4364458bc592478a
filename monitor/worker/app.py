"""The Celery app: queues `embed` (GPU forward passes), `ingest`, `maintenance` (beat).

Safety by configuration: JSON or msgpack only (a pickled message is refused before it is
decoded), late acknowledgement with rejection on worker loss (a SIGKILLed task is redelivered;
idempotent partials make the redelivery harmless), prefetch 1 so a GPU worker never hoards
work, no result backend (results are not used; nothing large travels back).

The broker is `broker_url` or the store's Redis, standalone or behind Sentinel (kombu's
`sentinel://` transport); never a Redis Cluster, which Celery's Redis transport cannot use.

Nothing the broker hands over ends the worker: its transport and consumer are the guarded ones
of `monitor.worker.broker` (a poison message is dead-lettered and the worker goes on), and a
broker that answers with an error (out of memory: every command of a MULTI is refused)
reconnects with backoff like a lost connection instead of stopping the worker
(`broker_channel_error_retry`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from kombu.transport import TRANSPORT_ALIASES
from pydantic import SecretStr

from monitor.config import NO_CLUSTER_BROKER, Settings
from monitor.lazy import ProcessLocal
from monitor.pipeline.queues import QUEUES, TASK_COMPACT, TASK_EMBED, TASK_EVALUATE, TASK_INGEST
from monitor.pipeline.runtime import broker_ssl_options, redis_ssl_options


def _with_password(url: str, password: SecretStr | None) -> str:
    """`url` with `password` in it (quoted); Celery masks it in every banner and log line."""
    if password is None:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    user = parts.username or ""
    secret = quote(password.get_secret_value(), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}{port}"))


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: broker_url, else the store's Redis (through its sentinels).

    Passwords come from settings. A Sentinel broker is kombu's `sentinel://` transport: one
    URL per sentinel, joined by `;`, each with the master's credentials and database.
    """
    if settings.redis_url is None:
        return "memory://"
    if settings.broker_url is not None:
        parts = settings.broker_url.split(";")
        return ";".join(_with_password(part, settings.broker_password) for part in parts if part)
    if settings.redis_cluster:
        raise ValueError(NO_CLUSTER_BROKER)  # Settings refuses this already
    if not settings.redis_sentinels:
        return _with_password(settings.redis_url, settings.redis_password)
    store = urlsplit(settings.redis_url)
    user = f"{store.username}@" if store.username else ""
    return ";".join(
        _with_password(f"sentinel://{user}{address}{store.path}", settings.redis_password)
        for address in settings.redis_sentinels
    )


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Sentinel options (master name, the sentinels' own AUTH and TLS); {} otherwise."""
    if settings.broker_url is not None:
        master = settings.broker_sentinel_master
        tls: dict[str, Any] = {}  # kombu's sentinel:// has no TLS variant
    else:
        master = settings.redis_sentinel_master if settings.redis_sentinels else None
        tls = redis_ssl_options(settings)
    if master is None:
        return {}
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5}
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    if tls:
        sentinel_kwargs.update(ssl=True, **tls)
    return {"master_name": master, "sentinel_kwargs": sentinel_kwargs}


GUARDED_TRANSPORTS = {
    "redis": "monitor.worker.broker:GuardedRedisTransport",
    "rediss": "monitor.worker.broker:GuardedRedisTransport",
    "sentinel": "monitor.worker.broker:GuardedSentinelTransport",
}


def use_guarded_transports() -> None:
    """Resolve the redis://, rediss:// and sentinel:// schemes to the guarded transports.

    Through kombu's scheme table rather than Celery's `broker_transport`, which would name the
    class in every log line and banner where the broker URL (`redis://...`) belongs.
    """
    TRANSPORT_ALIASES.update(GUARDED_TRANSPORTS)


def celery_config(settings: Settings) -> dict[str, Any]:
    ssl_options = broker_ssl_options(settings)
    config: dict[str, Any] = {
        "broker_url": broker_url(settings),
        "worker_consumer": "monitor.worker.broker:GuardedConsumer",
        "broker_channel_error_retry": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "event_serializer": "json",
        # Monitoring events (docs/operations.md, "Worker metrics"): workers report every task
        # (received, started, succeeded, failed, retried), so Flower counts rates, failures and
        # runtimes from outside; producers, beat included, report each send (Flower's task
        # pages show when and by whom). Over Redis an event is a PUBLISH to a pub/sub channel:
        # with nobody listening it leaves no key behind (tests/integration/test_worker_metrics.py).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A listener's own queue (AMQP brokers; kombu's Redis transport keeps only its
        # binding): unread events expire after 5 s, a queue whose listener died after 60 s,
        # and on Redis the binding of a listener killed without closing it is swept an hour on.
        "event_queue_ttl": 5.0,
        "event_queue_expires": 60.0,
        # Events, message headers and log lines name a task's arguments by their repr: one
        # level (`[{...}]`) keeps the payload (mirrored traffic texts, model and batch ids)
        # out of them, and out of Flower's task pages.
        "task_repr_maxlevels": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Bad input is counted once, not redelivered. Infrastructure failures never reach
        # Celery's failure path: the tasks retry them or dead-letter them (worker.tasks).
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        # With SIGTERM remapped to a cold shutdown (the `worker` command does), this is a
        # bounded warm one: running tasks get this long, then unacked messages are requeued at
        # once. A plain warm shutdown can wait forever on a message that arrived with the
        # signal, and a SIGKILL then leaves it to the visibility timeout (an hour).
        "worker_soft_shutdown_timeout": settings.worker_shutdown_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.task_visibility_timeout,
            # kombu sweeps for tasks of dead workers every interval x throttle seconds (100 s
            # by default); sweep at least twice per visibility timeout instead.
            "unacked_restore_interval": max(1, min(10, settings.task_visibility_timeout // 2)),
            "unacked_restore_throttle": 1,
            # A worker killed during a sweep leaves the sweep's mutex behind until it expires
            # (300 s by default), blocking every other worker's sweep until then.
            "unacked_mutex_expire": max(5, min(300, settings.task_visibility_timeout)),
            "socket_connect_timeout": 5,
            **sentinel_transport_options(settings),
        },
        "task_queues": [Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        "task_default_queue": "ingest",
        "task_routes": {
            TASK_INGEST: {"queue": "ingest"},
            TASK_EMBED: {"queue": "embed"},
            TASK_COMPACT: {"queue": "maintenance"},
            TASK_EVALUATE: {"queue": "maintenance"},
        },
        "beat_schedule": {
            "compact": {"task": TASK_COMPACT, "schedule": settings.compaction_interval},
            "evaluate": {"task": TASK_EVALUATE, "schedule": settings.evaluation_interval},
        },
        "task_always_eager": settings.embedded,
        "task_eager_propagates": True,
    }
    if ssl_options:
        config["broker_use_ssl"] = ssl_options
    return config


def create_app(settings: Settings | None = None, *, tasks: bool = False) -> Celery:
    """An app on `settings` (the environment's by default). Senders (the client, the API) need
    no tasks: they send by name. `tasks=True` is the workers' and beat's app."""
    settings = settings if settings is not None else Settings()
    use_guarded_transports()
    app = Celery("collapse_monitor", include=["monitor.worker.tasks"] if tasks else None)
    app.conf.update(celery_config(settings))
    return app


_worker_app: ProcessLocal[Celery] = ProcessLocal(lambda: create_app(tasks=True))


def worker_app() -> Celery:
    """This process's app with every task, from the environment's settings, built on first use
    (importing this module reads no settings)."""
    return _worker_app.get()
