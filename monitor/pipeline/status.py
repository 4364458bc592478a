"""`status`: what the pipeline holds per model and window, for people and for scripts."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from monitor.config import Settings
from monitor.pipeline.windows import window_summary
from monitor.store.base import Store


@dataclass(frozen=True)
class WindowStatus:
    window: str
    seconds: int
    sample_count: int
    class_count: int
    buckets: int
    mode: str = "exact"  # "decayed": effective samples, rows not pruned yet (window_mode)


@dataclass(frozen=True)
class ModelStatus:
    model: str
    pending_partials: int
    compaction_lag_seconds: float | None
    memory_bytes: int
    counters: dict[str, int]
    windows: list[WindowStatus] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    last_evaluation: float | None = None


def model_status(store: Store, settings: Settings, model: str) -> ModelStatus:
    now = time.time()
    windows = []
    for label, seconds in settings.windows.items():
        summary = window_summary(store, model, label, seconds)
        windows.append(
            WindowStatus(
                label,
                seconds,
                summary.sample_count,
                summary.class_count,
                summary.buckets,
                summary.mode,
            )
        )
    oldest = store.oldest_pending(model)
    last = None
    for label in settings.windows:
        doc = store.snapshot(model, label)
        if doc is not None:
            ts = json.loads(doc).get("timestamp")
            last = max(last or 0.0, float(ts)) if isinstance(ts, int | float) else last
    return ModelStatus(
        model=model,
        pending_partials=store.pending_count(model),
        compaction_lag_seconds=None if oldest is None else max(now - oldest, 0.0),
        memory_bytes=store.memory_bytes(model),
        counters=store.counters(model),
        windows=windows,
        baselines=sorted(store.baselines(model)),
        last_evaluation=last,
    )


def status_document(statuses: list[ModelStatus]) -> dict[str, object]:
    return {"models": [asdict(s) for s in statuses]}
