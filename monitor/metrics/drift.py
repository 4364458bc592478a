"""Drift of a window's statistics against a pinned baseline (METRICS.md, "Drift").

Every drift metric is a function of the additive sufficient statistics alone, so it works on
merged windows and on a baseline pinned months ago, without raw samples.

The keys (`DRIFT_KEYS`), what each means and which way is bad are in the metric catalogue
(`monitor.metrics.catalogue`, docs/metrics.md); this module computes them. The ratios
without a sound finite-sample correction (`NOISE_GUARDED`, `SAMPLES_GUARDED`) move with the
window's traffic, so they are computed only where that bias is small on both sides, else absent
(a missing ratio never alerts): `mean_noise_ratio <= max_mean_noise` (default 0.05), or
`sample_count >= min_samples_per_dim * dim` (default 10), in window and baseline. The standard
errors (`RATIO_STDERR_KEYS`, `<key>_traffic_stderr`) are filled by the evaluator, not here.

Formulas (n = counts, S = sum of phi(h), Q = sum of ||phi(h)||^2, s_c/q_c = class sums):

- `drift_mmd = (||S_w||^2 - Q_w)/(n_w(n_w-1)) + (||S_b||^2 - Q_b)/(n_b(n_b-1))
  - 2 S_w.S_b/(n_w n_b)`: the U-statistic, which is unbiased for the squared MMD of the
  feature-space kernel `phi(x).phi(y)` (itself ~ the Gaussian kernel). Its null mean is 0, so
  it is slightly negative about half the time when nothing drifted; that is not an error.
  Absent when either side lacks RFF sums, their RFF configs differ, or a count is below 2.
- `drift_mmd_threshold`: see `mmd_threshold`. Each baseline bucket (a time slice of the
  baseline) is compared with the rest of the baseline; each MMD^2_u is divided by
  `1/n_bucket + 1/n_rest`; the `quantile` (default 0.99, numpy linear interpolation) of those
  values is multiplied by `1/n_window + 1/n_base`. Absent without calibration buckets, with
  fewer than 2 usable ones, or when `drift_mmd` is absent.
- `drift_mean_shift = ||s_w/N_w - s_b/N_b|| / sqrt(Tr Sigma_T(base))` with the global means
  over ALL samples (sample-weighted, not over C'), and `Tr Sigma_T(base) = sum_c q_c/N -
  ||s/N||^2`, evaluated as `(sum_c (q_c - ||s_c||^2/n_c) + sum_c n_c ||mu_c - mu||^2) / N`
  (within + between, which avoids cancelling `||mu||^2` when `||mu|| >> sigma`). Absent when
  the trace is 0.
- `drift_class_mean_cos = sum_c n_c (1 - cos(mu_c, mu_c_base)) / sum_c n_c` over the classes
  with `n_c >= min_count` in both (weights = window counts). Raw (uncentred) class means, as in
  METRICS.md; classes whose mean is the zero vector on either side are skipped. Absent when no
  class qualifies.
- `drift_label_js = H(m) - (H(p) + H(q))/2` in bits, `p, q` = `n_c/N` over all classes seen
  in either (no `min_count`), `m = (p+q)/2`, `0 log 0 = 0`.
- `drift_<key>_ratio = window[src] / base[src]`, `src = RATIO_SOURCE[key]` (`nc1_cdnv_unbiased`
  for `nc1_cdnv`, the key itself for the others); absent when either is missing, base is 0 or
  a volume guard fails.
- `top_classes`: the classes of `drift_class_mean_cos` ordered by contribution
  `n_c / sum n (1 - cos)`, at most `top_k` (the contributions of all classes sum to
  `drift_class_mean_cos`); ties by class id.

Assumptions and limits of the threshold: see `monitor.metrics.mmd`. A limit of the class means:

- `drift_class_mean_cos` uses raw means; in strongly anisotropic spaces (a large common mean)
  all raw cosines are near 1 and the metric is insensitive; `drift_mean_shift` and MMD are not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.errors import IncompatibleStats
from monitor.metrics.baseline import (
    BaselineSummary,
    ClassRows,
    common_classes_streamed,
    mean_shift,
)
from monitor.metrics.keys import (
    DRIFT_KEYS,
    NOISE_GUARDED,
    RATIO_KEYS,
    RATIO_SOURCE,
    RATIO_STDERR_KEYS,
    SAMPLES_GUARDED,
)
from monitor.metrics.mmd import mmd_threshold, mmd_unbiased
from monitor.metrics.options import DEFAULT_MAX_MEAN_NOISE, DEFAULT_MIN_SAMPLES_PER_DIM
from monitor.metrics.report import finite_or_none
from monitor.metrics.rows import row_ranges, tile_rows
from monitor.stats import CollapseStats
from monitor.stats.rff import BucketSums, bucket_sums

_F64 = torch.float64
# The key names and guard defaults above are defined torch-free (monitor.metrics.keys, .options,
# read by the exporter and rule generators) and re-exported here, their first home.

MetricValues = Mapping[str, float | int | None]

__all__ = [
    "DEFAULT_MAX_MEAN_NOISE",
    "DEFAULT_MIN_SAMPLES_PER_DIM",
    "DRIFT_KEYS",
    "NOISE_GUARDED",
    "RATIO_KEYS",
    "RATIO_SOURCE",
    "RATIO_STDERR_KEYS",
    "SAMPLES_GUARDED",
    "ClassDrift",
    "DriftReport",
    "compute_drift",
    "mmd_threshold",
    "mmd_unbiased",
    "top_drift_classes",
]


@dataclass(frozen=True)
class ClassDrift:
    """One class's drift: `contribution` = its share of the window's weight x cosine distance."""

    class_id: int
    count: int
    base_count: int
    cosine_distance: float
    contribution: float


@dataclass(frozen=True)
class DriftReport:
    """Every METRICS.md drift metric of one window against one baseline (None = absent)."""

    drift_mmd: float | None = None
    drift_mmd_threshold: float | None = None
    drift_mean_shift: float | None = None
    drift_class_mean_cos: float | None = None
    drift_label_js: float | None = None
    drift_nc1_cdnv_ratio: float | None = None
    drift_nc2_equiangularity_std_ratio: float | None = None
    drift_nc4_ncc_agreement_ratio: float | None = None
    drift_effective_rank_ratio: float | None = None
    top_classes: list[ClassDrift] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | None]:
        """Flat METRICS.md drift keys -> finite float or None, in catalogue order."""
        return {key: finite_or_none(getattr(self, key)) for key in DRIFT_KEYS}


# --------------------------------------------------------------------------- pieces
def _common_classes(
    window: CollapseStats, base: CollapseStats, min_count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class ids, window counts, cosine distances, base counts) of classes in both.

    Classes with `n >= min_count` in each and a nonzero mean on both sides, sorted by id. The
    means are compared a tile of classes at a time: whole mean matrices of both sides and their
    products were five K x d float64 matrices (20 GB at K = 128,256, d = 4,096).
    """
    dev = window.device
    win = window.classes(min_count)
    bas = base.classes(min_count)
    base_ids = bas.class_ids.to(dev)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    if win.num_classes == 0 or bas.num_classes == 0:
        return empty, empty, torch.empty(0, dtype=_F64, device=dev), empty
    pos = torch.searchsorted(base_ids, win.class_ids).clamp_max(base_ids.numel() - 1)
    found = base_ids[pos] == win.class_ids
    where = found.nonzero().squeeze(1)  # positions in `win` of the classes both have
    pos = pos[found]
    common = int(where.numel())
    cos = torch.empty(common, dtype=_F64, device=dev)
    ok = torch.empty(common, dtype=torch.bool, device=dev)
    base_dev = bas.storage.device
    for start, stop in row_ranges(common, tile_rows(window.dim)):
        mu_w = win.take_means(where[start:stop])
        mu_b = bas.take_means(pos[start:stop].to(base_dev)).to(dev)
        norms = mu_w.norm(dim=1) * mu_b.norm(dim=1)
        good = norms > 0
        ok[start:stop] = good
        cos[start:stop] = torch.where(good, (mu_w * mu_b).sum(dim=1) / norms, 0.0)
    cos = cos[ok].clamp(-1.0, 1.0)
    return (
        win.class_ids[where][ok],
        win.counts[where][ok],
        1.0 - cos,
        bas.counts.to(dev)[pos][ok],
    )


