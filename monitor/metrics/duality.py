"""NC3 (self-duality of classifier and class means) and NC4 (linear vs nearest-centre decision)."""

from __future__ import annotations

import math

import torch

from monitor.metrics.nc4 import ncc_agreement
from monitor.metrics.report import Estimate

_F64 = torch.float64


def duality(weight_rows: torch.Tensor, centred: torch.Tensor) -> tuple[float | None, float | None]:
    """(mean, CoV) over classes of cos(w_c, m_c); classes with a zero vector are left out."""
    w = weight_rows.to(centred.device, _F64)
    wn = w.norm(dim=1)
    mn = centred.norm(dim=1)
    valid = (wn > 0) & (mn > 0)
    if not bool(valid.any()):
        return None, None
    cos = (w[valid] * centred[valid]).sum(dim=1) / (wn[valid] * mn[valid])
    mean = float(cos.mean())
    std = float(cos.std(correction=0))
    return mean, (std / mean if mean != 0 else None)


def nc4_from_samples(
    features: torch.Tensor,
    means: torch.Tensor,
    weight_rows: torch.Tensor,
    bias_rows: torch.Tensor | None,
    *,
    max_samples: int,
    seed: int,
) -> Estimate:
    """Agreement fraction on `features`; a seeded uniform subsample above `max_samples` rows.

    A subsample reports the binomial standard error `sqrt(p (1 - p) / n)`.
    """
    n = int(features.shape[0])
    if n == 0:
        return Estimate(None)
    sampled = n > max_samples
    if sampled:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:max_samples].to(features.device)
        features = features[rows]
        n = max_samples
    hits = int(ncc_agreement(features, means, weight_rows, bias_rows).sum())
    p = hits / n
    return Estimate(p, math.sqrt(p * (1 - p) / n) if sampled else None)
