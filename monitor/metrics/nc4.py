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
) -> torch.Tensor:
    """Per sample: does `argmax_c (w_c.h + b_c)` equal `argmin_c ||h - mu_c||`?

    `means` (K, d) and `weight` (K, d) (and `bias` (K,)) are the rows of the same K classes in
    the same order; the comparison is of positions 0..K-1, so restricting the head to the seen
    classes is the caller's choice of rows. Computed in float64, in chunks of samples sized so
    each (chunk x K) matrix holds at most `max_elements` values (32 MB): with K = 50,000 a fixed
    4,096-row chunk took 7.5 GB. Returns a bool tensor (N,) on the features' device.
    """
    chunk = max(1, max_elements // max(int(means.shape[0]), 1))
    if means.shape != weight.shape:
        raise ValueError(f"means {tuple(means.shape)} and weight {tuple(weight.shape)} differ")
    device = features.device
    mu = means.to(device, _F64)
    w = weight.to(device, _F64)
    b = None if bias is None else bias.to(device, _F64)
    mu_sq = (mu * mu).sum(dim=1)
    out = torch.empty(features.shape[0], dtype=torch.bool, device=device)
    for start in range(0, features.shape[0], chunk):
        h = features[start : start + chunk].to(_F64)
        logits = h @ w.T
        if b is not None:
            logits += b
        # argmin ||h - mu||^2 = argmin (||mu||^2 - 2 h.mu): ||h||^2 is the same for every class.
        dist = mu_sq - 2.0 * (h @ mu.T)
        out[start : start + chunk] = logits.argmax(dim=1) == dist.argmin(dim=1)
    return out