def top_drift_classes(
    window: CollapseStats, base: CollapseStats, *, k: int = 20, min_count: int = 2
) -> list[ClassDrift]:
    """The `k` classes contributing most to `drift_class_mean_cos`, most first (ties by id)."""
    _check(window, base)
    return _top_classes(_common_classes(window, base, min_count), k)


_Common = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _top_classes(common: _Common, k: int) -> list[ClassDrift]:
    ids, counts, dist, base_counts = common
    if k <= 0 or ids.numel() == 0:
        return []
    contrib = counts.to(_F64) * dist / float(counts.sum())
    # Stable sort on -contribution of id-sorted rows: equal contributions keep id order.
    order = torch.sort(-contrib, stable=True).indices[:k]
    return [
        ClassDrift(
            class_id=int(ids[i]),
            count=int(counts[i]),
            base_count=int(base_counts[i]),
            cosine_distance=float(dist[i]),
            contribution=float(contrib[i]),
        )
        for i in order.tolist()
    ]


def _class_mean_cos(common: _Common) -> float | None:
    _, counts, dist, _ = common
    if counts.numel() == 0:
        return None
    w = counts.to(_F64)
    return float((w * dist).sum() / w.sum())


def _label_js(window: CollapseStats, base: CollapseStats | BaselineSummary) -> float | None:
    """Jensen-Shannon divergence in bits between n_c/N of window and base, over the union."""
    dev = window.device
    n_w = float(window.counts.sum()) if window.touched_classes else 0.0
    n_b = float(base.counts.sum()) if base.touched_classes else 0.0
    if n_w == 0 or n_b == 0:
        return None
    p = torch.zeros(window.num_classes, dtype=_F64, device=dev)
    q = torch.zeros(window.num_classes, dtype=_F64, device=dev)
    p[window.class_ids] = window.counts.to(_F64) / n_w
    q[base.class_ids.to(dev)] = base.counts.to(device=dev, dtype=_F64) / n_b
    m = 0.5 * (p + q)

    def kl_to_m(x: torch.Tensor) -> torch.Tensor:
        pos = x > 0
        return (x[pos] * torch.log2(x[pos] / m[pos])).sum()

    js = 0.5 * float(kl_to_m(p)) + 0.5 * float(kl_to_m(q))
    return min(max(js, 0.0), 1.0)


