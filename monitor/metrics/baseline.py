"""What drift needs of a pinned baseline, without holding its K x d class sums.

A baseline of an LLM's vocabulary is as large as a window (4.2 GB at K = 128,256, d = 4,096);
holding both in one evaluator would double its memory. `BaselineSummary` keeps O(K + d + D):
counts per class, the global sum, the total trace and the RFF sums. The one per-class
comparison that needs the baseline's class means (`drift_class_mean_cos` and the top drifting
classes) streams the baseline's rows chunk by chunk (`common_classes_streamed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from monitor.metrics.rows import row_ranges, tile_rows
from monitor.stats import CollapseStats, RFFConfig

_F64 = torch.float64


class ClassRows(Protocol):
    """A chunk of a baseline's class rows (`monitor.stats.fields.Rows` is one)."""

    @property
    def class_ids(self) -> torch.Tensor: ...

    @property
    def counts(self) -> torch.Tensor: ...

    @property
    def sums(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class BaselineSummary:
    num_classes: int
    dim: int
    sample_count: int
    class_ids: torch.Tensor  # (K,) int64, every class with a sample
    counts: torch.Tensor  # (K,) int64
    total_sum: torch.Tensor  # (d,) float64, sum of h over all samples
    total_trace: float  # Tr Sigma_T over all samples (within + between)
    rff: RFFConfig | None
    rff_sum: torch.Tensor | None
    rff_sq: float

    @property
    def touched_classes(self) -> int:
        return int(self.class_ids.numel())

    @classmethod
    def of(cls, stats: CollapseStats) -> BaselineSummary:
        return cls(
            stats.num_classes,
            stats.dim,
            stats.sample_count,
            stats.class_ids.clone(),
            stats.counts.clone(),
            stats.total_sum.clone(),
            total_trace(stats),
            stats.rff,
            None if stats.rff_sum is None else stats.rff_sum.clone(),
            float(stats.rff_sq),
        )


def total_trace(stats: CollapseStats) -> float:
    """Tr Sigma_T over all samples (within + between, to avoid cancelling ||mu||^2).

    Per class terms a tile at a time (the whole-matrix expression made three K x d
    temporaries), then summed over classes in one reduction each.
    """
    if stats.touched_classes == 0:
        return 0.0
    counts = stats.counts.to(_F64)
    n = float(counts.sum())
    sums, sq = stats.sums, stats.sq_norms
    mu = sums.sum(dim=0) / n
    within = torch.empty_like(counts)
    between = torch.empty_like(counts)
    for start, stop in row_ranges(int(counts.numel()), tile_rows(stats.dim)):
        s, c = sums[start:stop], counts[start:stop]
        within[start:stop] = (sq[start:stop] - (s * s).sum(dim=1) / c).clamp_min(0.0)
        between[start:stop] = c * ((s / c.unsqueeze(1) - mu) ** 2).sum(dim=1)
    return float((within.sum() + between.sum()) / n)


Common = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def common_classes_streamed(
    window: CollapseStats, chunks: Iterable[ClassRows], min_count: int
) -> Common:
    """(class ids, window counts, cosine distances, base counts) of the classes with
    `n >= min_count` and a nonzero mean on both sides, sorted by id, from the baseline's rows
    arriving in chunks: the same numbers as comparing two whole mean matrices."""
    dev = window.device
    win = window.classes(min_count)
    parts: list[Common] = []
    for chunk in chunks:
        keep = chunk.counts >= min_count
        if win.num_classes == 0 or not bool(keep.any()):
            continue
        ids = chunk.class_ids[keep].to(dev)
        counts_b = chunk.counts[keep].to(dev)
        pos = torch.searchsorted(win.class_ids, ids).clamp_max(win.num_classes - 1)
        found = win.class_ids[pos] == ids
        if not bool(found.any()):
            continue
        where = pos[found]
        mu_b = chunk.sums[keep][found].to(device=dev, dtype=_F64)
        mu_b = mu_b / counts_b[found].to(_F64).unsqueeze(1)
        cos = torch.empty(int(where.numel()), dtype=_F64, device=dev)
        ok = torch.empty_like(cos, dtype=torch.bool)
        for start, stop in row_ranges(int(where.numel()), tile_rows(window.dim)):
            mu_w = win.take_means(where[start:stop])
            b = mu_b[start:stop]
            norms = mu_w.norm(dim=1) * b.norm(dim=1)
            good = norms > 0
            ok[start:stop] = good
            cos[start:stop] = torch.where(good, (mu_w * b).sum(dim=1) / norms, 0.0)
        parts.append(
            (
                ids[found][ok],
                win.counts[where][ok],
                1.0 - cos[ok].clamp(-1.0, 1.0),
                counts_b[found][ok],
            )
        )
    if not parts:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return empty, empty, torch.empty(0, dtype=_F64, device=dev), empty
    ids, w_counts, dist, b_counts = (torch.cat(p) for p in zip(*parts, strict=True))
    order = torch.argsort(ids)
    return ids[order], w_counts[order], dist[order], b_counts[order]


def mean_shift(window: CollapseStats, base: BaselineSummary) -> float | None:
    """||mu_w - mu_b|| / sqrt(Tr Sigma_T(base)) with sample-weighted global means."""
    n_w = int(window.counts.sum()) if window.touched_classes else 0
    n_b = int(base.counts.sum()) if base.touched_classes else 0
    if n_w == 0 or n_b == 0 or not base.total_trace > 0:
        return None
    mu_w = window.total_sum / n_w
    mu_b = base.total_sum.to(window.device) / n_b
    return float((mu_w - mu_b).norm()) / math.sqrt(base.total_trace)
