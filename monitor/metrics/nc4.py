"""NC4: agreement between the linear classifier and the nearest-class-centre decision.

Used by the evaluator (on a held-out or subsampled set) and by capture (per batch, against the
class means of the last evaluation), so both count a hit the same way.
"""

from __future__ import annotations

import torch

_F64 = torch.float64


def ncc_agreement(
    features: torch.Tensor,
    means: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    max_elements: int = 1 << 22,
    class_tile: int = 4096,
) -> torch.Tensor:
    """Per sample: does `argmax_c (w_c.h + b_c)` equal `argmin_c ||h - mu_c||`?

    `means` (K, d) and `weight` (K, d) (and `bias` (K,)) are the rows of the same K classes in
    the same order; the comparison is of positions 0..K-1, so restricting the head to the seen
    classes is the caller's choice of rows. Computed in float64 in (sample chunk x class tile)
    blocks of at most `max_elements` values (32 MB), keeping a running arg-max/arg-min per
    sample. Tiling the classes as well as the samples matters twice: a (chunk x K) block at
    K = 50,000 took 7.5 GB with 4,096-row chunks, and shrinking the chunks instead (83 rows)
    re-read the two K x d matrices from memory for every chunk, which made NC4 memory-bound.
    Ties go to the lowest class index, as `argmax` does. Returns a bool tensor (N,) on the
    features' device.
    """
    if means.shape != weight.shape:
        raise ValueError(f"means {tuple(means.shape)} and weight {tuple(weight.shape)} differ")
    device = features.device
    mu = means.to(device, _F64)
    w = weight.to(device, _F64)
    b = None if bias is None else bias.to(device, _F64)
    mu_sq = (mu * mu).sum(dim=1)
    k = int(mu.shape[0])
    tile = max(1, min(k, class_tile))
    chunk = max(1, max_elements // tile)
    out = torch.empty(features.shape[0], dtype=torch.bool, device=device)
    for start in range(0, features.shape[0], chunk):
        h = features[start : start + chunk].to(_F64)
        rows = h.shape[0]
        top_logit = torch.full((rows,), -torch.inf, dtype=_F64, device=device)
        top_class = torch.zeros(rows, dtype=torch.long, device=device)
        near_dist = torch.full((rows,), torch.inf, dtype=_F64, device=device)
        near_class = torch.zeros(rows, dtype=torch.long, device=device)
        for c0 in range(0, k, tile):
            c1 = min(c0 + tile, k)
            logits = h @ w[c0:c1].T
            if b is not None:
                logits += b[c0:c1]
            value, index = logits.max(dim=1)
            better = value > top_logit  # strict: an equal value in a later tile loses the tie
            top_logit = torch.where(better, value, top_logit)
            top_class = torch.where(better, index + c0, top_class)
            # argmin ||h - mu||^2 = argmin (||mu||^2 - 2 h.mu): ||h||^2 is the same for all.
            dist = mu_sq[c0:c1] - 2.0 * (h @ mu[c0:c1].T)
            value, index = dist.min(dim=1)
            better = value < near_dist
            near_dist = torch.where(better, value, near_dist)
            near_class = torch.where(better, index + c0, near_class)
        out[start : start + chunk] = top_class == near_class
    return out
