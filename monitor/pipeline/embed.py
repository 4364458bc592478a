"""The `embed` queue's work: mirrored texts or token ids -> hidden states -> one partial.

Each worker process loads each model once and keeps it; the forward pass runs on the
model's configured device (the GPU a worker is pinned to with CUDA_VISIBLE_DEVICES). Parsing a
text payload is torch-free: the API checks one in a core install and queues it here.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.errors import InvalidInput
from monitor.pipeline.ingest import IngestResult, count_rejection, store_partial
from monitor.pipeline.payload import SCHEMA_VERSION, TimeBounds, check_timestamp
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.tracking import label_counts
from monitor.store.base import TrackedCounts
from monitor.store.keys import check_batch_id, check_model_name

if TYPE_CHECKING:
    from monitor.stats import CollapseStats

_models: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_models_lock = threading.Lock()


def loaded_model(runtime: Runtime, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a declared checkpoint, loaded once per process and checkpoint."""
    spec = runtime.registry.spec(name)
    if spec.checkpoint is None:
        raise InvalidInput(
            "no_checkpoint", f"model {name!r} is features-only: it has no checkpoint"
        )
    key = (spec.checkpoint, spec.device, spec.dtype)
    with _models_lock:
        if key not in _models:
            from monitor.capture.mirror import load_model

            _models[key] = load_model(
                spec.checkpoint, device=spec.device, dtype=_torch_dtype(spec.dtype)
            )
        return _models[key]


def is_loaded(runtime: Runtime, name: str) -> bool:
    """Whether this process holds the model already (then its head costs nothing more)."""
    spec = runtime.registry.spec(name)
    with _models_lock:
        return (spec.checkpoint, spec.device, spec.dtype) in _models


def _torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput("invalid_dtype", f"unknown torch dtype {name!r}")
    return dtype


def parse_text_payload(
    payload: object,
    max_items: int,
    max_bytes: int,
    times: TimeBounds | None = None,
    now: float | None = None,
) -> tuple[str, str, float, list[Any]]:
    """(model, batch_id, ts, texts or token-id lists) after checking the text payload.

    `ts` passes the same `check_timestamp` as a feature payload's: an unchecked inf once
    stalled compaction for good, and a NaN failed the store's script after it had written the
    seen marker and the partial (an orphan partial, a burned batch id).
    """
    if not isinstance(payload, dict) or payload.get("v") != SCHEMA_VERSION:
        raise InvalidInput(
            "malformed_payload", f"text payload must be a map with v={SCHEMA_VERSION}"
        )
    model, batch_id = payload.get("model"), payload.get("batch_id")
    if not isinstance(model, str) or not isinstance(batch_id, str):
        raise InvalidInput("malformed_payload", "payload needs string 'model' and 'batch_id'")
    check_model_name(model)
    check_batch_id(batch_id)
    now = time.time() if now is None else now
    ts = check_timestamp(payload.get("ts", now), times, now)
    texts, ids = payload.get("texts"), payload.get("token_ids")
    if (texts is None) == (ids is None):
        raise InvalidInput("malformed_payload", "give exactly one of 'texts' and 'token_ids'")
    items = texts if texts is not None else ids
    if not isinstance(items, list) or not items:
        raise InvalidInput("empty_batch", "no texts or token ids to embed")
    if len(items) > max_items:
        raise InvalidInput("oversized_batch", f"{len(items)} items exceed the limit of {max_items}")
    if texts is not None:
        if not all(isinstance(t, str) for t in items):
            raise InvalidInput("malformed_payload", "'texts' must be a list of strings")
        size = sum(len(t.encode()) for t in items)
    else:
        if not all(
            isinstance(seq, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in seq)
            for seq in items
        ):
            raise InvalidInput("malformed_payload", "'token_ids' must be a list of integer lists")
        size = 8 * sum(len(seq) for seq in items)
    if size > max_bytes:
        raise InvalidInput("oversized_payload", f"payload of {size} bytes exceeds {max_bytes}")
    return model, batch_id, ts, items


def check_token_ids(sequences: list[list[int]], vocab: int) -> None:
    """Token ids within the model's vocabulary, refused as `token_out_of_range` (the HTTP
    API's reason) before a forward pass could index outside the embedding."""
    for seq in sequences:
        if seq and (min(seq) < 0 or max(seq) >= vocab):
            raise InvalidInput("token_out_of_range", f"token ids must lie in [0, {vocab})")


def _items(payload: object) -> int:
    """Texts or sequences a refused payload carried, for the rejection counter (at least 1)."""
    if isinstance(payload, dict):
        for key in ("texts", "token_ids"):
            if isinstance(payload.get(key), list):
                return max(len(payload[key]), 1)
    return 1


def embed_payload(runtime: Runtime, payload: object) -> IngestResult:
    settings = runtime.settings
    owner = payload.get("model") if isinstance(payload, dict) else None
    try:
        model, batch_id, ts, items = parse_text_payload(
            payload,
            settings.max_batch_samples,
            settings.max_payload_bytes,
            times=runtime.ingestor.times,
        )
        lm, tokenizer = loaded_model(runtime, model)
        if isinstance(payload, dict) and "token_ids" in payload:
            check_token_ids(items, runtime.registry.shape(model).vocab_size)
        from monitor.capture.mirror import embed_batches
        from monitor.pipeline.nc4_means import nc4_means_head

        stats: CollapseStats | None = None
        reference = nc4_means_head(runtime.store, model, lm)
        cap = runtime.registry.spec(model).max_tracked_classes
        labels: list[np.ndarray] = []  # every label, for a capped model's class frequencies
        for batch in embed_batches(lm, tokenizer, items, batch_size=8, reference=reference):
            if stats is None:
                stats = runtime.registry.new_stats(model, runtime.store, batch.features)
            features, batch_labels = batch.features, batch.labels
            if cap is not None:  # as Ingestor.ingest: untracked classes' samples, dropped whole
                labels.append(batch_labels.numpy())
                keep = runtime.ingestor.tracked.keep(model, cap, labels[-1])
                features, batch_labels = features[keep], batch_labels[keep]
            stats.update(features, batch_labels)
            if batch.nc4_total:
                stats.record_nc4(batch.nc4_hits, batch.nc4_total)
        if stats is None or (stats.sample_count == 0 and not labels):
            raise InvalidInput("empty_batch", "no labelled positions: every text is under 2 tokens")
    except InvalidInput as exc:
        known = isinstance(owner, str) and owner in runtime.registry.names
        count_rejection(runtime.store, owner if known else None, exc.reason, _items(payload))
        raise
    tracked = None
    if labels:
        every = np.concatenate(labels)
        tracked = TrackedCounts(label_counts(every), int(every.size - stats.sample_count))
    return store_partial(runtime.store, model, batch_id, ts, stats, tracked)
