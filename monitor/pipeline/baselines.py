"""Pinned baselines: frozen statistics of a reference period or corpus, stamped for safety.

The stamp (model, vocabulary size, width, statistics options and their hash) is checked on
use, so a baseline of another model or dimension is refused with a clear error instead of
producing meaningless drift numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable

import torch
from safetensors.torch import load, save

from monitor.errors import IncompatibleStats, InvalidInput
from monitor.metrics.drift import BucketSums, bucket_sums
from monitor.pipeline.registry import ModelRegistry, ModelShape
from monitor.pipeline.windows import window_buckets
from monitor.stats import CollapseStats
from monitor.store.base import Store
from monitor.store.keys import check_model_name


def stats_options_hash(shape: ModelShape) -> str:
    """Hash of everything that makes two statistics comparable."""
    options = {
        "vocab_size": shape.vocab_size,
        "dim": shape.dim,
        "second_moment": shape.second_moment,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def pin_stats(
    store: Store,
    registry: ModelRegistry,
    model: str,
    name: str,
    stats: CollapseStats,
    *,
    source: str,
    replace: bool = False,
    calibration: bytes | None = None,
) -> dict[str, object]:
    """Pin `stats` as baseline `name` of `model`; returns its stamp."""
    check_model_name(name)
    shape = registry.shape(model)
    if (stats.num_classes, stats.dim) != (shape.vocab_size, shape.dim):
        raise IncompatibleStats(
            f"statistics of vocabulary {stats.num_classes} x dim {stats.dim} do not fit model "
            f"{model!r} ({shape.vocab_size} x {shape.dim})"
        )
    meta: dict[str, object] = {
        "model": model,
        "vocab_size": shape.vocab_size,
        "dim": shape.dim,
        "second_moment": stats.has_second_moment,
        "settings_hash": stats_options_hash(shape),
        "source": source,
        "sample_count": stats.sample_count,
        "class_count": stats.touched_classes,
        "created": time.time(),
    }
    store.pin_baseline(
        model, name, stats.to_bytes(), meta, replace=replace, calibration=calibration
    )
    return meta


def pin_window(
    store: Store,
    registry: ModelRegistry,
    model: str,
    name: str,
    window: str,
    seconds: int,
    *,
    replace: bool = False,
) -> dict[str, object]:
    """Pin the current statistics of a rolling window, with its buckets' calibration sums."""
    parts = window_buckets(store, model, seconds)
    if not parts or sum(p.sample_count for p in parts) == 0:
        raise InvalidInput("insufficient_data", f"window {window} of {model!r} holds no samples")
    with_rff = all(p.rff_sum is not None for p in parts)
    calibration = encode_calibration([bucket_sums(p) for p in parts]) if with_rff else None
    return pin_stats(
        store,
        registry,
        model,
        name,
        CollapseStats.merged(parts),
        source=f"window:{window}",
        replace=replace,
        calibration=calibration,
    )


def pin_batches(
    store: Store,
    registry: ModelRegistry,
    model: str,
    name: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    source: str,
    replace: bool = False,
    parts: int = 16,
) -> dict[str, object]:
    """Pin the statistics of saved features or a corpus run, streamed as (features, labels).

    Batches are dealt round-robin into `parts` statistics that stand in for time buckets when
    the MMD threshold is calibrated, so a corpus baseline gets a threshold like a window's.
    """
    slices: list[CollapseStats] = []
    for i, (features, labels) in enumerate(batches):
        if len(slices) < parts:
            slices.append(registry.new_stats(model, store, features))
        slices[i % parts].update(features, labels)
    if not slices:
        raise InvalidInput("insufficient_data", f"no samples to pin as baseline {name!r}")
    with_rff = all(s.rff_sum is not None and s.sample_count >= 2 for s in slices)
    calibration = encode_calibration([bucket_sums(s) for s in slices]) if with_rff else None
    return pin_stats(
        store,
        registry,
        model,
        name,
        CollapseStats.merged(slices),
        source=source,
        replace=replace,
        calibration=calibration,
    )


def encode_calibration(buckets: list[BucketSums]) -> bytes:
    """Per-bucket RFF sums of a baseline, kept beside it to calibrate the MMD threshold."""
    return save(
        {
            "counts": torch.tensor([b.count for b in buckets], dtype=torch.int64),
            "sums": torch.stack([b.rff_sum.cpu().to(torch.float64) for b in buckets]),
            "sq": torch.tensor([b.rff_sq for b in buckets], dtype=torch.float64),
        }
    )


def decode_calibration(blob: bytes | None) -> list[BucketSums]:
    if blob is None:
        return []
    arrays = load(blob)
    return [
        BucketSums(int(n), s, float(q))
        for n, s, q in zip(arrays["counts"], arrays["sums"], arrays["sq"], strict=True)
    ]


def load_baseline(
    store: Store, registry: ModelRegistry, model: str, name: str
) -> tuple[CollapseStats, dict[str, object]]:
    """The baseline's statistics, refused when its stamp does not match the model now."""
    found = store.baseline(model, name)
    if found is None:
        raise InvalidInput("unknown_baseline", f"no baseline {name!r} pinned for {model!r}")
    shape = registry.shape(model)
    meta = found.meta
    expected = {"model": model, "vocab_size": shape.vocab_size, "dim": shape.dim}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise IncompatibleStats(
                f"baseline {name!r} was pinned for {key}={meta.get(key)!r}, "
                f"but {model!r} now has {key}={value!r}"
            )
    if meta.get("settings_hash") != stats_options_hash(shape):
        raise IncompatibleStats(
            f"baseline {name!r} was pinned under other statistics settings; pin it again"
        )
    return CollapseStats.from_bytes(found.blob), meta
