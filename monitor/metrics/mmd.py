"""Drift MMD from random-Fourier-feature sums: the unbiased squared MMD of a window against a
baseline, and its calibrated null threshold (METRICS.md, `drift_mmd`, `drift_mmd_threshold`).

Split from `monitor.metrics.drift` (which re-exports every name here) so each module stays
short; the formulas are in that module's docstring.

Assumptions and limits of the threshold:

- The null it calibrates is "the window is another draw from the baseline's distribution, at
  the granularity of the buckets". Buckets that are themselves unlike each other (daily cycles,
  traffic mix changing within the baseline period) widen the null and make the test
  conservative, which is intended: drift smaller than the baseline's own variation is not
  flagged. Windows taken where the traffic is systematically different (e.g. a time of day the
  baseline never saw) are flagged.
- Tokens of one sequence are correlated; the buckets carry the same correlation, so the
  calibration accounts for it to the extent buckets are comparable in size and make-up to the
  window. The `1/n_x + 1/n_y` scaling is exact only for independent samples.
- With B buckets, the empirical quantile cannot resolve tail probabilities below ~1/(B+1):
  with fewer than ~20 buckets a 0.99 quantile is essentially the largest bucket value, so the
  realised false-positive rate is about 1/(B+1) or a little above (6% in a simulation
  with 24 buckets), not 1 - quantile.
  The bucket-vs-rest values also share data, so they are not independent draws.
- The kernel is the one of the fixed features: MMD only sees differences the chosen bandwidth
  resolves. A mean shift far below the bandwidth yields a tiny MMD; `drift_mean_shift` covers
  that case directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from monitor.stats.rff import BucketSums

_F64 = torch.float64


def mmd_unbiased(a: BucketSums, b: BucketSums) -> float:
    """Unbiased (U-statistic) squared MMD in feature space, from sums only.

    `(||S_a||^2 - Q_a)/(n_a(n_a-1)) + (||S_b||^2 - Q_b)/(n_b(n_b-1)) - 2 S_a.S_b/(n_a n_b)`:
    the within-sample terms drop the i == j pairs, whose sum is Q. Raises ValueError when a
    count is below 2 or the feature dimensions differ.
    """
    if a.count < 2 or b.count < 2:
        raise ValueError(f"the unbiased MMD needs 2 samples on each side, got {a.count}, {b.count}")
    sa = a.rff_sum.to(_F64)
    sb = b.rff_sum.to(device=sa.device, dtype=_F64)
    if sa.shape != sb.shape:
        raise ValueError(f"feature sums of shapes {tuple(sa.shape)} and {tuple(sb.shape)}")
    na, nb = float(a.count), float(b.count)
    within_a = (float(sa @ sa) - a.rff_sq) / (na * (na - 1.0))
    within_b = (float(sb @ sb) - b.rff_sq) / (nb * (nb - 1.0))
    cross = float(sa @ sb) / (na * nb)
    return within_a + within_b - 2.0 * cross


def mmd_threshold(
    buckets: Sequence[BucketSums], n_window: int, n_base: int, quantile: float = 0.99
) -> float | None:
    """The `quantile` of the null distribution of `drift_mmd` at sizes n_window, n_base.

    For each bucket b (with at least 2 samples, and at least 2 in the rest), the unbiased
    MMD^2 of b against the sum of the other buckets, times `1 / (1/n_b + 1/n_rest)`; the
    `quantile` of those scaled values (numpy's linear interpolation), times
    `1/n_window + 1/n_base`.

    Why this scaling: under the null (both samples from one distribution) MMD^2_u is a
    degenerate U-statistic. Writing the kernel as `sum_k lambda_k e_k(x) e_k(y)` (here, in
    feature space, literally the finite sum over the D features after centring), its limit is
    `(1/n_x + 1/n_y) * sum_k lambda_k (z_k^2 - 1)`, z_k iid N(0, 1): the whole null
    distribution, not only its spread, scales with `1/n_x + 1/n_y` and has a shape that does
    not depend on the sizes. So dividing bucket-vs-rest values by their own `1/n_b + 1/n_rest`
    puts them on one scale whatever the bucket sizes, and multiplying the quantile by the
    window's `1/n_window + 1/n_base` gives the threshold at the window's size.

    With B usable buckets the quantile cannot resolve tails below ~1/(B+1): with fewer than
    ~20 buckets the top quantiles (0.95, 0.99) are essentially the largest value. Returns None
    with fewer than 2 usable buckets or n_window, n_base below 2.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if n_window < 2 or n_base < 2 or len(buckets) < 2:
        return None
    dims = {tuple(b.rff_sum.shape) for b in buckets}
    if len(dims) != 1:
        raise ValueError(f"calibration buckets of different feature dimensions: {sorted(dims)}")
    device = buckets[0].rff_sum.device
    total_n = sum(b.count for b in buckets)
    total_s = torch.stack([b.rff_sum.to(device=device, dtype=_F64) for b in buckets]).sum(dim=0)
    total_q = sum(b.rff_sq for b in buckets)
    scaled: list[float] = []
    for b in buckets:
        n_rest = total_n - b.count
        if b.count < 2 or n_rest < 2:
            continue
        rest = BucketSums(
            n_rest, total_s - b.rff_sum.to(device=device, dtype=_F64), total_q - b.rff_sq
        )
        value = mmd_unbiased(b, rest) / (1.0 / b.count + 1.0 / n_rest)
        if math.isfinite(value):
            scaled.append(value)
    if len(scaled) < 2:
        return None
    q = float(np.quantile(np.asarray(scaled, dtype=np.float64), quantile))
    return q * (1.0 / n_window + 1.0 / n_base)
