"""Compaction, window maintenance and reads: statistics of a model over the last N seconds.

The store keeps every configured window as one state, updated as partials are compacted and
slid forward by maintenance; reading a window is one pass over its fields, streamed into a
preallocated `CollapseStats` (docs/architecture.md, "Windows"). A window read also records
its buckets as they were (`BucketCut`), so the jackknife behind the `*_traffic_stderr` keys can
stream them again later and know they are still the ones the window sums.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.errors import CollapseMonitorError, InvalidInput
from monitor.stats.decayed import DecayedGlobals, is_decayed
from monitor.stats.decayed_read import DecayedStatsBuilder
from monitor.stats.fields import (
    BLOCK_PREFIX,
    GLOBAL_FIELD,
    Globals,
    StatsAlgebra,
    StatsBuilder,
    decode_block,
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
from monitor.store.windows import WindowPlanner

if TYPE_CHECKING:
    from monitor.metrics.jackknife import Part, SecondBlock
    from monitor.stats import CollapseStats
    from monitor.stats.fields import Rows

# Compaction, maintenance and window_summary work on stored bytes and run without torch (beat's
# tasks, `status` in a core install): torch and the jackknife load when a block is built.
ALGEBRA = StatsAlgebra()


def compact_model(store: Store, model: str, *, rounds: int = 64) -> CompactionResult:
    """Compact until nothing is pending (or `rounds` rounds ran: beat comes back later).

    After a switch of `window_mode`, maintenance restarts the windows first: compaction adds
    only to windows of the current mode, so the switch's first run would otherwise reach the
    buckets alone, which that maintenance then drops."""
    if WindowPlanner(store.policy).mode_changed(store.windows(model)):
        maintain_model(store, model)
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


def read_state(
    store: Store, model: str, state: str, *, now: float | None = None
) -> CollapseStats | None:
    """A stored state as `CollapseStats` (None when absent), read once under the state lock;
    a decayed window is presented as it stands at `now` (monitor/stats/decayed.py)."""
    with store.locked(model):
        blob = store.state_field(model, state, GLOBAL_FIELD)
        if blob is None:
            return None
        builder: StatsBuilder | DecayedStatsBuilder
        if is_decayed(blob):
            dg = DecayedGlobals.decode(blob)
            rows = store.state_size(model, state) - dg.non_row_fields()
            at = time.time() if now is None else now
            builder = DecayedStatsBuilder(dg, rows, at, store.policy.decay_min_weight)
        else:
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
class BucketCut:
    """One bucket of a window as it was when the window was read (under the same lock).

    `globals_blob` is the bucket's `g` field then. Buckets only ever grow (compaction adds,
    nothing subtracts) and every added batch changes the sample count in `g`, so the same bytes
    later mean the same statistics.
    """

    state: str
    start: int
    end: int
    globals_blob: bytes
    sample_count: int
    nc4_total: int


@dataclass(frozen=True)
class WindowStats:
    window: str
    seconds: int
    stats: CollapseStats | None  # None: no data in the window yet
    buckets: int
    # The buckets `stats` is the exact sum of, oldest first; empty when that is not known (a
    # window marked dirty, or whose buckets did not add up to it).
    cut: tuple[BucketCut, ...] = ()


class BucketChanged(CollapseMonitorError):
    """A bucket no longer holds what it held when its window was read (late data, expiry)."""


@dataclass(frozen=True)
class WindowSummary:
    """What `status` shows of a window without reading its class rows."""

    window: str
    seconds: int
    sample_count: int  # decayed: Kish's effective count of all its samples
    class_count: int  # decayed: rows not pruned yet
    buckets: int
    mode: str = "exact"


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
        with store.locked(model):  # the window and its buckets' stamps from one moment
            stats = read_state(store, model, window_state(window), now=now)
            cut = _window_cut(store, model, window, seconds, stats)
    elif store.policy.decayed:
        configured = ", ".join(label for label, _ in store.policy.windows) or "none"
        raise InvalidInput(
            "unknown_window",
            f"window {window} ({seconds} s) is not configured, and in decayed window mode the "
            f"buckets keep no class rows to sum: read a configured window ({configured})",
        )
    else:
        stats, cut = _sum_buckets(store, model, seconds, now)
    if stats is not None and stats.sample_count == 0:
        stats, cut = None, ()
    return WindowStats(window, seconds, stats, buckets, cut)


def _cut_of(store: Store, model: str, level: str, start: int) -> BucketCut | None:
    state = bucket_state(level, start)
    blob = store.state_field(model, state, GLOBAL_FIELD)
    if blob is None:
        return None
    g = Globals.decode(blob)
    end = start + store.policy.length(level)
    return BucketCut(state, start, end, blob, g.sample_count, g.counters["nc4_total"])


def _window_cut(
    store: Store, model: str, window: str, seconds: int, stats: CollapseStats | None
) -> tuple[BucketCut, ...]:
    """The buckets a configured window holds, read under the lock its statistics were read
    under: those of its level from its recorded first bucket on (docs/architecture.md)."""
    state = store.windows(model).get(window)
    if stats is None or state is None or state.dirty or state.seconds != seconds:
        return ()
    if state.mode == "decayed":
        return ()  # no bucket holds class rows: no jackknife
    cuts = [
        cut
        for s in store.bucket_starts(model, state.level)
        if s >= state.since and (cut := _cut_of(store, model, state.level, s)) is not None
    ]
    if sum(c.sample_count for c in cuts) != stats.sample_count:
        return ()  # not the sum of its buckets (an interrupted slide): no jackknife this time
    return tuple(cuts)


def _sum_buckets(
    store: Store, model: str, seconds: int, now: float
) -> tuple[CollapseStats | None, tuple[BucketCut, ...]]:
    total = None
    cuts: list[BucketCut] = []
    level = store.policy.level_for(seconds)
    since = store.policy.window_since(seconds, now)
    for start in (s for s in store.bucket_starts(model, level) if s >= since):
        with store.locked(model):  # each bucket with the stamp of what was read
            cut = _cut_of(store, model, level, start)
            part = read_state(store, model, bucket_state(level, start))
        if part is not None and cut is not None:
            total = part if total is None else total.merge(part)
            cuts.append(cut)
    return total, tuple(cuts)


def changed_buckets(store: Store, model: str, cuts: Sequence[BucketCut]) -> set[str]:
    """The buckets among `cuts` whose statistics changed since they were recorded (the
    evaluator leaves them out of the groups it deals)."""
    with store.locked(model):
        return {
            c.state
            for c in cuts
            if store.state_field(model, c.state, GLOBAL_FIELD) != c.globals_blob
        }


def group_parts(
    store: Store, model: str, cuts: Sequence[BucketCut], *, max_bytes: int = 32 * 2**20
) -> Iterator[Part]:
    """The statistics of `cuts` as jackknife parts (globals, row chunks, second-moment blocks),
    streamed under one hold of the state lock. Raises BucketChanged, before yielding anything
    of that bucket, when a bucket is not what it was when its window was read."""
    with store.locked(model):
        for cut in cuts:
            blob = store.state_field(model, cut.state, GLOBAL_FIELD)
            if blob != cut.globals_blob:
                raise BucketChanged(f"{cut.state} of {model!r} changed since its window was read")
            yield from _bucket_parts(store, model, cut, max_bytes)


class BucketGroup:
    """One jackknife group of a window's buckets (`monitor.metrics.jackknife.Group.read`).

    The first read leaves out the buckets that changed since the window was read (late data:
    the window holds their old content, so they stay in every replicate) and streams the rest;
    every later read streams exactly those, and raises BucketChanged if one of them changed.
    """

    def __init__(
        self, store: Store, model: str, cuts: Sequence[BucketCut], max_bytes: int = 32 * 2**20
    ) -> None:
        self.store, self.model, self.cuts, self.max_bytes = store, model, list(cuts), max_bytes
        self.taken: list[BucketCut] | None = None

    def __call__(self) -> Iterator[Part]:
        if self.taken is not None:
            yield from group_parts(self.store, self.model, self.taken, max_bytes=self.max_bytes)
            return
        with self.store.locked(self.model):
            self.taken = [
                c
                for c in self.cuts
                if self.store.state_field(self.model, c.state, GLOBAL_FIELD) == c.globals_blob
            ]
            for cut in self.taken:
                yield from _bucket_parts(self.store, self.model, cut, self.max_bytes)


def _bucket_parts(store: Store, model: str, cut: BucketCut, max_bytes: int) -> Iterator[Part]:
    """One bucket's parts, its stamp already checked (the caller holds the state lock)."""
    g = Globals.decode(cut.globals_blob)
    yield g
    for chunk in store.scan_state(model, cut.state, max_bytes=max_bytes):
        rows = decode_rows(chunk, g)
        if rows is not None:
            yield rows
        for name, value in chunk:
            if name.startswith(BLOCK_PREFIX):
                yield _block(name, value, g.dim)


