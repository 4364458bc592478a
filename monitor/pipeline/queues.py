"""Celery's queue and task names, Celery-free: the exporter reads queue depths and the clients
name tasks without importing Celery (`monitor.worker.app` builds the app on them)."""

from __future__ import annotations

QUEUES = ("embed", "ingest", "maintenance")
TASK_INGEST = "collapse.ingest_features"
TASK_EMBED = "collapse.embed_texts"
TASK_COMPACT = "collapse.compact"
TASK_EVALUATE = "collapse.evaluate"

__all__ = ["QUEUES", "TASK_COMPACT", "TASK_EMBED", "TASK_EVALUATE", "TASK_INGEST"]
