"""Metrics of the space itself (anisotropy, effective rank) and NC1's trace ratio.

They need global sums only: the unit-vector sum for anisotropy, and the d x d second moment
`S = sum h h^T` for the covariance-based ones (None without it).
"""

from __future__ import annotations

import torch

from monitor.stats import ClassStatistics, CollapseStats

_F64 = torch.float64


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
    cov = stats.second.to(device) / n - torch.outer(mean, mean)
    eig = torch.linalg.eigvalsh((cov + cov.T) / 2).clamp_min(0.0)
    total = float(eig.sum())
    if total <= 0:
        return None
    p = eig / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def trace_ratio(
    stats: CollapseStats,
    kept: ClassStatistics,
    centred: torch.Tensor,
    min_count: int,
    device: torch.device,
) -> float | None:
    """`Tr(Sigma_W pinv(Sigma_B)) / K` over the kept classes C' (`n_c >= min_count`).

    `S - sum_c s_c s_c^T / n_c` over all classes is the within-class scatter of every class
    (a one-sample class adds none). With min_count <= 2 every class left out of C' has one
    sample, so dividing by the sample count of C' gives Sigma_W of C' exactly.
    With a larger min_count, S cannot separate the classes, and Sigma_W is pooled over every
    class with at least two samples: an estimate of C''s that assumes similar class spreads.
    """
    k = kept.num_classes
    if stats.second is None or k < 2:
        return None
    everyone = stats.classes(min_count=1)
    if min_count <= 2:
        pooled = int(kept.counts.sum())
    else:
        pooled = int(everyone.counts[everyone.counts >= 2].sum())
    scaled = everyone.sums.to(device) / everyone.counts.to(device, _F64).sqrt().unsqueeze(1)
    within = (stats.second.to(device) - scaled.T @ scaled) / pooled
    between = centred.T @ centred / k
    eigval, eigvec = torch.linalg.eigh((between + between.T) / 2)
    # The pseudo-inverse cut-off of numpy.linalg.pinv(hermitian=True): d * eps * largest.
    cutoff = eigval.abs().max() * between.shape[0] * torch.finfo(_F64).eps
    keep = eigval > cutoff
    if not bool(keep.any()):
        return None
    v = eigvec[:, keep]
    projected = ((v.T @ within) * v.T).sum(dim=1)  # v_k^T Sigma_W v_k for each kept k
    return float((projected / eigval[keep]).sum()) / k