def _block(name: bytes, value: bytes, dim: int) -> SecondBlock:
    import torch

    from monitor.metrics.jackknife import SecondBlock

    start, block = decode_block(name, value, dim)
    return SecondBlock(start, torch.from_numpy(block.copy()))


def window_summary(store: Store, model: str, window: str, seconds: int) -> WindowSummary:
    """Samples and classes of a configured window from its globals and field count."""
    now = time.time()
    if _configured(store, window, seconds):
        maintain_model(store, model, now)
    state = window_state(window)
    blob = store.state_field(model, state, GLOBAL_FIELD)
    samples = classes = 0
    mode = "exact"
    if blob is not None:
        g: Globals | DecayedGlobals
        if is_decayed(blob):  # Kish's effective count; rows not yet pruned among the classes
            g = DecayedGlobals.decode(blob)
            samples, mode = g.effective_samples(), "decayed"
        else:
            g = Globals.decode(blob)
            samples = g.sample_count
        classes = max(store.state_size(model, state) - g.non_row_fields(), 0)
    buckets = len(_window_buckets(store, model, seconds, now))
    return WindowSummary(window, seconds, samples, classes, buckets, mode)


def bucket_globals(store: Store, model: str, seconds: int) -> list[Globals]:
    """The globals (counts, RFF sums) of each bucket of the window: MMD calibration."""
    out = []
    for bucket in _window_buckets(store, model, seconds, time.time()):
        g = decode_globals(store.state_field(model, bucket, GLOBAL_FIELD))
        if g is not None and g.sample_count > 0:
            out.append(g)
    return out
