"""The one Celery app: queues `embed` (GPU forward passes), `ingest`, `maintenance` (beat).

Safety by configuration: JSON or msgpack only (a pickled message is refused before it is
decoded), late acknowledgement with rejection on worker loss (a SIGKILLed task is redelivered;
idempotent partials make the redelivery harmless), prefetch 1 so a GPU worker never hoards
work, no result backend (results are not used; nothing large travels back).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from monitor.config import Settings
from monitor.pipeline.runtime import redis_ssl_options

QUEUES = ("embed", "ingest", "maintenance")
TASK_INGEST = "collapse.ingest_features"
TASK_EMBED = "collapse.embed_texts"
TASK_COMPACT = "collapse.compact"
TASK_EVALUATE = "collapse.evaluate"


def broker_url(settings: Settings) -> str:
    """The Redis URL with the password from settings (Celery masks it in every banner/log)."""
    if settings.redis_url is None:
        return "memory://"
    if settings.redis_password is None:
        return settings.redis_url
    parts = urlsplit(settings.redis_url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    user = parts.username or ""
    secret = settings.redis_password.get_secret_value()
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}{port}"))


def celery_config(settings: Settings) -> dict[str, Any]:
    ssl_options = redis_ssl_options(settings)
    config: dict[str, Any] = {
        "broker_url": broker_url(settings),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # bad input is counted once, not redelivered
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


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings if settings is not None else Settings()
    app = Celery("collapse_monitor", include=["monitor.pipeline.tasks", "monitor.evaluate.tasks"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()
