"""The class means that NC4 at ingestion compares against: written by the evaluator, read by
the embed workers (a safetensors blob of class ids and means; no pickle)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from monitor.stats import ClassStatistics
from monitor.store.base import NC4_MEANS_STATE, Store

_REFRESH_SECONDS = 60.0
_cache: dict[str, tuple[float, Any]] = {}
_lock = threading.Lock()


_CHUNK_BYTES = 32 * 2**20  # one field of means stays far below the 64 MB value limit


def encode_nc4_means(kept: ClassStatistics, dim: int) -> Iterator[dict[bytes, bytes]]:
    """The class means as fields `<j>`: safetensors blocks of class ids and their means, each
    under 32 MB, so the means of 128k classes at d = 4,096 (4.2 GB) is stored split. The
    means are computed block by block from the sums, never as a whole second K x d matrix."""
    ids = kept.class_ids.to("cpu", torch.int64)
    rows = max(1, _CHUNK_BYTES // (8 * max(dim, 1)))
    for j, start in enumerate(range(0, int(ids.numel()), rows)):
        stop = min(start + rows, int(ids.numel()))
        means = kept.mean_tile(start, stop).to("cpu", torch.float64)
        block = {"class_ids": ids[start:stop].contiguous(), "means": means.contiguous()}
        yield {str(j).encode(): save(block)}


def load_nc4_means(store: Store, model: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(class_ids, means) of the last evaluation, or None before one (or when unreadable)."""
    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with store.locked(model):
        for chunk in store.scan_state(model, NC4_MEANS_STATE):
            for name, blob in chunk:
                decoded = _decode_block(blob)
                if decoded is None or not name.isdigit():
                    return None
                blocks[int(name)] = decoded
    if not blocks:
        return None
    ordered = [blocks[j] for j in sorted(blocks)]
    return torch.cat([i for i, _ in ordered]), torch.cat([m for _, m in ordered])


def _decode_block(blob: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        arrays = load(blob)
    except SafetensorError:
        return None
    ids, means = arrays.get("class_ids"), arrays.get("means")
    if ids is None or means is None or means.ndim != 2 or ids.shape[0] != means.shape[0]:
        return None
    return ids, means


def nc4_means_head(store: Store, model: str, lm: Any) -> Any:
    """An `NC4Reference` for the model's head from the last evaluation (refreshed each minute),
    or None before the first evaluation."""
    from monitor.capture.sinks import NC4Reference

    now = time.monotonic()
    with _lock:
        cached = _cache.get(model)
        if cached is not None and now - cached[0] < _REFRESH_SECONDS:
            return cached[1]
    decoded = load_nc4_means(store, model)
    reference = None
    if decoded is not None:
        reference = NC4Reference.from_head(lm.get_output_embeddings(), decoded[0], decoded[1])
    with _lock:
        _cache[model] = (now, reference)
    return reference
