"""Random Fourier features: a fixed, seeded map whose sums estimate Gaussian-kernel MMD.

`phi(h) = sqrt(2/D) cos(W h + b)` with rows of W drawn from N(0, I / sigma^2) and b uniform in
[0, 2 pi), so `phi(x) . phi(y)` approximates `exp(-||x - y||^2 / (2 sigma^2))` (Rahimi & Recht
2007). With several bandwidths the D features are split evenly between them, approximating the
mean of their kernels. The map is rebuilt from its config alone, so the baseline and every
window of a model use exactly the same features without shipping the matrix around.

The projection runs in float32 (float64 made the features 10x the cost of the rest of an
update), which has two edges: inputs must fit float32 (`validation.check_values` refuses the
rest), and a sum of in-range products can still overflow it (3e38 in every coordinate). Rows
whose float32 projection is not finite are projected again in float64, where any float32-range
input with a bandwidth in `BANDWIDTH_RANGE` stays finite, so `phi` is always finite: the cost
of float64 is paid only by the rows that need it. Bandwidths are bounded so that
`omega = N(0, 1) / sigma` is a normal float32 number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

# The map's configuration is torch-free (the store's globals carry it); re-exported here.
from monitor.stats.rff_config import BANDWIDTH_RANGE, RFFConfig, valid_bandwidth
from monitor.stats.validation import all_finite

if TYPE_CHECKING:
    from monitor.stats.collapse_stats import CollapseStats

__all__ = [
    "BANDWIDTH_RANGE",
    "BucketSums",
    "RFFConfig",
    "bucket_sums",
    "median_bandwidth",
    "rff_features",
    "valid_bandwidth",
]

_F64 = torch.float64
_F32 = torch.float32


@lru_cache(maxsize=16)
def _weights(
    config: RFFConfig, device: str, dtype: torch.dtype = _F32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(omega, phase) drawn in float64 from the seed, then cast: one map in every dtype."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    omega = torch.randn(config.features, config.dim, generator=gen, dtype=_F64)
    groups = torch.arange(config.features) * len(config.bandwidths) // config.features
    scale = torch.tensor(config.bandwidths, dtype=_F64)[groups]
    omega /= scale.unsqueeze(1)
    phase = torch.rand(config.features, generator=gen, dtype=_F64) * (2 * math.pi)
    return omega.to(device, dtype), phase.to(device, dtype)


def rff_features(x: torch.Tensor, config: RFFConfig) -> torch.Tensor:
    """phi(x) for rows of x, (N, D) float32 on x's device, finite for float32-range input.

    Sums are accumulated in float64 by the caller.
    """
    omega, phase = _weights(config, str(x.device))
    projected = torch.addmm(phase, x.to(_F32), omega.T)
    phi = torch.cos(projected)
    if not all_finite(projected):  # the float32 sum overflowed: redo those rows in float64
        bad = (~torch.isfinite(projected)).any(dim=1)
        omega64, phase64 = _weights(config, str(x.device), _F64)
        phi[bad] = torch.cos(torch.addmm(phase64, x[bad].to(_F64), omega64.T)).to(_F32)
    return phi * math.sqrt(2.0 / config.features)


def median_bandwidth(x: torch.Tensor, *, max_samples: int = 1000, seed: int = 0) -> float:
    """The median heuristic: median pairwise distance of (a seeded subsample of) rows of x."""
    n = int(x.shape[0])
    if n < 2:
        raise ValueError("the median heuristic needs at least two samples")
    if n > max_samples:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = x[torch.randperm(n, generator=gen)[:max_samples].to(x.device)]
    d = torch.cdist(x.to(_F64), x.to(_F64))
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    median = float(upper.median())
    if not median > 0:
        raise ValueError("all sampled rows are identical: no bandwidth can be chosen")
    return median


@dataclass(frozen=True)
class BucketSums:
    """The random-Fourier-feature sums of one time bucket of a baseline: the MMD calibration
    (`monitor.metrics.mmd`) reads them, the pipeline stores them beside each baseline."""

    count: int
    rff_sum: torch.Tensor  # (D,) float64, sum of phi(h)
    rff_sq: float  # sum of ||phi(h)||^2


def bucket_sums(stats: CollapseStats) -> BucketSums:
    """The RFF sums of `stats`; raises ValueError when it has none."""
    if stats.rff_sum is None:
        raise ValueError("these statistics carry no random Fourier feature sums")
    return BucketSums(stats.sample_count, stats.rff_sum.detach().clone().to(_F64), stats.rff_sq)
