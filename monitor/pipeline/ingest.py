"""From a payload to an immutable per-batch partial: the work of the `ingest` queue."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from monitor.errors import InvalidInput
from monitor.pipeline.payload import FeatureBatch, decode_batch
from monitor.pipeline.registry import ModelRegistry
from monitor.stats import CollapseStats
from monitor.stats.fields import to_fields
from monitor.stats.validation import check_batch
from monitor.store.base import Store

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"  # counter owner for rejections that name no declared model


@dataclass(frozen=True)
class IngestResult:
    model: str
    batch_id: str
    samples: int
    stored: bool  # False: the batch id was seen before (a redelivery), nothing was added


def partial_stats(batch: FeatureBatch, registry: ModelRegistry, store: Store) -> CollapseStats:
    """Statistics of one batch; raises `InvalidInput` for a batch that does not fit the model."""
    shape = registry.shape(batch.model)
    if batch.features.shape[1] != shape.dim:  # before the features are used for anything
        raise InvalidInput(
            "wrong_dimension",
            f"features have dimension {batch.features.shape[1]}, model {batch.model!r} has "
            f"{shape.dim}",
        )
    # Every check before new_stats: the first batch a store sees proposes the model's RFF
    # bandwidth (kept forever), so a refused batch must never get that far.
    features, _ = check_batch(
        batch.features, batch.labels, dim=shape.dim, num_classes=shape.vocab_size
    )
    stats = registry.new_stats(batch.model, store, features)
    stats.update(features, batch.labels)
    if batch.nc4_total:
        stats.record_nc4(batch.nc4_hits, batch.nc4_total)
    return stats


def store_partial(
    store: Store, model: str, batch_id: str, ts: float, stats: CollapseStats
) -> IngestResult:
    """Write the partial once under `batch_id`; a repeat (redelivery) only counts a duplicate."""
    samples = stats.sample_count
    stored = store.put_partial(model, batch_id, to_fields(stats), ts, samples)
    return IngestResult(model, batch_id, samples, stored)


def count_rejection(store: Store, model: object, reason: str, samples: int) -> None:
    """Rejected samples by reason, under the model when it is a declared one."""
    owner = model if isinstance(model, str) else UNKNOWN_MODEL
    store.add_counters(owner, {f"rejected:{reason}": max(samples, 1)})


class Ingestor:
    """Decode, validate, summarise and store one payload; bad input is counted, then re-raised."""

    def __init__(
        self, store: Store, registry: ModelRegistry, *, max_samples: int, max_bytes: int
    ) -> None:
        self.store = store
        self.registry = registry
        self.max_samples = max_samples
        self.max_bytes = max_bytes

    def ingest(self, payload: object) -> IngestResult:
        model: object = payload.get("model") if isinstance(payload, dict) else None
        try:
            batch = decode_batch(payload, max_samples=self.max_samples, max_bytes=self.max_bytes)
            if batch.model not in self.registry.names:
                model = None  # unknown names must not create per-model keys
            stats = partial_stats(batch, self.registry, self.store)
        except InvalidInput as exc:
            samples = min(_claimed_samples(payload), self.max_samples)
            owner = model if isinstance(model, str) and model in self.registry.names else None
            count_rejection(self.store, owner, exc.reason, samples)
            log.warning("rejected batch (%s): %s", exc.reason, exc)
            raise
        return store_partial(self.store, batch.model, batch.batch_id, batch.ts, stats)


def _claimed_samples(payload: object) -> int:
    """How many samples a refused payload claimed to carry, for the rejection counter."""
    try:
        shape = payload["labels"]["shape"]  # type: ignore[index]
        return int(shape[0]) if isinstance(shape[0], int) else 1
    except (KeyError, TypeError, IndexError):
        return 1
