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

Both walks take the keys to compute (`keys`, default all of PAIR_METRICS) and skip the work of
the others where it is separable (a jackknife replicate needs two of the eight); a key's value
does not depend on which others are computed. The sampled walk can also be given its pairs
(`pairs`, positions in the kept classes): a jackknife's replicates then share one draw.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from monitor.metrics.pair_moments import (
    COS_KEYS,
    LOG_ENERGY_KEYS,
    PLUG_IN_CDNV_KEYS,
    PairAccumulator,
    mean_estimate,
    std_estimate,
)
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
UNBIASED_KEYS = frozenset({"nc1_cdnv_unbiased", "nc1_cdnv2_unbiased"})


def pair_keys(keys: Collection[str] | None) -> frozenset[str]:
    """The pair metrics among `keys` (None: all of them)."""
    return frozenset(PAIR_METRICS) if keys is None else frozenset(keys) & frozenset(PAIR_METRICS)


def draw_pairs(k: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` pairs (i, j) of positions 0..k-1 with i != j, uniform among unordered pairs of
    distinct classes, drawn with replacement from a CPU generator seeded with `seed`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randint(0, k, (samples,), generator=gen)
    # Uniform over j != i: draw from k - 1 values and skip i.
    second = torch.randint(0, k - 1, (samples,), generator=gen)
    second += (second >= first).to(second.dtype)
    return first, second


class _UnbiasedSums:
    """Sums of the unbiased CDNV and CDNV2 over kept pairs, held on the device (no sync per tile).

    Per tile: `keep` = 1 for kept pairs (resolved, see RESOLUTION, and c < c'), else 0, as
    sign(max(margin, 0)) rather than a boolean mask (a masked write or `heaviside` cost 2 to 15
    plain passes on the CPU); `r = keep / D~`; `sum (h_c + h_c') r = h . (r 1) + 1 . (r h)` by
    two matrix-vector products, likewise for `r^2`, with `h = s~^2 / 2` (only when `squares`:
    CDNV2 is wanted).
    """

    def __init__(self, parts: UnbiasedParts, *, squares: bool = True) -> None:
        self.squares = squares
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
        if not self.squares:
            return
        inv.mul_(inv)
        self.cdnv2 += torch.mv(inv, h_j).sum() + torch.dot(h_i, torch.mv(inv, ones))

    def results(self) -> dict[str, Estimate]:
        n = int(self.kept)
        out = {
            "nc1_cdnv_unbiased": Estimate(float(self.cdnv) / n if n else None),
            "nc1_cdnv2_unbiased": Estimate(float(self.cdnv2) / n if n else None),
        }
        return out if self.squares else {"nc1_cdnv_unbiased": out["nc1_cdnv_unbiased"]}


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


def exact_pair_metrics(
    inputs: PairInputs, *, tile: int = 1024, keys: Collection[str] | None = None
) -> dict[str, Estimate]:
    """Every pair c < c' once, one Gram tile at a time; the pair metrics among `keys` (default
    all), each the same value whichever others are asked for.

    Each tile of centred means is read K / tile times, so they are built once as a (K, d)
    matrix (`PairInputs.matrix`) rather than derived again for every tile.
    """
    want = pair_keys(keys)
    acc = PairAccumulator(want)
    parts = inputs.unbiased() if want & UNBIASED_KEYS else None
    robust = None
    if parts is not None:
        robust = _UnbiasedSums(parts, squares="nc1_cdnv2_unbiased" in want)
    need_dist2 = acc.needs_distances or robust is not None
    need_cos = acc.needs_cosines
    if not (need_dist2 or need_cos):
        return {}
    m, var, a = inputs.matrix(), inputs.variances, inputs.sq_norms
    k = inputs.num_classes
    norms = a.sqrt()
    inv_norm = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    all_angular = bool((norms > 0).all())  # then no tile needs the angular mask
    for i0 in range(0, k, tile):
        i1 = min(i0 + tile, k)
        for j0 in range(i0, k, tile):
            j1 = min(j0 + tile, k)
            gram = m[i0:i1] @ m[j0:j1].T
            upper = None  # on a diagonal tile, only the pairs above the diagonal
            if i0 == j0:
                upper = torch.ones_like(gram, dtype=torch.bool).triu(diagonal=1)
            dist2 = cos = var_sum = angular = None
            if need_dist2:
                dist2 = _distances(m, a, gram, (i0, i1, j0, j1), upper)
            if need_cos:
                cos = gram.mul_(inv_norm[i0:i1, None]).mul_(inv_norm[None, j0:j1])
                if not all_angular:
                    angular = (norms[i0:i1, None] > 0) & (norms[None, j0:j1] > 0)
            if acc.needs_distances:
                var_sum = var[i0:i1, None] + var[None, j0:j1]
            if robust is not None and dist2 is not None:
                robust.add(dist2, slice(i0, i1), slice(j0, j1), upper is not None)
            if acc.needs_distances or need_cos:
                acc.add(
                    _pairs_of(dist2 if acc.needs_distances else None, upper),
                    _pairs_of(var_sum, upper),
                    _pairs_of(cos, upper),
                    _pairs_of(angular, upper),
                )
    out = acc.results()
    if robust is not None:
        out.update(robust.results())
    return out


def _pairs_of(tile: torch.Tensor | None, upper: torch.Tensor | None) -> torch.Tensor | None:
    """A tile's values over its pairs, flat: those above the diagonal on a diagonal tile."""
    if tile is None:
        return None
    return tile.flatten() if upper is None else tile[upper]


def _distances(
    m: torch.Tensor,
    a: torch.Tensor,
    gram: torch.Tensor,
    bounds: tuple[int, int, int, int],
    upper: torch.Tensor | None,
) -> torch.Tensor:
    """`||m_i - m_j||^2` of the tile rows i0..i1-1 x columns j0..j1-1 (`bounds`) from its Gram
    block, recomputed from the difference where the identity loses digits (`upper`: the tile
    is on the diagonal, only the pairs above it count)."""
    i0, i1, j0, j1 = bounds
    # In place where the values are the same (x - 2y == x - alpha y for alpha = 2):
    # every fresh tile-sized temporary cost page faults (see RunningMoments.add).
    dist2 = torch.add(a[i0:i1, None], a[None, j0:j1]).sub_(gram, alpha=2.0)
    # One reduction first: when no pair of the tile is near the cancellation bound
    # (the rule off the diagonal), the T x T scale and mask are not built at all.
    bound = _CANCELLATION_RATIO * float(a[i0:i1].max() + a[j0:j1].max())
    if upper is None and float(dist2.min()) >= bound:
        return dist2
    scale = a[i0:i1, None] + a[None, j0:j1]
    risky = dist2 < _CANCELLATION_RATIO * scale
    if upper is not None:
        risky &= upper
    if bool(risky.any()):
        ri, rj = risky.nonzero(as_tuple=True)
        diff = m[i0 + ri] - m[j0 + rj]
        dist2[ri, rj] = (diff * diff).sum(dim=1)
    return dist2


def sampled_pair_metrics(
    inputs: PairInputs,
    *,
    samples: int,
    seed: int,
    chunk: int = 1024,
    keys: Collection[str] | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Estimate]:
    """Unbiased estimates of the pair means among `keys` (default all) from `samples` uniform
    pairs, with standard errors.

    Pairs are drawn with replacement, uniformly among unordered pairs of distinct classes
    (`draw_pairs` with `seed`), unless `pairs` gives them: positions (i, j), i != j, in the
    kept classes (then `samples` and `seed` are not used). No pair: every value None.
    The std metrics are the sample std (consistent) with a delta-method standard error.
    """
    want = pair_keys(keys)
    first, second = pairs if pairs is not None else draw_pairs(inputs.num_classes, samples, seed)
    samples = int(first.numel())
    need_cos = bool(want & (COS_KEYS | LOG_ENERGY_KEYS))
    need_dist2 = bool(want & (PLUG_IN_CDNV_KEYS | UNBIASED_KEYS))
    if samples == 0 or not (need_cos or need_dist2):
        return {key: Estimate(None) for key in want}
    device = inputs.sq_norms.device
    var, a = inputs.variances, inputs.sq_norms
    norms = a.sqrt()
    # Results go into buffers allocated up front. Appending each chunk's small result to a
    # list left long-lived 8 KB blocks between the freed chunk temporaries, so glibc's heap
    # could not reuse those holes and grew by GBs (3-7 GB peak at K = 30,000, d = 768).
    dist2 = torch.empty(samples if need_dist2 else 0, dtype=_F64, device=device)
    cos = torch.empty(samples if need_cos else 0, dtype=_F64, device=device)
    angular = torch.empty(samples if need_cos else 0, dtype=torch.bool, device=device)
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
        if need_cos:
            dot = torch.mul(mi, mj, out=prod).sum(dim=1)
            denom = norms[i] * norms[j]
            angular[start:stop] = denom > 0
            cos[start:stop] = dot / denom.clamp_min(1e-300)
        if need_dist2:
            diff = mi.sub_(mj)
            dist2[start:stop] = torch.mul(diff, diff, out=prod).sum(dim=1)

    out: dict[str, Estimate] = {}
    i, j = first.to(device), second.to(device)
    if want & PLUG_IN_CDNV_KEYS:
        separated = dist2 > 0
        cdnv = (var[i] + var[j])[separated] / (2.0 * dist2[separated])
        out["nc1_cdnv"] = mean_estimate(cdnv)
        out["nc1_cdnv2"] = mean_estimate(cdnv / dist2[separated])
    if need_cos:
        c = cos[angular]
        chord2 = (2.0 - 2.0 * c).clamp_min(0.0)
        log_energy = -0.5 * torch.log(chord2[chord2 > 0])
        out["nc2_equiangularity_mean"] = mean_estimate(c)
        out["nc2_equiangularity_std"] = std_estimate(c)
        out["nc2_log_energy_mean"] = mean_estimate(log_energy)
        out["nc2_log_energy_std"] = std_estimate(log_energy)
    parts = inputs.unbiased() if want & UNBIASED_KEYS else None
    if parts is not None:
        # Drawn pairs are uniform among all pairs, so those kept are uniform among kept pairs.
        noise = parts.noise[i] + parts.noise[j]
        kept = ~_unresolved(dist2, noise)
        d_kept = (dist2 - noise)[kept]
        cdnv_u = (parts.half_var[i] + parts.half_var[j])[kept] / d_kept
        out["nc1_cdnv_unbiased"] = mean_estimate(cdnv_u)
        out["nc1_cdnv2_unbiased"] = mean_estimate(cdnv_u / d_kept)
    return {key: value for key, value in out.items() if key in want}
