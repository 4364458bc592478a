"""Celery tasks. Names and payloads are a contract for producers (docs/architecture.md).

Every task is idempotent: ingestion writes a partial under the batch id once, compaction is
atomic, so a redelivered task changes nothing. Bad input is counted and acknowledged (not
retried); only infrastructure errors propagate so Celery can redeliver.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from celery.signals import worker_process_init

from monitor.errors import InvalidInput
from monitor.pipeline.celery_app import TASK_COMPACT, TASK_EMBED, TASK_INGEST, app
from monitor.pipeline.embed import embed_payload
from monitor.pipeline.runtime import get_runtime
from monitor.pipeline.windows import compact_model, maintain_model

log = logging.getLogger(__name__)
_compact_lock = threading.Lock()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _one_thread_per_process(**_: object) -> None:
    """Each pool process computes with one thread: `--concurrency` processes already fill the
    cores, and torch's thread pools stall badly when oversubscribed (docs/benchmarks.md)."""
    torch.set_num_threads(1)


@app.task(name=TASK_INGEST)  # type: ignore[untyped-decorator]
def ingest_features(payload: dict[str, Any]) -> dict[str, Any]:
    """A feature batch (payload schema v1) -> one immutable partial."""
    try:
        result = get_runtime().ingestor.ingest(payload)
    except InvalidInput as exc:
        return {"rejected": exc.reason}
    return {"stored": result.stored, "samples": result.samples}


@app.task(name=TASK_EMBED)  # type: ignore[untyped-decorator]
def embed_texts(payload: dict[str, Any]) -> dict[str, Any]:
    """Texts or token ids -> teacher-forced forward on this worker's model -> one partial."""
    try:
        result = embed_payload(get_runtime(), payload)
    except InvalidInput as exc:
        return {"rejected": exc.reason}
    return {"stored": result.stored, "samples": result.samples}


@app.task(name=TASK_COMPACT)  # type: ignore[untyped-decorator]
def compact() -> dict[str, int]:
    """Merge pending partials into buckets and windows, slide the windows, drop old buckets."""
    runtime = get_runtime()
    merged = 0
    with _compact_lock:
        for model in runtime.store.models():
            merged += compact_model(runtime.store, model).partials
            maintain_model(runtime.store, model, time.time())
    return {"partials": merged}
