"""Compaction, window maintenance and reads: statistics of a model over the last N seconds.

The store keeps every configured window as one state, updated as partials are compacted and
slid forward by maintenance; reading a window is one pass over its fields, streamed into a
preallocated `CollapseStats` (docs/architecture.md, "Windows").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from monitor.stats import CollapseStats
from monitor.stats.fields import (
    GLOBAL_FIELD,
    Globals,
    Rows,
    StatsAlgebra,
    StatsBuilder,
    decode_globals,
    decode_rows,
)
from monitor.store.base import (
    CompactionResult,
    MaintenanceResult,
    Store,
    bucket_state,
    window_state,
)

ALGEBRA = StatsAlgebra()


def compact_model(store: Store, model: str, *, rounds: int = 64) -> CompactionResult:
    """Compact until nothing is pending (or `rounds` rounds ran: beat comes back later)."""
    partials = buckets = retries = 0
    started = time.perf_counter()
    for _ in range(rounds):
        result = store.compact(model, ALGEBRA)
        partials += result.partials
        buckets += result.buckets
        retries += result.retries
        if result.deferred or result.buckets == 0:
            return CompactionResult(
                partials, buckets, retries, time.perf_counter() - started, result.deferred
            )
    return CompactionResult(partials, buckets, retries, time.perf_counter() - started)


def maintain_model(store: Store, model: str, now: float | None = None) -> MaintenanceResult:
    """Slide the model's windows to `now`, rebuild the ones that need it, drop old buckets."""
    return store.maintain(model, ALGEBRA, time.time() if now is None else now)


def read_state(store: Store, model: str, state: str) -> CollapseStats | None:
    """A stored state as `CollapseStats` (None when absent), read once under the state lock."""
    with store.locked(model):
        blob = store.state_field(model, state, GLOBAL_FIELD)
        if blob is None:
            return None
        g = Globals.decode(blob)
        builder = StatsBuilder(g, store.state_size(model, state) - g.non_row_fields())
        for chunk in store.scan_state(model, state):
            builder.add(chunk)
        return builder.finish()


def state_rows(
    store: Store, model: str, state: str, *, max_bytes: int = 32 * 2**20
) -> Iterator[Rows]:
    """The class rows of a stored state, chunk by chunk, under the state lock: for comparisons
    that must not hold a second K x d matrix (drift against a large baseline)."""
    with store.locked(model):
        g = decode_globals(store.state_field(model, state, GLOBAL_FIELD))
        if g is None:
            return
        for chunk in store.scan_state(model, state, max_bytes=max_bytes):
            rows = decode_rows(chunk, g)
            if rows is not None:
                yield rows


@dataclass(frozen=True)
class WindowStats:
    window: str
    seconds: int
    stats: CollapseStats | None  # None: no data in the window yet
    buckets: int


@dataclass(frozen=True)
class WindowSummary:
    """What `status` shows of a window without reading its class rows."""

    window: str
    seconds: int
    sample_count: int
    class_count: int
    buckets: int


def _configured(store: Store, window: str, seconds: int) -> bool:
    return (window, seconds) in store.policy.windows


def _window_buckets(store: Store, model: str, seconds: int, now: float) -> list[str]:
    """The bucket states a window of `seconds` covers at `now`, oldest first."""
    level = store.policy.level_for(seconds)
    since = store.policy.window_since(seconds, now)
    return [bucket_state(level, s) for s in store.bucket_starts(model, level) if s >= since]


def window_stats(
    store: Store, model: str, window: str, seconds: int, *, now: float | None = None
) -> WindowStats:
    """The window's statistics at `now` (the present by default).

    A configured window is brought to `now` and read as one state. Any other span is summed
    from its buckets (O(buckets); for ad-hoc reads only). Partials not yet compacted are not
    included (that lag is `status`'s compaction lag).
    """
    now = time.time() if now is None else now
    buckets = len(_window_buckets(store, model, seconds, now))
    if _configured(store, window, seconds):
        maintain_model(store, model, now)
        stats = read_state(store, model, window_state(window))
    else:
        stats = _sum_buckets(store, model, seconds, now)
    if stats is not None and stats.sample_count == 0:
        stats = None
    return WindowStats(window, seconds, stats, buckets)


def _sum_buckets(store: Store, model: str, seconds: int, now: float) -> CollapseStats | None:
    total = None
    for bucket in _window_buckets(store, model, seconds, now):
        part = read_state(store, model, bucket)
        if part is not None:
            total = part if total is None else total.merge(part)
    return total


def window_summary(store: Store, model: str, window: str, seconds: int) -> WindowSummary:
    """Samples and classes of a configured window from its globals and field count."""
    now = time.time()
    if _configured(store, window, seconds):
        maintain_model(store, model, now)
    state = window_state(window)
    g = decode_globals(store.state_field(model, state, GLOBAL_FIELD))
    samples = classes = 0
    if g is not None:
        samples = g.sample_count
        classes = max(store.state_size(model, state) - g.non_row_fields(), 0)
    return WindowSummary(
        window, seconds, samples, classes, len(_window_buckets(store, model, seconds, now))
    )


def bucket_globals(store: Store, model: str, seconds: int) -> list[Globals]:
    """The globals (counts, RFF sums) of each bucket of the window: MMD calibration."""
    out = []
    for bucket in _window_buckets(store, model, seconds, time.time()):
        g = decode_globals(store.state_field(model, bucket, GLOBAL_FIELD))
        if g is not None and g.sample_count > 0:
            out.append(g)
    return out