def _ratio(window: MetricValues | None, base: MetricValues | None, key: str) -> float | None:
    if window is None or base is None:
        return None
    num, den = window.get(key), base.get(key)
    if num is None or den is None or den == 0:
        return None
    return finite_or_none(float(num) / float(den))


def _quiet(metrics: MetricValues | None, max_mean_noise: float) -> bool:
    """The class means' estimation noise is a small share of their spread (guard passes)."""
    noise = None if metrics is None else metrics.get("mean_noise_ratio")
    return noise is not None and float(noise) <= max_mean_noise


def _ratios(
    window: CollapseStats,
    base: CollapseStats | BaselineSummary,
    window_metrics: MetricValues | None,
    base_metrics: MetricValues | None,
    max_mean_noise: float,
    min_samples_per_dim: float,
) -> dict[str, float | None]:
    """`drift_<k>_ratio` of every RATIO_KEYS key, None where absent or guarded (module doc)."""
    quiet = _quiet(window_metrics, max_mean_noise) and _quiet(base_metrics, max_mean_noise)
    floor = min_samples_per_dim * window.dim
    enough = window.sample_count >= floor and base.sample_count >= floor
    out: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        allowed = (key not in NOISE_GUARDED or quiet) and (key not in SAMPLES_GUARDED or enough)
        value = _ratio(window_metrics, base_metrics, RATIO_SOURCE[key]) if allowed else None
        out[f"drift_{key}_ratio"] = value
    return out


