"""The Celery app Flower runs on: `celery -A monitor.worker.flower flower ...`.

The same broker configuration as the workers' app (`celery_config`: URL and password from
settings, TLS, Sentinel, the guarded transports, the event settings), but no task modules.
Flower imports an app's task modules at start; ours import torch (seconds and hundreds of MB
for a process that only reads events and sends control commands), and the slim core image has
no torch at all. Flower needs no task code: events carry the task names.
"""

from __future__ import annotations

from celery import Celery

from monitor.config import Settings
from monitor.worker.app import celery_config, use_guarded_transports


def create_flower_app(settings: Settings | None = None) -> Celery:
    """A Celery app with the workers' broker and event settings and no task modules."""
    settings = settings if settings is not None else Settings()
    use_guarded_transports()
    app = Celery("collapse_monitor")
    app.conf.update(celery_config(settings))
    return app


app = create_flower_app()
