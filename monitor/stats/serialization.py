"""Pickle-free, versioned bytes for `CollapseStats`: a safetensors container.

safetensors is a JSON header plus raw little-endian arrays, readable from any language, and
its loader never executes code. Our header metadata carries the format name, version, shape
parameters and scalar counters; every field is checked on load, so a truncated, foreign or
inconsistent blob is refused with `IncompatibleStats` instead of poisoning a merge. Rows are
written in class-id order, so equal statistics give equal bytes.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from monitor.errors import IncompatibleStats
from monitor.stats.collapse_stats import CollapseStats
from monitor.stats.rff import RFFConfig
from monitor.stats.validation import all_finite

FORMAT = "collapse-stats"
VERSION = 1
_F64 = torch.float64
_META_KEY = "collapse_stats"


def stats_to_bytes(stats: CollapseStats) -> bytes:
    rows = stats.classes(min_count=1)
    tensors = {
        "class_ids": rows.class_ids.cpu().contiguous(),
        "counts": rows.counts.cpu().contiguous(),
        "sums": rows.sums.cpu().contiguous(),
        "sq_norms": rows.sq_norms.cpu().contiguous(),
        "unit_sum": stats.unit_sum.cpu().contiguous(),
    }
    if stats.second is not None:
        tensors["second"] = stats.second.cpu().contiguous()
    if stats.rff_sum is not None:
        tensors["rff_sum"] = stats.rff_sum.cpu().contiguous()
    header: dict[str, object] = {
        "num_classes": stats.num_classes,
        "dim": stats.dim,
        "second_moment": stats.has_second_moment,
        "sample_count": stats.sample_count,
        "unit_count": stats.unit_count,
        "nc4_hits": stats.nc4_hits,
        "nc4_total": stats.nc4_total,
        "rff": None if stats.rff is None else stats.rff.to_json(),
        "rff_sq": stats.rff_sq,
    }
    header = {"format": FORMAT, "version": VERSION, **header}
    # One metadata entry: safetensors keeps metadata in a hash map whose order varies between
    # calls, and equal statistics must give equal bytes.
    return save(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(blob) < 8:
        raise IncompatibleStats("not a collapse-stats blob: shorter than 8 bytes")
    length = int.from_bytes(blob[:8], "little")
    if length > len(blob) - 8:
        raise IncompatibleStats("not a collapse-stats blob: header runs past the end")
    try:
        header = json.loads(blob[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IncompatibleStats(f"not a collapse-stats blob: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise IncompatibleStats("not a collapse-stats blob: no metadata")
    return meta


def stats_from_bytes(blob: bytes, *, device: str | torch.device = "cpu") -> CollapseStats:
    """Rebuild statistics from `stats_to_bytes` output, checking every field."""
    meta = _metadata(bytes(blob))
    try:
        header = json.loads(meta[_META_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleStats("not a collapse-stats blob: no collapse_stats metadata") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IncompatibleStats("not a collapse-stats blob: wrong format name")
    if header.get("version") != VERSION:
        raise IncompatibleStats(
            f"collapse-stats version {header.get('version')!r} is not supported "
            f"(this release reads version {VERSION})"
        )
    try:
        num_classes, dim = int(header["num_classes"]), int(header["dim"])
        second_moment = bool(header["second_moment"])
        rff = None if header.get("rff") is None else RFFConfig.from_json(header["rff"])
        rff_sq = float(header.get("rff_sq", 0.0))
        counters = {
            k: int(header[k]) for k in ("sample_count", "unit_count", "nc4_hits", "nc4_total")
        }
        tensors = load(bytes(blob))
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise IncompatibleStats(f"corrupt collapse-stats blob: {exc}") from exc
    if num_classes < 1 or dim < 1:
        raise IncompatibleStats(
            f"corrupt collapse-stats blob: num_classes={num_classes}, dim={dim}"
        )

    ids = _get(tensors, "class_ids", torch.int64, None)
    k = int(ids.numel())
    expected = {
        "counts": (torch.int64, (k,)),
        "sums": (_F64, (k, dim)),
        "sq_norms": (_F64, (k,)),
        "unit_sum": (_F64, (dim,)),
    }
    if second_moment:
        expected["second"] = (_F64, (dim, dim))
    if rff is not None:
        if rff.dim != dim:
            raise IncompatibleStats("corrupt collapse-stats blob: RFF dimension differs")
        expected["rff_sum"] = (_F64, (rff.features,))
    if not (math.isfinite(rff_sq) and rff_sq >= 0):
        raise IncompatibleStats("corrupt collapse-stats blob: invalid rff_sq")
    arrays = {name: _get(tensors, name, dt, shape) for name, (dt, shape) in expected.items()}
    extra = set(tensors) - set(expected) - {"class_ids"}
    if extra:
        raise IncompatibleStats(f"corrupt collapse-stats blob: unexpected arrays {sorted(extra)}")
    counts = arrays["counts"]
    if k and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise IncompatibleStats("corrupt collapse-stats blob: class id outside the vocabulary")
    if k > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise IncompatibleStats("corrupt collapse-stats blob: class ids not strictly increasing")
    if k and int(counts.min()) < 1:
        raise IncompatibleStats("corrupt collapse-stats blob: a class row with no samples")
    if int(counts.sum()) != counters["sample_count"]:
        raise IncompatibleStats("corrupt collapse-stats blob: class counts do not sum to N")
    if not (0 <= counters["nc4_hits"] <= counters["nc4_total"]):
        raise IncompatibleStats("corrupt collapse-stats blob: invalid NC4 counts")
    if not (0 <= counters["unit_count"] <= counters["sample_count"]):
        raise IncompatibleStats("corrupt collapse-stats blob: invalid unit count")
    for name, value in arrays.items():
        if not all_finite(value):
            raise IncompatibleStats(f"corrupt collapse-stats blob: non-finite values in {name}")

    stats = CollapseStats(num_classes, dim, second_moment=second_moment, rff=rff, device=device)
    stats._load_rows(ids, counts, arrays["sums"], arrays["sq_norms"])
    stats.unit_sum = arrays["unit_sum"].to(device)
    if second_moment:
        stats.second = arrays["second"].to(device)
    if rff is not None:
        stats.rff_sum = arrays["rff_sum"].to(device)
        stats.rff_sq = rff_sq
    stats.sample_count = counters["sample_count"]
    stats.unit_count = counters["unit_count"]
    stats.nc4_hits = counters["nc4_hits"]
    stats.nc4_total = counters["nc4_total"]
    return stats


def _get(
    tensors: dict[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...] | None,
) -> torch.Tensor:
    if name not in tensors:
        raise IncompatibleStats(f"corrupt collapse-stats blob: array {name!r} missing")
    t = tensors[name]
    if t.dtype != dtype:
        raise IncompatibleStats(f"corrupt collapse-stats blob: {name} has dtype {t.dtype}")
    if shape is None and t.ndim != 1:
        raise IncompatibleStats(f"corrupt collapse-stats blob: {name} must be 1-D")
    if shape is not None and tuple(t.shape) != shape:
        raise IncompatibleStats(
            f"corrupt collapse-stats blob: {name} has shape {tuple(t.shape)}, expected {shape}"
        )
    return t
