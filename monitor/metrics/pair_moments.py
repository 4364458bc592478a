"""Running moments of pair values, and the estimates a sample of pairs gives.

Both pair walks (`monitor.metrics.pairwise`) fold blocks of pair values into these: the exact
walk a Gram tile at a time, the sampled walk once over its drawn pairs. `_PairAccumulator`
does only the work of the keys asked for (a jackknife replicate wants two of the eight).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from monitor.metrics.report import Estimate

COS_KEYS = frozenset({"nc2_equiangularity_mean", "nc2_equiangularity_std"})
LOG_ENERGY_KEYS = frozenset({"nc2_log_energy_mean", "nc2_log_energy_std"})
PLUG_IN_CDNV_KEYS = frozenset({"nc1_cdnv", "nc1_cdnv2"})


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations, merged with Chan et al.'s parallel update."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        n = int(values.numel())
        if n == 0:
            return
        mean_b = float(values.mean())
        # Squared in place: `(values - mean_b) ** 2` held two fresh tile-sized temporaries at
        # once, and glibc served them by mmap with page faults each time (20x the arithmetic).
        m2_b = float((values - mean_b).square_().sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (ddof = 0)."""
        return math.sqrt(max(self.m2, 0.0) / self.count)


@dataclass
class RunningMean:
    """`RunningMoments` without the squared deviations: the same mean, fewer passes (CDNV and
    CDNV2 only report a mean, and the exact walk is dominated by passes over its tiles)."""

    count: int = 0
    mean: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        n = int(values.numel())
        if n == 0:
            return
        total = self.count + n
        self.mean += (float(values.mean()) - self.mean) * n / total
        self.count = total


def where(mask: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`values[mask]` for each, or the values themselves when the mask is all true.

    Boolean indexing (a nonzero, then a gather and a copy per tensor) took about a third of
    the exact pair walk, and in practice every pair passes: distinct, nonzero class means.
    """
    if bool(mask.all()):
        return values
    return tuple(v[mask] for v in values)


class PairAccumulator:
    """Folds blocks of pair values into the moments of CDNV, CDNV2, cosine and log energy,
    those of the keys in `keys` only."""

    def __init__(self, keys: Collection[str]) -> None:
        self.keys = frozenset(keys)
        self.cdnv = RunningMean()
        self.cdnv2 = RunningMean()
        self.cos = RunningMoments()
        self.log_energy = RunningMoments()

    @property
    def needs_distances(self) -> bool:
        """Whether `add` reads `dist2` and `var_sum` (the plug-in CDNVs)."""
        return bool(self.keys & PLUG_IN_CDNV_KEYS)

    @property
    def needs_cosines(self) -> bool:
        return bool(self.keys & (COS_KEYS | LOG_ENERGY_KEYS))

    def add(
        self,
        dist2: torch.Tensor | None,
        var_sum: torch.Tensor | None,
        cos: torch.Tensor | None,
        angular: torch.Tensor | None,
    ) -> None:
        """All inputs are flat over the same valid pairs; `angular` masks pairs with m_c != 0
        (None: every pair). `dist2` and `var_sum` may be None unless `needs_distances`, `cos`
        unless `needs_cosines`."""
        if self.needs_distances and dist2 is not None and var_sum is not None:
            d2, vs = where(dist2 > 0, dist2, var_sum)
            denom = d2 * 2.0
            cdnv = torch.div(vs, denom, out=denom)
            if "nc1_cdnv" in self.keys:
                self.cdnv.add(cdnv)
            if "nc1_cdnv2" in self.keys:
                self.cdnv2.add(cdnv / d2)
        if not self.needs_cosines or cos is None:
            return
        c = cos if angular is None else where(angular, cos)[0]
        if self.keys & COS_KEYS:
            self.cos.add(c)
        if self.keys & LOG_ENERGY_KEYS:
            # ||u - u'||^2 = 2 - 2 cos for unit vectors; log(1/||u - u'||) = -log(that)/2.
            chord2 = torch.mul(c, -2.0).add_(2.0).clamp_min_(0.0)  # the same values as 2 - 2c
            self.log_energy.add(torch.log(where(chord2 > 0, chord2)[0]).mul_(-0.5))

    def results(self) -> dict[str, Estimate]:
        def mean(m: RunningMoments | RunningMean) -> Estimate:
            return Estimate(m.mean if m.count else None)

        def std(m: RunningMoments) -> Estimate:
            return Estimate(m.std if m.count else None)

        out = {
            "nc1_cdnv": mean(self.cdnv),
            "nc1_cdnv2": mean(self.cdnv2),
            "nc2_equiangularity_mean": mean(self.cos),
            "nc2_equiangularity_std": std(self.cos),
            "nc2_log_energy_mean": mean(self.log_energy),
            "nc2_log_energy_std": std(self.log_energy),
        }
        return {k: v for k, v in out.items() if k in self.keys}


def mean_estimate(values: torch.Tensor) -> Estimate:
    """The sample mean with its standard error (inf for one value, None for none)."""
    n = int(values.numel())
    if n == 0:
        return Estimate(None)
    std = float(values.std(correction=1)) if n > 1 else math.inf
    return Estimate(float(values.mean()), std / math.sqrt(n))


def std_estimate(values: torch.Tensor) -> Estimate:
    """Sample std with the delta-method stderr sqrt((mu4 - s^4) / (4 s^2 n))."""
    n = int(values.numel())
    if n < 2:
        return Estimate(None)
    centred = values - values.mean()
    var = float((centred**2).mean())
    mu4 = float((centred**4).mean())
    std = math.sqrt(var)
    stderr = math.sqrt(max(mu4 - var * var, 0.0) / (4.0 * var * n)) if var > 0 else 0.0
    return Estimate(std, stderr)
