"""Compaction and rolling windows: statistics of a model over the last N seconds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from monitor.stats import CollapseStats
from monitor.store.base import CompactionResult, Store


def merge_blobs(blobs: Sequence[bytes]) -> bytes:
    """The merge function compaction hands to the store: sum of serialised statistics."""
    merged = CollapseStats.from_bytes(blobs[0])
    for blob in blobs[1:]:
        merged.merge(CollapseStats.from_bytes(blob))
    return merged.to_bytes()


def compact_model(store: Store, model: str, *, rounds: int = 64) -> CompactionResult:
    """Compact until nothing is pending (or `rounds` rounds ran: beat comes back later)."""
    partials = buckets = retries = 0
    started = time.perf_counter()
    for _ in range(rounds):
        result = store.compact(model, merge_blobs)
        partials += result.partials
        buckets += result.buckets
        retries += result.retries
        if result.buckets == 0:
            break
    return CompactionResult(partials, buckets, retries, time.perf_counter() - started)


@dataclass(frozen=True)
class WindowStats:
    window: str
    seconds: int
    stats: CollapseStats | None  # None: no bucket in the window yet
    buckets: int


def window_buckets(
    store: Store, model: str, seconds: int, *, now: float | None = None
) -> list[CollapseStats]:
    """The statistics of each bucket that overlaps `(now - seconds, now]`.

    Windows up to the fine retention read fine buckets, longer ones coarse buckets; a window
    therefore reaches back by up to one bucket length more than its nominal span. Partials not
    yet compacted are not included (that lag is `status`'s compaction lag).
    """
    now = time.time() if now is None else now
    level = store.policy.level_for(seconds)
    since = store.policy.start(level, now - seconds)
    return [CollapseStats.from_bytes(blob) for blob in store.window_blobs(model, level, since)]


def window_stats(
    store: Store, model: str, window: str, seconds: int, *, now: float | None = None
) -> WindowStats:
    """Sum of the window's buckets (`window_buckets`); `stats` is None with no bucket yet."""
    parts = window_buckets(store, model, seconds, now=now)
    stats = None
    for part in parts:
        stats = part if stats is None else stats.merge(part)
    return WindowStats(window, seconds, stats, len(parts))
