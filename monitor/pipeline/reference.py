"""The class means that NC4 at ingestion compares against: written by the evaluator, read by
the embed workers (a safetensors blob of class ids and means; no pickle)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from monitor.store.base import Store

_REFRESH_SECONDS = 60.0
_cache: dict[str, tuple[float, Any]] = {}
_lock = threading.Lock()


def encode_reference(class_ids: torch.Tensor, means: torch.Tensor) -> bytes:
    return save(
        {
            "class_ids": class_ids.to("cpu", torch.int64).contiguous(),
            "means": means.to("cpu", torch.float64).contiguous(),
        }
    )


def decode_reference(blob: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(class_ids, means), or None for a blob that is not a valid reference."""
    try:
        arrays = load(blob)
    except SafetensorError:
        return None
    ids, means = arrays.get("class_ids"), arrays.get("means")
    if ids is None or means is None or means.ndim != 2 or ids.shape[0] != means.shape[0]:
        return None
    return ids, means


def nc4_reference(store: Store, model: str, lm: Any) -> Any:
    """An `NC4Reference` for the model's head from the last evaluation (refreshed each minute),
    or None before the first evaluation."""
    from monitor.capture.sinks import NC4Reference

    now = time.monotonic()
    with _lock:
        cached = _cache.get(model)
        if cached is not None and now - cached[0] < _REFRESH_SECONDS:
            return cached[1]
    blob = store.reference(model)
    decoded = None if blob is None else decode_reference(blob)
    reference = None
    if decoded is not None:
        reference = NC4Reference.from_head(lm.get_output_embeddings(), decoded[0], decoded[1])
    with _lock:
        _cache[model] = (now, reference)
    return reference
