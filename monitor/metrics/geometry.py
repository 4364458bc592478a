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
    device: torch.device,
) -> float | None:
    """`Tr(Sigma_W pinv(Sigma_B)) / K` over the kept classes C'.

    Sigma_W * N' = S' - sum_{c in C'} s_c s_c^T / n_c, where S' is the second moment of the
    samples of C'. We only hold S over all samples, so the classes left out of C' are removed
    through their means: exact when each of them has one sample (always so with the default
    min_count of 2); with a larger min_count, their within-class scatter stays in Sigma_W.
    """
    k = kept.num_classes
    if stats.second is None or k < 2:
        return None
    n_kept = int(kept.counts.sum())
    everyone = stats.classes(min_count=1)
    scaled = everyone.sums.to(device) / everyone.counts.to(device, _F64).sqrt().unsqueeze(1)
    within = (stats.second.to(device) - scaled.T @ scaled) / n_kept
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
