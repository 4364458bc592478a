"""NC4: agreement between the linear classifier and the nearest-class-centre decision.

Used by the evaluator (on a held-out or subsampled set) and by capture (per batch, against the
class means of the last evaluation), so both count a hit the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from monitor.metrics.report import Estimate

_F64 = torch.float64

# (start, stop) -> (means, weight, bias) rows of those classes, float64 on the features' device.
ClassTiles = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def agreement_estimate(hits: int, n: int, num_classes: int, *, sampled: bool) -> Estimate:
    """The agreement fraction `hits / n`, null below two classes or without samples.

    With one class both decisions are that class whatever the geometry, so 1.0 would say
    nothing: null. A subsample (`sampled`) carries the Wilson score interval's half-width at
    z = 1, `sqrt(p (1 - p) / n + 1 / (4 n^2)) / (1 + 1 / n)`: the binomial `sqrt(p (1 - p) / n)`
    for large n, but 1 / (2 (n + 1)) rather than 0 at p = 0 or 1, where a finite subsample
    cannot be certain.
    """
    if num_classes < 2 or n < 1:
        return Estimate(None)
    p = hits / n
    if not sampled:
        return Estimate(p)
    return Estimate(p, math.sqrt(p * (1.0 - p) / n + 0.25 / (n * n)) / (1.0 + 1.0 / n))


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

    def rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return mu[start:stop], w[start:stop], None if b is None else b[start:stop]

    k = int(mu.shape[0])
    tile = max(1, min(k, class_tile))
    chunk = max(1, max_elements // tile)
    return agreement_by_tiles(features, k, rows, class_tile=tile, chunk=chunk, block=chunk)


def agreement_by_tiles(
    features: torch.Tensor,
    num_classes: int,
    rows: ClassTiles,
    *,
    class_tile: int,
    chunk: int,
    block: int,
) -> torch.Tensor:
    """`ncc_agreement` with the class rows produced by `rows`, a class tile at a time.

    Samples go in blocks of `block` rows (converted to float64 once per block); within a block,
    each class tile is produced once and compared with `chunk` samples at a time (chunk x
    class_tile values per product). With `block == chunk` this is `ncc_agreement`'s loop; a
    larger block lets a caller whose rows are costly to produce (derived from the class sums,
    gathered from the head and upcast) produce them once per block instead of once per chunk.
    Each sample sees the class tiles in order, so ties still go to the lowest class index.
    """
    device = features.device
    n = int(features.shape[0])
    out = torch.empty(n, dtype=torch.bool, device=device)
    for b0 in range(0, n, block):
        h_block = features[b0 : b0 + block].to(_F64)
        count = int(h_block.shape[0])
        top_logit = torch.full((count,), -torch.inf, dtype=_F64, device=device)
        top_class = torch.zeros(count, dtype=torch.long, device=device)
        near_dist = torch.full((count,), torch.inf, dtype=_F64, device=device)
        near_class = torch.zeros(count, dtype=torch.long, device=device)
        for c0 in range(0, num_classes, class_tile):
            mu, w, b = rows(c0, min(c0 + class_tile, num_classes))
            mu_sq = (mu * mu).sum(dim=1)
            for s0 in range(0, count, chunk):
                s1 = min(s0 + chunk, count)
                h = h_block[s0:s1]
                logits = h @ w.T
                if b is not None:
                    logits += b
                value, index = logits.max(dim=1)
                # Strict: an equal value in a later tile loses the tie.
                better = value > top_logit[s0:s1]
                top_logit[s0:s1] = torch.where(better, value, top_logit[s0:s1])
                top_class[s0:s1] = torch.where(better, index + c0, top_class[s0:s1])
                # argmin ||h - mu||^2 = argmin (||mu||^2 - 2 h.mu): ||h||^2 is the same for all.
                dist = mu_sq - 2.0 * (h @ mu.T)
                value, index = dist.min(dim=1)
                better = value < near_dist[s0:s1]
                near_dist[s0:s1] = torch.where(better, value, near_dist[s0:s1])
                near_class[s0:s1] = torch.where(better, index + c0, near_class[s0:s1])
        out[b0 : b0 + count] = top_class == near_class
    return out
