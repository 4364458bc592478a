"""From a payload to an immutable per-batch partial: the work of the `ingest` queue.

Validation and rejection counting are torch-free (the API runs them in a core install); the
statistics of a batch load torch on first use, in a worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from monitor.errors import InvalidInput
from monitor.pipeline.payload import FeatureBatch, TimeBounds, claimed_rows, decode_batch
from monitor.pipeline.registry import ModelRegistry
from monitor.pipeline.tracking import TrackedClasses
from monitor.stats.checks import check_arrays
from monitor.store.base import Store, TrackedCounts
from monitor.store.keys import UNKNOWN_MODEL

if TYPE_CHECKING:
    from monitor.stats import CollapseStats

log = logging.getLogger(__name__)

__all__ = [
    "MAX_COUNTED_ROWS",
    "UNKNOWN_MODEL",
    "IngestResult",
    "Ingestor",
    "count_rejection",
    "partial_stats",
    "store_partial",
]

# No counter write adds more rows than this, whatever a caller passes (no real message holds
# that many): Redis's int64 counters must never be pushed to overflow, after which they refuse
# every later increment.
MAX_COUNTED_ROWS = 2**32


@dataclass(frozen=True)
class IngestResult:
    model: str
    batch_id: str
    samples: int
    stored: bool  # False: the batch id was seen before (a redelivery), nothing was added


def partial_stats(
    batch: FeatureBatch, registry: ModelRegistry, store: Store, keep: np.ndarray | None = None
) -> CollapseStats:
    """Statistics of one batch that `Ingestor.validate` accepted; with `keep` (a capped model's
    tracked samples), of those samples only, NC4 counts as sent.

    Only validated batches get here: the first batch a store sees proposes the model's RFF
    bandwidth, kept forever (the registry checks its sample once more); that sample is the
    whole batch, so the cap does not change the bandwidth.
    """
    from monitor.stats.validation import CheckedBatch

    shape = registry.shape(batch.model)
    checked = CheckedBatch.of_checked_arrays(
        batch.features, batch.labels, dim=shape.dim, num_classes=shape.vocab_size
    )
    stats = registry.new_stats(batch.model, store, checked.features)
    if keep is not None:
        checked = CheckedBatch.of_checked_arrays(
            batch.features[keep], batch.labels[keep], dim=shape.dim, num_classes=shape.vocab_size
        )
    stats.add_checked(checked)
    if batch.nc4_total:
        stats.record_nc4(batch.nc4_hits, batch.nc4_total)
    return stats


def store_partial(
    store: Store,
    model: str,
    batch_id: str,
    ts: float,
    stats: CollapseStats,
    tracked: TrackedCounts | None = None,
) -> IngestResult:
    """Write the partial once under `batch_id`, with a capped model's class frequencies and
    untracked samples in the same step; a repeat (redelivery) only counts a duplicate."""
    from monitor.stats.fields import to_fields

    samples = stats.sample_count
    stored = store.put_partial(model, batch_id, to_fields(stats), ts, samples, tracked=tracked)
    return IngestResult(model, batch_id, samples, stored)


def count_rejection(store: Store, model: object, reason: str, samples: int) -> None:
    """Rejected samples by reason, under the model when it is a declared one; at least 1 (a
    refusal is always visible), at most `MAX_COUNTED_ROWS`."""
    owner = model if isinstance(model, str) else UNKNOWN_MODEL
    store.add_counters(owner, {f"rejected:{reason}": min(max(samples, 1), MAX_COUNTED_ROWS)})


class Ingestor:
    """Decode, validate, summarise and store one payload; bad input is counted, then re-raised."""

    def __init__(
        self,
        store: Store,
        registry: ModelRegistry,
        *,
        max_samples: int,
        max_bytes: int,
        tracked_refresh_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        # The tracked classes of models with max_tracked_classes, read again this often.
        self.tracked = TrackedClasses(store, tracked_refresh_seconds)

    @property
    def times(self) -> TimeBounds:
        """Sample times this store can still hold (`max_clock_skew_seconds`, the windows)."""
        return TimeBounds(self.registry.max_clock_skew, self.store.policy)

    def validate(self, payload: object, now: float | None = None) -> FeatureBatch:
        """Every check a feature payload passes before it is accepted: decoding, time bounds,
        the model's shape, values and labels. The worker runs it on every message; a front
        door (the HTTP API) calls it to answer with the same reason before queueing. Raises
        `InvalidInput`; counts nothing."""
        batch = decode_batch(
            payload,
            max_samples=self.max_samples,
            max_bytes=self.max_bytes,
            times=self.times,
            now=time.time() if now is None else now,
        )
        shape = self.registry.shape(batch.model)
        if batch.features.shape[1] != shape.dim:
            raise InvalidInput(
                "wrong_dimension",
                f"features have dimension {batch.features.shape[1]}, model {batch.model!r} has "
                f"{shape.dim}",
            )
        check_arrays(batch.features, batch.labels, dim=shape.dim, num_classes=shape.vocab_size)
        return batch

    def ingest(self, payload: object, now: float | None = None) -> IngestResult:
        """Validate (time bounds at `now`, the clock by default: a simulation passes its own),
        summarise and store one payload; a refusal is counted, then re-raised.

        A model with `max_tracked_classes` keeps the samples of its tracked classes only
        (`monitor.pipeline.tracking`); a batch with none of them still stores its partial (no
        rows, its NC4 counts), so its id, frequencies and counters are recorded exactly once.
        """
        model: object = payload.get("model") if isinstance(payload, dict) else None
        try:
            batch = self.validate(payload, now)
            cap = self.registry.spec(batch.model).max_tracked_classes
            keep, tracked = None, None
            if cap is not None:
                keep, tracked = self.tracked.select(batch.model, cap, batch.labels)
            stats = partial_stats(batch, self.registry, self.store, keep)
        except InvalidInput as exc:
            known = isinstance(model, str) and model in self.registry.names
            count_rejection(self.store, model if known else None, exc.reason, claimed_rows(payload))
            log.warning("rejected batch (%s): %s", exc.reason, exc)
            raise
        return store_partial(self.store, batch.model, batch.batch_id, batch.ts, stats, tracked)
