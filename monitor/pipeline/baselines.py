"""Pinned baselines: frozen statistics of a reference period or corpus, stamped for safety.

The stamp (model, vocabulary size, width, statistics options and their hash) is checked on
use, so a baseline of another model or dimension is refused with a clear error instead of
producing meaningless drift numbers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator

import torch
from safetensors.torch import load, save

from monitor.errors import IncompatibleStats, InvalidInput
from monitor.metrics.report import TRAFFIC_STDERR_SUFFIX
from monitor.pipeline.registry import ModelRegistry, ModelShape
from monitor.pipeline.windows import bucket_globals, maintain_model, read_state
from monitor.stats import CollapseStats
from monitor.stats.decayed import DecayedGlobals, is_decayed
from monitor.stats.decayed_read import DecayedView, count_members, presented_chunks
from monitor.stats.fields import GLOBAL_FIELD, Fields, Globals, decode_globals, field_chunks
from monitor.stats.fields import VERSION as STORE_FORMAT
from monitor.stats.rff import BucketSums, bucket_sums
from monitor.store.base import Baseline, Store, window_state
from monitor.store.keys import check_model_name

# Stamp entry: the pinned window's `<key>_traffic_stderr` values by metric key (see
# `_window_stderrs`); the evaluator uses them for the baseline's side of a ratio's stderr.
TRAFFIC_STDERR_META = "traffic_stderr"


def stats_options_hash(shape: ModelShape) -> str:
    """Hash of everything that makes two statistics comparable."""
    options = {
        "vocab_size": shape.vocab_size,
        "dim": shape.dim,
        "second_moment": shape.second_moment,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(
    registry: ModelRegistry, model: str, g: Globals, classes: int, source: str
) -> dict[str, object]:
    shape = registry.shape(model)
    if (g.num_classes, g.dim) != (shape.vocab_size, shape.dim):
        raise IncompatibleStats(
            f"statistics of vocabulary {g.num_classes} x dim {g.dim} do not fit model "
            f"{model!r} ({shape.vocab_size} x {shape.dim})"
        )
    return {
        "model": model,
        "vocab_size": shape.vocab_size,
        "dim": shape.dim,
        "second_moment": g.second_moment,
        "settings_hash": stats_options_hash(shape),
        "source": source,
        "sample_count": g.sample_count,
        "class_count": classes,
        "created": time.time(),
        "store_format": STORE_FORMAT,
    }


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
    chunks = field_chunks(stats)
    g = Globals.decode(next(chunks)[GLOBAL_FIELD])
    meta = _stamp(registry, model, g, stats.touched_classes, source)
    store.pin_baseline(
        model,
        name,
        itertools.chain([{GLOBAL_FIELD: g.encode()}], chunks),
        meta,
        replace=replace,
        calibration=calibration,
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
    """Pin the current state of a rolling window, with its buckets' calibration sums.

    The window's fields are copied chunk by chunk under the state lock, never parsed or held
    whole, so pinning a 4 GB window costs one pass and bounded memory.
    """
    check_model_name(name)
    now = time.time()
    maintain_model(store, model, now)
    state = window_state(window)
    with store.locked(model):
        blob = store.state_field(model, state, GLOBAL_FIELD)
        chunks: Iterator[Fields]
        g: Globals | None
        if blob is not None and is_decayed(blob):
            g, classes, chunks = _presented_window(store, model, state, blob, now)
        else:
            g = decode_globals(blob)
            classes = 0 if g is None else store.state_size(model, state) - g.non_row_fields()
            chunks = (dict(chunk) for chunk in store.scan_state(model, state))
        if g is None or g.sample_count == 0:
            raise InvalidInput(
                "insufficient_data", f"window {window} of {model!r} holds no samples"
            )
        meta = _stamp(registry, model, g, classes, f"window:{window}")
        stderrs = _window_stderrs(store, model, window, seconds, g.sample_count)
        if stderrs:
            meta[TRAFFIC_STDERR_META] = stderrs
        buckets = [
            BucketSums(b.sample_count, torch.from_numpy(b.rff_sum), b.rff_sq)
            for b in bucket_globals(store, model, seconds)
            if b.rff_sum is not None
        ]
        calibration = encode_calibration(buckets) if g.rff is not None and buckets else None
        store.pin_baseline(model, name, chunks, meta, replace=replace, calibration=calibration)
    return meta


def _presented_window(
    store: Store, model: str, state: str, blob: bytes, now: float
) -> tuple[Globals, int, Iterator[Fields]]:
    """A decayed window as the ordinary state it presents at `now` (a baseline stays the data
    it was pinned from, whatever the mode later): two passes, the first for its sample count."""
    view = DecayedView(DecayedGlobals.decode(blob), now, store.policy.decay_min_weight)
    samples, classes = count_members(view, store.scan_state(model, state))
    return (
        view.g.presented(samples),
        classes,
        presented_chunks(view, store.scan_state(model, state), samples),
    )


def _window_stderrs(
    store: Store, model: str, window: str, seconds: int, samples: int
) -> dict[str, float]:
    """The window's latest traffic stderrs, scaled from its evaluated volume to `samples`.

    A pinned baseline keeps no buckets, so its own jackknife can only be had now: the latest
    snapshot of the window being pinned holds it, computed on nearly the same data (at most an
    evaluation interval older; an error falls as 1/sqrt(N), hence the scaling). Nothing when
    that snapshot is missing, not ok, of another length, or older than the window's span.
    """
    text = store.snapshot(model, window)
    try:
        doc = json.loads(text) if text is not None else None
    except ValueError:
        return {}
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return {}
    count, stamp, metrics = doc.get("sample_count"), doc.get("timestamp"), doc.get("metrics")
    if doc.get("window_seconds") != seconds or not isinstance(metrics, dict):
        return {}
    if not isinstance(count, int) or count <= 0 or samples <= 0:
        return {}
    if not isinstance(stamp, int | float) or time.time() - float(stamp) > seconds:
        return {}
    scale = math.sqrt(count / samples)
    return {
        key[: -len(TRAFFIC_STDERR_SUFFIX)]: float(value) * scale
        for key, value in metrics.items()
        if isinstance(key, str)
        and key.endswith(TRAFFIC_STDERR_SUFFIX)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    }


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
    found = checked_baseline(store, registry, model, name)
    stats = read_state(store, model, found.state)
    if stats is None:
        raise InvalidInput("unknown_baseline", f"baseline {name!r} of {model!r} has no data")
    return stats, found.meta


def checked_baseline(store: Store, registry: ModelRegistry, model: str, name: str) -> Baseline:
    """The baseline's stamp, state and calibration (its rows unread), refused when the stamp
    does not match the model now."""
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
    return found
