"""What every store offers (`Store`), and the bucket and window arithmetic both implementations
share.

Statistics are stored split into fields (a Redis hash per state: partial, bucket, window,
baseline), so no value grows with the vocabulary and a merge touches only the fields the new
data touches. A store never parses those fields: it adds and subtracts them through the
`FieldAlgebra` the pipeline hands it, so it knows nothing of the statistics format or of metric
formulas.

States, named by `StateRef` strings: `bucket:<level>:<start>`, `window:<label>`,
`baseline:<name>`, `reference`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from monitor.errors import CollapseMonitorError

Fields = Mapping[bytes, bytes]
Chunk = list[tuple[bytes, bytes]]


class FieldAlgebra(Protocol):
    """How field values add up; `monitor.stats.fields.StatsAlgebra` is the real one."""

    def combine(
        self,
        fields: Sequence[bytes],
        current: Sequence[bytes | None],
        delta: Sequence[bytes],
        sign: int,
    ) -> list[bytes | None]:
        """`current + sign * delta` per field; None deletes the field (it became empty)."""
        ...

    def merge_all(self, parts: Iterable[Mapping[bytes, bytes]]) -> dict[bytes, bytes]: ...

    def combine_decayed(
        self,
        fields: Sequence[bytes],
        current: Sequence[bytes | None],
        delta: Sequence[bytes],
        at: float,
        tau: float,
    ) -> list[bytes | None]:
        """A decayed window's fields plus `delta` of data at time `at` (time constant `tau`)."""
        ...

    def expired(
        self, chunk: Iterable[tuple[bytes, bytes]], now: float, tau: float, min_weight: float
    ) -> list[bytes]:
        """Fields of a decayed state that weigh less than `min_weight` at `now` (to delete)."""
        ...

    def summary(self, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """The fields a bucket keeps in decayed mode: the globals (MMD calibration)."""
        ...


WINDOW_MODES = ("exact", "decayed")
# Decayed class frequencies (the optional cap on tracked classes) below this are deleted: a
# class seen once survives one half-life and is gone after the second.
FREQUENCY_FLOOR = 0.5
# Meta field: when the class frequencies were last decayed (the half-life steps count from it).
FREQUENCY_DECAYED_FIELD = "frequencies_decayed"
# One sample of age S weighs exp(-S / tau) = exp(-2) in a decayed window of S seconds.
DEFAULT_DECAY_MIN_WEIGHT = math.exp(-2.0)


@dataclass(frozen=True)
class BucketPolicy:
    """Two levels of time buckets, and the windows kept incrementally on top of them.

    A partial lands in one fine and one coarse bucket and in every window whose span covers
    its bucket. A window of `seconds` on level L holds exactly the buckets of L whose start is
    at or after `start(L, now - seconds)`: maintenance subtracts the buckets that slid out, so
    evaluating a window reads one state, and a bucket is kept only while a window may still
    need to subtract it.
    """

    fine_seconds: int = 300
    coarse_seconds: int = 10800
    fine_retention: int = 3600
    coarse_retention: int = 86400
    partial_ttl: int = 86400
    seen_ttl: int = 2 * 86400
    windows: tuple[tuple[str, int], ...] = ()
    group_bytes: int = 64 * 2**20  # soft bound on the new data one compaction step merges
    rebuild_seconds: int = 86400  # windows are rebuilt exactly from buckets this often
    lock_seconds: float = 60.0  # the state lock expires this long after its last refresh
    # "exact": sliding windows over buckets with class rows; "decayed": exponentially decayed
    # windows and buckets with globals only (monitor/stats/decayed.py, docs/architecture.md).
    window_mode: str = "exact"
    decay_min_weight: float = DEFAULT_DECAY_MIN_WEIGHT
    # Class frequencies of capped models (max_tracked_classes) halve once per this many seconds.
    tracked_half_life: float = 86400.0

    def __post_init__(self) -> None:
        if self.fine_seconds < 1 or self.coarse_seconds % self.fine_seconds:
            raise ValueError("coarse bucket length must be a positive multiple of the fine one")
        if self.seen_ttl < self.partial_ttl:
            raise ValueError("seen markers must outlive partials, or a redelivery counts twice")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, not {self.window_mode!r}")
        if not 0 < self.decay_min_weight < 1:
            raise ValueError("decay_min_weight must be between 0 and 1 (a fraction of a sample)")
        if not self.tracked_half_life > 0:
            raise ValueError("tracked_half_life must be positive")

    @property
    def decayed(self) -> bool:
        return self.window_mode == "decayed"

    @staticmethod
    def time_constant(window_seconds: int) -> float:
        """tau of a decayed window: the same as `monitor.stats.decayed.time_constant` (the
        store may not import the statistics format; a test holds the two equal)."""
        return window_seconds / 2.0

    def prune_interval(self, window_seconds: int) -> float:
        """How often maintenance deletes the rows that decayed below `decay_min_weight`."""
        return max(self.time_constant(window_seconds) / 2.0, 60.0)

    def length(self, level: str) -> int:
        return self.fine_seconds if level == "fine" else self.coarse_seconds

    def retention(self, level: str) -> int:
        return self.fine_retention if level == "fine" else self.coarse_retention

    def start(self, level: str, ts: float) -> int:
        length = self.length(level)
        return int(ts // length) * length

    def level_for(self, window_seconds: int) -> str:
        """Fine buckets while they are still kept for the whole window, else coarse ones."""
        return "fine" if window_seconds <= self.fine_retention else "coarse"

    def window_since(self, window_seconds: int, now: float) -> int:
        """First bucket start a window of `window_seconds` includes at `now`."""
        level = self.level_for(window_seconds)
        return self.start(level, now - window_seconds)

    def expired_before(self, level: str, now: float) -> float:
        """Buckets of `level` starting before this are past retention and may be dropped."""
        return now - self.retention(level) - self.length(level)

    def key_ttl(self, level: str) -> int:
        # A bucket must outlive the longest window that reads it, plus its own length.
        return self.retention(level) + 2 * self.length(level)


@dataclass(frozen=True)
class TrackedCounts:
    """What a batch of a capped model (max_tracked_classes) adds besides its partial, in the
    same exactly-once step: the count of every label it carried (tracked or not) into the
    model's class frequencies, and the samples left out as untracked."""

    frequencies: Mapping[int, float]
    untracked: int


def decay_steps(last: float, now: float, half_life: float) -> int:
    """Whole half-lives from the last decay to `now` (the frequencies halve once per step)."""
    return max(math.floor((now - last) / half_life), 0)


@dataclass(frozen=True)
class CompactionResult:
    partials: int = 0
    buckets: int = 0
    retries: int = 0
    seconds: float = 0.0
    deferred: bool = False  # the state lock was held (a read or maintenance): try again later


@dataclass(frozen=True)
class MaintenanceResult:
    subtracted: int = 0  # buckets that slid out of a window and were subtracted from it
    rebuilt: int = 0  # windows rebuilt exactly from their buckets
    dropped: int = 0  # buckets past retention deleted
    seconds: float = 0.0


@dataclass(frozen=True)
class WindowState:
    """Where a window stands: the first bucket it holds, and whether it must be rebuilt."""

    seconds: int
    level: str
    since: int
    built: float  # exact: last exact rebuild; decayed: last prune of rows below the minimum
    dirty: bool = False
    mode: str = "exact"


@dataclass(frozen=True)
class Baseline:
    """A pinned baseline's stamp; its statistics are the state `baseline:<name>`."""

    name: str
    meta: dict[str, object]
    calibration: bytes | None = None  # per-bucket sums that calibrate drift thresholds

    @property
    def state(self) -> str:
        return baseline_state(self.name)


def bucket_state(level: str, start: int) -> str:
    return f"bucket:{level}:{start}"


def window_state(label: str) -> str:
    return f"window:{label}"


def baseline_state(name: str) -> str:
    return f"baseline:{name}"


# The class means NC4 at ingestion compares against; stored under its 0.1 name, `reference`.
NC4_MEANS_STATE = "reference"


class Store(Protocol):
    """Storage of partials, buckets, windows, baselines, snapshots and counters, per model."""

    policy: BucketPolicy

    def ping(self) -> bool: ...

    # ------------------------------------------------------------ ingestion
    def put_partial(
        self,
        model: str,
        batch_id: str,
        fields: Fields,
        ts: float,
        samples: int,
        *,
        tracked: TrackedCounts | None = None,
    ) -> bool:
        """Write a batch's statistics once and count its samples in the same atomic step;
        with `tracked` (a capped model) also its class frequencies and untracked samples.

        False if the id was seen before: nothing changes but the `batches_duplicate` counter.
        """
        ...

    def pending_count(self, model: str) -> int: ...

    # ------------------------------------- class frequencies (max_tracked_classes)
    def add_frequencies(self, model: str, counts: Mapping[int, float]) -> None:
        """Add to the model's decayed class frequencies (not exactly once: `put_partial` with
        `tracked` is the ingestion path)."""
        ...

    def top_classes(self, model: str, m: int) -> list[int]:
        """The `m` most frequent classes, most frequent first (fewer when fewer are known);
        ties in Redis's order (the higher class id as text first)."""
        ...

    def decay_frequencies(self, model: str, now: float) -> int:
        """Halve the frequencies once per whole `tracked_half_life` since the last decay and
        delete those below `FREQUENCY_FLOOR`, atomically with the stamp in the model's meta
        (so at most once per step, whatever the number of maintainers). The first call on a
        model with frequencies only sets the stamp; none without frequencies. Returns steps."""
        ...

    def oldest_pending(self, model: str) -> float | None: ...

    def compact(
        self, model: str, algebra: FieldAlgebra, *, limit: int = 64, now: float | None = None
    ) -> CompactionResult:
        """Add pending partials to their buckets and windows atomically, exactly once."""
        ...

    def maintain(self, model: str, algebra: FieldAlgebra, now: float) -> MaintenanceResult:
        """Slide every window to `now`, rebuild the ones that need it, drop old buckets."""
        ...

    # ---------------------------------------------------------------- reads
    def locked(self, model: str) -> AbstractContextManager[None]:
        """Hold the model's state lock: no compaction or maintenance changes a state meanwhile.

        Reads of a large state happen in chunks; under this lock they see one consistent state.
        """
        ...

    def state_field(self, model: str, state: str, field: bytes) -> bytes | None: ...

    def state_size(self, model: str, state: str) -> int:
        """Number of fields of a state (0 when it does not exist)."""
        ...

    def scan_state(self, model: str, state: str, *, max_bytes: int = 32 * 2**20) -> Iterator[Chunk]:
        """All fields of a state, in chunks of about `max_bytes` (never the whole at once)."""
        ...

    def write_state(self, model: str, state: str, chunks: Iterable[Fields]) -> None:
        """Replace a state (a baseline, NC4's class means) with these fields, atomically."""
        ...

    def windows(self, model: str) -> dict[str, WindowState]: ...

    def bucket_starts(self, model: str, level: str) -> list[int]: ...

    # ------------------------------------------------------------ baselines
    def pin_baseline(
        self,
        model: str,
        name: str,
        chunks: Iterable[Fields],
        meta: dict[str, object],
        *,
        replace: bool,
        calibration: bytes | None = None,
    ) -> None: ...

    def baseline(self, model: str, name: str) -> Baseline | None: ...

    def baselines(self, model: str) -> dict[str, dict[str, object]]: ...

    def unpin_baseline(self, model: str, name: str) -> bool: ...

    # ------------------------------------------------- snapshots and counters
    def put_snapshot(self, model: str, window: str, document: str, *, history: int) -> None: ...

    def snapshot(self, model: str, window: str) -> str | None: ...

    def history(self, model: str, window: str, count: int) -> list[str]: ...

    def add_counters(self, model: str, deltas: dict[str, int]) -> None: ...

    def counters(self, model: str) -> dict[str, int]: ...

    def models(self) -> list[str]: ...

    def memory_bytes(self, model: str) -> int:
        """Memory the store accounts to the model's statistics, snapshots and indexes."""
        ...

    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        """The model's value of `field`, set to `value` first if it had none (atomic)."""
        ...

    def meta(self, model: str) -> dict[str, str]: ...

    def claim(self, model: str, name: str, ttl: float) -> bool:
        """True for the first caller of `name` within `ttl` seconds (SET NX EX)."""
        ...


class BaselineExists(CollapseMonitorError):
    """A baseline of that name is pinned already (pass replace=True to overwrite)."""


class StoreBusy(CollapseMonitorError):
    """The model's state lock stayed held past the wait (a long read or maintenance)."""


class LegacyStoreFormat(CollapseMonitorError):
    """The store holds statistics written by an older release, in a format this one refuses."""
