"""What every store offers (`Store`), and the bucket arithmetic both implementations share.

A store moves opaque blobs: it never parses statistics. Compaction takes the merge function
from the pipeline, so the store knows nothing of metric formulas or of the stats format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from monitor.errors import CollapseMonitorError

MergeFn = Callable[[Sequence[bytes]], bytes]


@dataclass(frozen=True)
class BucketPolicy:
    """Two levels of time buckets: fine ones for short windows, coarse ones for long windows.

    A partial lands in one fine and one coarse bucket, so a 24-hour window sums 24 hourly
    buckets instead of 288 five-minute ones, and fine buckets can expire after an hour.
    """

    fine_seconds: int = 300
    coarse_seconds: int = 3600
    fine_retention: int = 3600
    coarse_retention: int = 86400
    partial_ttl: int = 86400
    seen_ttl: int = 2 * 86400

    def __post_init__(self) -> None:
        if self.fine_seconds < 1 or self.coarse_seconds % self.fine_seconds:
            raise ValueError("coarse bucket length must be a positive multiple of the fine one")
        if self.seen_ttl < self.partial_ttl:
            raise ValueError("seen markers must outlive partials, or a redelivery counts twice")

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

    def expired_before(self, level: str, now: float) -> float:
        """Buckets of `level` starting before this are past retention and may be dropped."""
        return now - self.retention(level) - self.length(level)

    def key_ttl(self, level: str) -> int:
        # A bucket must outlive the longest window that reads it, plus its own length.
        return self.retention(level) + 2 * self.length(level)


@dataclass(frozen=True)
class CompactionResult:
    partials: int = 0
    buckets: int = 0
    retries: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Baseline:
    name: str
    blob: bytes
    meta: dict[str, object]
    calibration: bytes | None = None  # per-bucket sums that calibrate drift thresholds


class Store(Protocol):
    """Storage of partials, buckets, baselines, snapshots and counters, per model."""

    policy: BucketPolicy

    def ping(self) -> bool: ...

    def put_partial(self, model: str, batch_id: str, blob: bytes, ts: float, samples: int) -> bool:
        """Write a batch's statistics once and count its samples in the same atomic step.

        False if the id was seen before: nothing changes but the `batches_duplicate` counter.
        """
        ...

    def pending_count(self, model: str) -> int: ...

    def oldest_pending(self, model: str) -> float | None: ...

    def compact(self, model: str, merge: MergeFn, *, limit: int = 64) -> CompactionResult:
        """Merge pending partials into their buckets atomically; safe to run concurrently."""
        ...

    def window_blobs(self, model: str, level: str, since: int) -> list[bytes]:
        """Blobs of the buckets of `level` whose start is at or after `since`."""
        ...

    def bucket_starts(self, model: str, level: str) -> list[int]: ...

    def expire_buckets(self, model: str, now: float) -> int:
        """Drop buckets past their level's retention (keys also carry TTLs)."""
        ...

    def pin_baseline(
        self,
        model: str,
        name: str,
        blob: bytes,
        meta: dict[str, object],
        *,
        replace: bool,
        calibration: bytes | None = None,
    ) -> None: ...

    def baseline(self, model: str, name: str) -> Baseline | None: ...

    def baselines(self, model: str) -> dict[str, dict[str, object]]: ...

    def unpin_baseline(self, model: str, name: str) -> bool: ...

    def put_snapshot(self, model: str, window: str, document: str, *, history: int) -> None: ...

    def snapshot(self, model: str, window: str) -> str | None: ...

    def history(self, model: str, window: str, count: int) -> list[str]: ...

    def add_counters(self, model: str, deltas: dict[str, int]) -> None: ...

    def counters(self, model: str) -> dict[str, int]: ...

    def models(self) -> list[str]: ...

    def memory_bytes(self, model: str) -> int: ...

    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        """The model's value of `field`, set to `value` first if it had none (atomic)."""
        ...

    def meta(self, model: str) -> dict[str, str]: ...

    def put_reference(self, model: str, blob: bytes) -> None:
        """Class means of the last evaluation, for NC4 counted at ingestion."""
        ...

    def reference(self, model: str) -> bytes | None: ...


class BaselineExists(CollapseMonitorError):
    """A baseline of that name is pinned already (pass replace=True to overwrite)."""
