"""Metrics of the space itself (anisotropy, effective rank) and NC1's trace ratio.

They need global sums only: the unit-vector sum for anisotropy, and the d x d second moment
`S = sum h h^T` for the covariance-based ones (None without it).
"""

from __future__ import annotations

import torch

from monitor.metrics.rows import ClassMeans, row_ranges, tile_rows
from monitor.stats import ClassStatistics, CollapseStats

_F64 = torch.float64
# pinv(Sigma_B) cut-off relative to its largest eigenvalue. Hidden states on a (float32) LayerNorm
# hyperplane leave "zero" eigenvalues at 1e-16..1e-13, where numpy's d * eps (7e-15 at d = 32) cut
# them by chance of summation order; 1e-10 drops them (and max(d, K) * eps) with orders to spare.
PINV_RTOL = 1e-10


def anisotropy_mean_cos(stats: CollapseStats) -> float | None:
    """Mean cosine over distinct sample pairs, `(||sum u_i||^2 - N) / (N (N - 1))`.

    Zero vectors have no direction and are left out (N counts the nonzero samples).
    """
    n = stats.unit_count
    if n < 2:
        return None
    total = float(stats.unit_sum @ stats.unit_sum)
    return (total - n) / (n * (n - 1))


def effective_rank(stats: CollapseStats, device: torch.device) -> float | None:
    """exp(entropy) of the normalised eigenvalues of the total covariance (Roy & Vetterli)."""
    if stats.second is None or stats.sample_count < 2:
        return None
    n = stats.sample_count
    mean = stats.total_sum.to(device) / n
    # In place: two d x d matrices besides S (1 GB of temporaries at d = 4,096 otherwise).
    cov = stats.second.to(device) / n
    cov.addr_(mean, mean, alpha=-1.0)
    sym = cov + cov.T
    del cov
    eig = torch.linalg.eigvalsh(sym.mul_(0.5)).clamp_min(0.0)
    total = float(eig.sum())
    if total <= 0:
        return None
    p = eig / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def trace_ratio(
    stats: CollapseStats,
    kept: ClassStatistics,
    classes: ClassMeans,
    min_count: int,
    device: torch.device,
) -> float | None:
    """`Tr(Sigma_W pinv(Sigma_B)) / K` over the kept classes C' (`n_c >= min_count`).

    `S - sum_c s_c s_c^T / n_c` over all classes is the within-class scatter of every class
    (a one-sample class adds none). With min_count <= 2 every class left out of C' has one
    sample, so dividing by the sample count of C' gives Sigma_W of C' exactly.
    With a larger min_count, S cannot separate the classes, and Sigma_W is pooled over every
    class with at least two samples: an estimate of C''s that assumes similar class spreads.
    Both d x d sums are accumulated a tile of classes at a time (memory O(d^2 + tile d), not
    the K x d scaled sums); the eigendecomposition is of a d x d matrix.
    """
    k = kept.num_classes
    if stats.second is None or k < 2:
        return None
    counts = stats.counts
    pooled = int(kept.counts.sum()) if min_count <= 2 else int(counts[counts >= 2].sum())
    dim = stats.dim
    between = torch.zeros(dim, dim, dtype=_F64, device=device)
    for start, stop in classes.tiles():
        m = classes.centred(start, stop)
        between.addmm_(m.T, m)
    between = (between + between.T) / (2 * k)
    eigval, eigvec = torch.linalg.eigh(between)
    del between
    cutoff = eigval.abs().max() * PINV_RTOL
    keep = eigval > cutoff
    if not bool(keep.any()):
        return None
    # sum_c s_c s_c^T / n_c over every class (the order of the statistics' rows: a sum).
    explained = torch.zeros(dim, dim, dtype=_F64, device=device)
    step = tile_rows(dim)
    for start, stop in row_ranges(int(counts.numel()), step):
        scaled = stats.sums[start:stop].to(device) / counts[start:stop].to(
            device, _F64
        ).sqrt().unsqueeze(1)
        explained.addmm_(scaled.T, scaled)
    within = stats.second.to(device) - explained
    del explained
    within /= pooled
    v = eigvec[:, keep]
    del eigvec
    # v_k^T Sigma_W v_k for each kept k, a block of eigenvectors at a time.
    projected = torch.cat(
        [
            ((v[:, a:b].T @ within) * v[:, a:b].T).sum(dim=1)
            for a, b in row_ranges(int(v.shape[1]), step)
        ]
    )
    return float((projected / eigval[keep]).sum()) / k
