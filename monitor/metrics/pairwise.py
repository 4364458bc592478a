"""Pairwise class metrics (NC1 CDNV, NC2 equiangularity and log energy) without a K x K matrix.

Exact mode walks the upper triangle of the Gram matrix of the centred class means tile by tile
(memory O(K d + tile^2)) and folds each tile into running moments. Sampled mode draws pairs
uniformly and reports the standard error of each estimate, for K too large to enumerate; it
reads only the rows of the drawn pairs, so its centred means can be a `ClassMeans` that derives
them from the class sums chunk by chunk (memory O(chunk d), no K x d matrix at all).

Given the class counts (`PairInputs.counts`), both walks also give the volume-robust CDNV keys
of METRICS.md: `s~_c^2 = sigma_c^2 n_c/(n_c-1)` and `D~ = ||mu_c - mu_c'||^2 - s~_c^2/n_c -
s~_c'^2/n_c'` (unbiased for the population's squared distance). Classes with `n_c < 2` are left
out of those two means, and so are the pairs this window cannot resolve: `D~ <= RESOLUTION *
(s~_c^2/n_c + s~_c'^2/n_c')`, whose estimated distance is not above the noise of the class means
(see RESOLUTION for why the cut is not at `D~ <= 0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monitor.metrics.report import Estimate
from monitor.metrics.rows import ClassMeans

_F64 = torch.float64
# Below this fraction of ||m_i||^2 + ||m_j||^2 the Gram identity loses too many digits of
# ||m_i - m_j||^2; those (rare) pairs are recomputed from the difference itself.
_CANCELLATION_RATIO = 1e-6
# A pair enters the volume-robust CDNV keys when D~ > RESOLUTION x the noise of its estimated
# squared distance (s~_c^2/n_c + s~_c'^2/n_c'). At 0 (every D~ > 0) a pair's term 1/D~ has no
# finite expectation (D~ has a density at 0): in simulation the 95th percentile of a thin
# window's value ran up to +295% above a thick one's (CDNV2: 10^5 x), a false alert on any
# traffic dip. A cut bounds each term (by about 2 n_c at 0.25) but leaves out pairs whose true
# CDNV is above about n_c / (2 RESOLUTION), which n_c samples per class cannot resolve: thin
# windows of models with many close classes read low. 0.25 kept the median N = 2,000 window
# within 5% of N = 250,000 in five of six simulated models (0 and 0.5: two; 1: one); see
# docs/metrics.md and `resolution_study` in tests/unit/test_volume_robust.py.
RESOLUTION = 0.25
PAIR_METRICS = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
)


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


class _UnbiasedSums:
    """Sums of the unbiased CDNV and CDNV2 over kept pairs, held on the device (no sync per tile).

    Per tile: `keep` = 1 for kept pairs (resolved, see RESOLUTION, and c < c'), else 0, as
    sign(max(margin, 0)) rather than a boolean mask (a masked write or `heaviside` cost 2 to 15
    plain passes on the CPU); `r = keep / D~`; `sum (h_c + h_c') r = h . (r 1) + 1 . (r h)` by
    two matrix-vector products, likewise for `r^2`, with `h = s~^2 / 2`.
    """

    def __init__(self, parts: UnbiasedParts) -> None:
        device = parts.noise.device
        zero = torch.zeros((), dtype=_F64, device=device)
        self.cdnv, self.cdnv2, self.kept = zero.clone(), zero.clone(), zero.clone()
        self.half = parts.half_var
        self.ones = torch.ones_like(self.half)
        # Kept when D~ > cut: with q = RESOLUTION x noise, D~ = dist2 - q / RESOLUTION and the
        # cut is q itself (an infinite noise, n_c < 2, stays infinite: D~ = -inf, dropped).
        scale = RESOLUTION if RESOLUTION > 0 else 1.0
        self.scaled = parts.noise * scale
        self.alpha = 1.0 / scale
        self.zero_cut = RESOLUTION <= 0
        self._work = torch.empty(2, 0, dtype=_F64, device=device)

    def add(self, dist2: torch.Tensor, rows: slice, cols: slice, diagonal: bool) -> None:
        """`dist2` is the (T_i, T_j) tile of classes `rows` x `cols`; on a `diagonal` tile
        only the entries above the diagonal are pairs c < c'."""
        size = dist2.numel()
        if self._work.shape[1] < size:  # two buffers for every tile: no page faults per tile
            self._work = torch.empty(2, size, dtype=_F64, device=dist2.device)
        q, d_tilde = (w[:size].view(dist2.shape) for w in self._work)
        torch.add(self.scaled[rows, None], self.scaled[None, cols], out=q)
        torch.sub(dist2, q, alpha=self.alpha, out=d_tilde)
        if self.zero_cut:
            torch.clamp_min(d_tilde, 0.0, out=q)
        else:
            torch.sub(d_tilde, q, out=q).clamp_min_(0.0)
        keep = q.sign_()  # 1 where D~ > cut, else 0 (-inf and -0 included)
        if diagonal:
            keep.triu_(diagonal=1)
        self.kept += keep.sum()
        # Kept pairs have D~ > cut >= 0; the floor only keeps 0 / D~ finite for the others.
        inv = keep.div_(d_tilde.clamp_min_(1e-300))
        h_i, h_j, ones = self.half[rows], self.half[cols], self.ones[cols]
        self.cdnv += torch.mv(inv, h_j).sum() + torch.dot(h_i, torch.mv(inv, ones))
        inv.mul_(inv)
        self.cdnv2 += torch.mv(inv, h_j).sum() + torch.dot(h_i, torch.mv(inv, ones))

    def results(self) -> dict[str, Estimate]:
        n = int(self.kept)
        if n == 0:
            return {"nc1_cdnv_unbiased": Estimate(None), "nc1_cdnv2_unbiased": Estimate(None)}
        return {
            "nc1_cdnv_unbiased": Estimate(float(self.cdnv) / n),
            "nc1_cdnv2_unbiased": Estimate(float(self.cdnv2) / n),
        }


def _unresolved(dist2: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`D~ <= RESOLUTION * noise`, written on the plug-in distance so that an infinite noise
    (a class with n_c < 2) drops the pair whatever RESOLUTION is (0 x inf would be NaN)."""
    return dist2 <= noise * (1.0 + RESOLUTION)


@dataclass(frozen=True)
class UnbiasedParts:
    """Per-class `s~_c^2 / 2` and `s~_c^2 / n_c`; classes with `n_c < 2` get 0 and +inf, so
    every pair with one of them is left out."""

    half_var: torch.Tensor  # (K,)
    noise: torch.Tensor  # (K,)


@dataclass(frozen=True)
class PairInputs:
    """Per-class quantities every pairwise metric needs, on the compute device."""

    centred: torch.Tensor | ClassMeans  # (K, d) m_c, or their tile-by-tile source
    variances: torch.Tensor  # (K,) sigma_c^2
    sq_norms: torch.Tensor  # (K,) ||m_c||^2
    counts: torch.Tensor | None = None  # (K,) n_c; None: no volume-robust keys

    @property
    def num_classes(self) -> int:
        return int(self.sq_norms.shape[0])

    def matrix(self) -> torch.Tensor:
        """The (K, d) centred means (built once from a `ClassMeans`)."""
        if isinstance(self.centred, ClassMeans):
            return self.centred.materialise()
        return self.centred

    def take(self, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """m_c of the classes at positions `index`, written into `out` (len(index), d)."""
        if isinstance(self.centred, ClassMeans):
            return self.centred.take_centred(index, out=out)
        return torch.index_select(self.centred, 0, index, out=out)

    @property
    def dim(self) -> int:
        m = self.centred
        return m.dim if isinstance(m, ClassMeans) else int(m.shape[1])

    def unbiased(self) -> UnbiasedParts | None:
        """The per-class parts of the volume-robust keys, None without counts."""
        if self.counts is None:
            return None
        var = self.variances
        n = self.counts.to(device=var.device, dtype=_F64)
        usable = n >= 2
        var_u = var * n / (n - 1.0).clamp_min(1.0)  # s~_c^2
        half = torch.where(usable, 0.5 * var_u, 0.0)
        noise = torch.where(usable, var_u / n.clamp_min(1.0), math.inf)
        return UnbiasedParts(half, noise)


def _where(mask: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`values[mask]` for each, or the values themselves when the mask is all true.

    Boolean indexing (a nonzero, then a gather and a copy per tensor) took about a third of
    the exact pair walk, and in practice every pair passes: distinct, nonzero class means.
    """
    if bool(mask.all()):
        return values
    return tuple(v[mask] for v in values)


class _PairAccumulator:
    """Folds blocks of pair values into the moments of CDNV, CDNV2, cosine and log energy."""

    def __init__(self) -> None:
        self.cdnv = RunningMean()
        self.cdnv2 = RunningMean()
        self.cos = RunningMoments()
        self.log_energy = RunningMoments()

    def add(
        self,
        dist2: torch.Tensor,
        var_sum: torch.Tensor,
        cos: torch.Tensor,
        angular: torch.Tensor | None,
    ) -> None:
        """All inputs are flat over the same valid pairs; `angular` masks pairs with m_c != 0
        (None: every pair)."""
        d2, vs = _where(dist2 > 0, dist2, var_sum)
        denom = d2 * 2.0
        cdnv = torch.div(vs, denom, out=denom)
        self.cdnv.add(cdnv)
        self.cdnv2.add(cdnv / d2)
        c = cos if angular is None else _where(angular, cos)[0]
        self.cos.add(c)
        # ||u - u'||^2 = 2 - 2 cos for unit vectors; log(1/||u - u'||) = -log(that)/2.
        chord2 = torch.mul(c, -2.0).add_(2.0).clamp_min_(0.0)  # the same values as 2 - 2c
        self.log_energy.add(torch.log(_where(chord2 > 0, chord2)[0]).mul_(-0.5))

    def results(self) -> dict[str, Estimate]:
        def mean(m: RunningMoments | RunningMean) -> Estimate:
            return Estimate(m.mean if m.count else None)

        def std(m: RunningMoments) -> Estimate:
            return Estimate(m.std if m.count else None)

        return {
            "nc1_cdnv": mean(self.cdnv),
            "nc1_cdnv2": mean(self.cdnv2),
            "nc2_equiangularity_mean": mean(self.cos),
            "nc2_equiangularity_std": std(self.cos),
            "nc2_log_energy_mean": mean(self.log_energy),
            "nc2_log_energy_std": std(self.log_energy),
        }


def exact_pair_metrics(inputs: PairInputs, *, tile: int = 1024) -> dict[str, Estimate]:
    """Every pair c < c' once, one Gram tile at a time.

    Each tile of centred means is read K / tile times, so they are built once as a (K, d)
    matrix (`PairInputs.matrix`) rather than derived again for every tile.
    """
    m, var, a = inputs.matrix(), inputs.variances, inputs.sq_norms
    k = inputs.num_classes
    norms = a.sqrt()
    inv_norm = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    all_angular = bool((norms > 0).all())  # then no tile needs the angular mask
    acc = _PairAccumulator()
    parts = inputs.unbiased()
    robust = _UnbiasedSums(parts) if parts is not None else None
    for i0 in range(0, k, tile):
        i1 = min(i0 + tile, k)
        for j0 in range(i0, k, tile):
            j1 = min(j0 + tile, k)
            gram = m[i0:i1] @ m[j0:j1].T
            # In place where the values are the same (x - 2y == x - alpha y for alpha = 2):
            # every fresh tile-sized temporary cost page faults (see RunningMoments.add).
            dist2 = torch.add(a[i0:i1, None], a[None, j0:j1]).sub_(gram, alpha=2.0)
            if i0 == j0:
                upper = torch.ones_like(dist2, dtype=torch.bool).triu(diagonal=1)
            # One reduction first: when no pair of the tile is near the cancellation bound
            # (the rule off the diagonal), the T x T scale and mask are not built at all.
            bound = _CANCELLATION_RATIO * float(a[i0:i1].max() + a[j0:j1].max())
            if i0 == j0 or float(dist2.min()) < bound:
                scale = a[i0:i1, None] + a[None, j0:j1]
                risky = dist2 < _CANCELLATION_RATIO * scale
                if i0 == j0:
                    risky &= upper
            else:
                risky = None
            if risky is not None and bool(risky.any()):
                ri, rj = risky.nonzero(as_tuple=True)
                diff = m[i0 + ri] - m[j0 + rj]
                dist2[ri, rj] = (diff * diff).sum(dim=1)
            cos = gram.mul_(inv_norm[i0:i1, None]).mul_(inv_norm[None, j0:j1])
            var_sum = var[i0:i1, None] + var[None, j0:j1]
            angular = None
            if not all_angular:
                angular = (norms[i0:i1, None] > 0) & (norms[None, j0:j1] > 0)
            if robust is not None:
                robust.add(dist2, slice(i0, i1), slice(j0, j1), i0 == j0)
            if i0 == j0:
                ang = None if angular is None else angular[upper]
                acc.add(dist2[upper], var_sum[upper], cos[upper], ang)
            else:
                ang = None if angular is None else angular.flatten()
                acc.add(dist2.flatten(), var_sum.flatten(), cos.flatten(), ang)
    out = acc.results()
    if robust is not None:
        out.update(robust.results())
    return out


def sampled_pair_metrics(
    inputs: PairInputs, *, samples: int, seed: int, chunk: int = 1024
) -> dict[str, Estimate]:
    """Unbiased estimates of the pair means from `samples` uniform pairs, with standard errors.

    Pairs are drawn with replacement, uniformly among unordered pairs of distinct classes.
    The std metrics are the sample std (consistent) with a delta-method standard error.
    """
    k = inputs.num_classes
    device = inputs.sq_norms.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randint(0, k, (samples,), generator=gen)
    # Uniform over j != i: draw from k - 1 values and skip i.
    second = torch.randint(0, k - 1, (samples,), generator=gen)
    second += (second >= first).to(second.dtype)
    var, a = inputs.variances, inputs.sq_norms
    norms = a.sqrt()
    # Results go into buffers allocated up front. Appending each chunk's small result to a
    # list left long-lived 8 KB blocks between the freed chunk temporaries, so glibc's heap
    # could not reuse those holes and grew by GBs (3-7 GB peak at K = 30,000, d = 768).
    dist2 = torch.empty(samples, dtype=_F64, device=device)
    var_sum = torch.empty(samples, dtype=_F64, device=device)
    cos = torch.empty(samples, dtype=_F64, device=device)
    angular = torch.empty(samples, dtype=torch.bool, device=device)
    # The chunk's rows go into three buffers reused by every chunk: fresh (chunk, d) tensors
    # cost page faults on each allocation, several times the arithmetic (10x for rows derived
    # from the class sums, which also need a division and a subtraction in place).
    rows_i = torch.empty(min(chunk, samples), inputs.dim, dtype=_F64, device=device)
    rows_j = torch.empty_like(rows_i)
    work = torch.empty_like(rows_i)
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        n = stop - start
        i = first[start:stop].to(device)
        j = second[start:stop].to(device)
        mi, mj, prod = inputs.take(i, rows_i[:n]), inputs.take(j, rows_j[:n]), work[:n]
        dot = torch.mul(mi, mj, out=prod).sum(dim=1)
        diff = mi.sub_(mj)
        dist2[start:stop] = torch.mul(diff, diff, out=prod).sum(dim=1)
        var_sum[start:stop] = var[i] + var[j]
        denom = norms[i] * norms[j]
        angular[start:stop] = denom > 0
        cos[start:stop] = dot / denom.clamp_min(1e-300)

    separated = dist2 > 0
    cdnv = var_sum[separated] / (2.0 * dist2[separated])
    c = cos[angular]
    chord2 = (2.0 - 2.0 * c).clamp_min(0.0)
    log_energy = -0.5 * torch.log(chord2[chord2 > 0])
    out = {
        "nc1_cdnv": _mean_estimate(cdnv),
        "nc1_cdnv2": _mean_estimate(cdnv / dist2[separated]),
        "nc2_equiangularity_mean": _mean_estimate(c),
        "nc2_equiangularity_std": _std_estimate(c),
        "nc2_log_energy_mean": _mean_estimate(log_energy),
        "nc2_log_energy_std": _std_estimate(log_energy),
    }
    parts = inputs.unbiased()
    if parts is not None:
        # Drawn pairs are uniform among all pairs, so those kept are uniform among kept pairs.
        i, j = first.to(device), second.to(device)
        noise = parts.noise[i] + parts.noise[j]
        kept = ~_unresolved(dist2, noise)
        d_kept = (dist2 - noise)[kept]
        cdnv_u = (parts.half_var[i] + parts.half_var[j])[kept] / d_kept
        out["nc1_cdnv_unbiased"] = _mean_estimate(cdnv_u)
        out["nc1_cdnv2_unbiased"] = _mean_estimate(cdnv_u / d_kept)
    return out


def _mean_estimate(values: torch.Tensor) -> Estimate:
    n = int(values.numel())
    if n == 0:
        return Estimate(None)
    std = float(values.std(correction=1)) if n > 1 else math.inf
    return Estimate(float(values.mean()), std / math.sqrt(n))


def _std_estimate(values: torch.Tensor) -> Estimate:
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