def _check(window: CollapseStats, base: CollapseStats | BaselineSummary) -> None:
    if window.num_classes != base.num_classes or window.dim != base.dim:
        raise IncompatibleStats(
            f"cannot compare statistics of (num_classes, dim) ({window.num_classes}, "
            f"{window.dim}) with a baseline of ({base.num_classes}, {base.dim})"
        )


def _mmd(window: CollapseStats, base: BaselineSummary) -> float | None:
    if window.rff_sum is None or base.rff_sum is None or window.rff != base.rff:
        return None
    if window.sample_count < 2 or base.sample_count < 2:
        return None
    base_sums = BucketSums(base.sample_count, base.rff_sum.to(_F64), base.rff_sq)
    return finite_or_none(mmd_unbiased(bucket_sums(window), base_sums))


# --------------------------------------------------------------------------- entry point
def compute_drift(
    window: CollapseStats,
    base: CollapseStats | BaselineSummary,
    *,
    base_rows: Callable[[], Iterable[ClassRows]] | None = None,
    window_metrics: MetricValues | None = None,
    base_metrics: MetricValues | None = None,
    base_buckets: Sequence[BucketSums] | None = None,
    min_count: int = 2,
    quantile: float = 0.99,
    top_k: int = 20,
    max_mean_noise: float = DEFAULT_MAX_MEAN_NOISE,
    min_samples_per_dim: float = DEFAULT_MIN_SAMPLES_PER_DIM,
) -> DriftReport:
    """Every drift metric of `window` against `base` (see the module docstring).

    `window_metrics`/`base_metrics` are `MetricReport.as_dict()` of each, for the ratios, which
    `max_mean_noise` and `min_samples_per_dim` guard (see the module docstring); `base_buckets`
    are the baseline's per-bucket RFF sums, for the MMD threshold. `base` may be a
    `BaselineSummary` (no class sums held): then `base_rows()` streams its class rows for the
    one per-class comparison. Raises IncompatibleStats when vocabulary size or dimension differ.
    """
    _check(window, base)
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if isinstance(base, CollapseStats):
        common = _common_classes(window, base, min_count)
        summary = BaselineSummary.of(base)
    elif base_rows is None:
        raise ValueError("a BaselineSummary needs base_rows, the stream of its class rows")
    else:
        common = common_classes_streamed(window, base_rows(), min_count)
        summary = base
    mmd = _mmd(window, summary)
    threshold = None
    if mmd is not None and base_buckets and base.rff is not None:
        usable = [b for b in base_buckets if b.rff_sum.numel() == base.rff.features]
        if len(usable) == len(base_buckets):
            threshold = mmd_threshold(usable, window.sample_count, base.sample_count, quantile)
    ratios = _ratios(
        window, base, window_metrics, base_metrics, max_mean_noise, min_samples_per_dim
    )
    return DriftReport(
        drift_mmd=mmd,
        drift_mmd_threshold=finite_or_none(threshold),
        drift_mean_shift=finite_or_none(mean_shift(window, summary)),
        drift_class_mean_cos=finite_or_none(_class_mean_cos(common)),
        drift_label_js=finite_or_none(_label_js(window, base)),
        drift_nc1_cdnv_ratio=ratios["drift_nc1_cdnv_ratio"],
        drift_nc2_equiangularity_std_ratio=ratios["drift_nc2_equiangularity_std_ratio"],
        drift_nc4_ncc_agreement_ratio=ratios["drift_nc4_ncc_agreement_ratio"],
        drift_effective_rank_ratio=ratios["drift_effective_rank_ratio"],
        top_classes=_top_classes(common, top_k),
    )
