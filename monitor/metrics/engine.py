"""`compute_metrics`: every collapse and geometry metric of METRICS.md from `CollapseStats`."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

import torch

from monitor.errors import InvalidInput
from monitor.metrics.duality import duality, nc4_from_samples
from monitor.metrics.geometry import anisotropy_mean_cos, effective_rank, trace_ratio
from monitor.metrics.nc4 import agreement_estimate
from monitor.metrics.options import (  # defined torch-free there; imported from here before
    DEFAULT_MAX_EXACT_CLASSES,
    DEFAULT_MIN_COUNT,
    DEFAULT_NC4_MAX_SAMPLES,
    DEFAULT_PAIR_SAMPLES,
    DEFAULT_TILE_SIZE,
)
from monitor.metrics.options import MetricOptions as MetricOptions
from monitor.metrics.pairwise import (
    PAIR_METRICS,
    PairInputs,
    draw_pairs,
    exact_pair_metrics,
    sampled_pair_metrics,
)
from monitor.metrics.report import ESTIMATED_KEYS, REPORT_KEYS, Estimate, MetricReport
from monitor.metrics.rows import ClassMeans, HeadRows
from monitor.stats import CollapseStats
from monitor.stats.validation import ArrayLike, all_finite, as_tensor

_F64 = torch.float64
# Keys computed from global sums alone (no class rows): a call asking only for these reads none.
_GLOBAL_KEYS = frozenset({"anisotropy_mean_cos", "effective_rank", "class_count", "sample_count"})
_NC3_KEYS = frozenset({"nc3_duality_mean_cos", "nc3_uniform_duality_cv"})


@dataclass(frozen=True)
class ClassPairs:
    """Class pairs by class id (`first[p]`, `second[p]`), for the sampled pair metrics.

    Drawn once for a window (`draw_class_pairs`) and given to `compute_metrics` of statistics
    that keep a subset of its classes (a jackknife replicate): the pairs whose two classes are
    both kept are used, so the replicates share their pairs and their differences carry no
    pair-sampling noise of their own. Pairs uniform among the window's kept classes, restricted
    to those with both classes in a subset, are uniform among the subset's pairs.
    """

    first: torch.Tensor  # (P,) int64 class ids, on the CPU
    second: torch.Tensor  # (P,) int64 class ids, second[p] != first[p]

    def __len__(self) -> int:
        return int(self.first.numel())

    def positions(
        self, class_ids: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j) positions in `class_ids` (sorted kept ids) of the pairs with both kept."""
        where = torch.full((num_classes,), -1, dtype=torch.int64)
        where[class_ids.cpu()] = torch.arange(int(class_ids.numel()), dtype=torch.int64)
        i, j = where[self.first], where[self.second]
        both = (i >= 0) & (j >= 0)
        if bool(both.all()):
            return i, j
        return i[both], j[both]


def draw_class_pairs(
    stats: CollapseStats, *, samples: int, seed: int, min_count: int = DEFAULT_MIN_COUNT
) -> ClassPairs | None:
    """The pairs `compute_metrics(stats, pair_samples=samples, seed=seed, min_count=...)` draws
    in sampled mode, by class id (None with fewer than 2 kept classes): passed back as `pairs`,
    they give the same values."""
    kept = stats.classes(min_count=min_count)
    if kept.num_classes < 2:
        return None
    first, second = draw_pairs(kept.num_classes, samples, seed)
    ids = kept.class_ids.cpu()
    return ClassPairs(ids[first], ids[second])


def wanted_keys(keys: Collection[str] | None) -> frozenset[str]:
    """The metric keys to compute for `keys` (None: all; `<key>_stderr` stands for `<key>`);
    ValueError for a key that is not a `compute_metrics` key."""
    if keys is None:
        return frozenset(REPORT_KEYS)
    out = set()
    for key in (keys,) if isinstance(keys, str) else keys:  # one key, not its letters
        if key not in REPORT_KEYS:
            raise ValueError(f"compute_metrics has no key {key!r}")
        base = key.removesuffix("_stderr")
        out.add(base if base in ESTIMATED_KEYS and base != key else key)
    return frozenset(out)


def compute_metrics(
    stats: CollapseStats,
    classifier: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    max_exact_classes: int = DEFAULT_MAX_EXACT_CLASSES,
    pair_samples: int = DEFAULT_PAIR_SAMPLES,
    eval_features: ArrayLike | None = None,
    nc4_max_samples: int = DEFAULT_NC4_MAX_SAMPLES,
    seed: int = 0,
    device: str | torch.device | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    keys: Collection[str] | None = None,
    pairs: ClassPairs | None = None,
) -> MetricReport:
    """Metrics over the classes with at least `min_count` samples.

    `classifier` (V, d) and `bias` (V,) are the LM head, indexed by class id; NC3 and NC4 need
    them. They may be in any floating dtype (an LLM head is bf16/fp16/fp32): rows are gathered
    and upcast to float64 a tile at a time, which gives the values of a float64 copy of the
    head without making one. NC4 is measured on `eval_features` when given (subsampled above
    `nc4_max_samples`), else taken from the hit counts capture recorded in `stats`. Pairwise
    metrics are exact up to `max_exact_classes` classes and estimated from `pair_samples` pairs
    above that.

    Memory above the inputs: with sampled pairs and on the statistics' own device, tiles only
    (no K x d matrix: means, centred means and head rows are derived per tile, see
    `monitor.metrics.rows`); with exact pairs, or another compute device, one K x d float64
    matrix of centred means besides. Plus d x d matrices for the trace ratio and effective rank
    when `stats` has the second moment. The statistics are only read.

    `keys` (REPORT_KEYS; default all): compute only what these need, e.g. no trace ratio, NC3
    or log energy for a jackknife replicate; the others are None in the report, and each
    computed value is the one the full call gives. `pairs`: estimate the pair metrics from
    these class pairs (those with both classes kept), whatever K and `max_exact_classes`.
    """
    started = time.perf_counter()
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    want = wanted_keys(keys)
    dev = resolve_device(device) if device is not None else stats.device
    weight, head_bias = _check_head(stats, classifier, bias)
    kept = stats.classes(min_count=min_count)
    k = kept.num_classes
    pair_keys = want & frozenset(PAIR_METRICS)
    exact = k <= max_exact_classes and pairs is None
    fields: dict[str, float | None] = {}
    if "anisotropy_mean_cos" in want:
        fields["anisotropy_mean_cos"] = anisotropy_mean_cos(stats)
    if "effective_rank" in want:
        fields["effective_rank"] = effective_rank(stats, dev)
    estimates: dict[str, Estimate] = {}
    if k < 1 or not want - _GLOBAL_KEYS:
        return _report(stats, k, estimates, k < 2 or exact, started, fields, want)
    classes = ClassMeans(kept, dev)
    if k >= 2 and ((exact and pair_keys) or dev != kept.storage.device):
        # The exact walk reads every tile K / tile times, and a device other than the storage's
        # would copy every tile across each time: one (K, d) matrix of centred means instead.
        classes.materialise()
    if k >= 2 and want & {"nc2_equinorm_cv", "mean_noise_ratio", *pair_keys}:
        norms = classes.centred_norms()
        counts = kept.counts.to(dev)
        inputs = PairInputs(classes, kept.variances().to(dev), norms * norms, counts)
        if "nc2_equinorm_cv" in want:
            fields["nc2_equinorm_cv"] = _cov(norms)
        if "mean_noise_ratio" in want:
            fields["mean_noise_ratio"] = mean_noise_ratio(inputs.variances, counts, inputs.sq_norms)
        if pair_keys and exact:
            estimates.update(exact_pair_metrics(inputs, tile=tile_size, keys=pair_keys))
        elif pair_keys:
            chosen = None if pairs is None else pairs.positions(kept.class_ids, stats.num_classes)
            estimates.update(
                sampled_pair_metrics(
                    inputs, samples=pair_samples, seed=seed, keys=pair_keys, pairs=chosen
                )
            )
    if k >= 2 and "nc1_trace_ratio" in want:
        fields["nc1_trace_ratio"] = trace_ratio(stats, kept, classes, min_count, dev)
    if weight is not None and want & (_NC3_KEYS | {"nc4_ncc_agreement"}):
        head = HeadRows(weight, head_bias, kept.class_ids, dev)
        if k >= 2 and want & _NC3_KEYS:
            mean_cos, cv = duality(head, classes)
            fields["nc3_duality_mean_cos"] = mean_cos
            fields["nc3_uniform_duality_cv"] = cv
        if "nc4_ncc_agreement" in want:
            estimates["nc4_ncc_agreement"] = _nc4(
                stats, eval_features, classes, head, nc4_max_samples, seed, dev
            )
    return _report(stats, k, estimates, k < 2 or exact, started, fields, want)


def _report(
    stats: CollapseStats,
    k: int,
    estimates: dict[str, Estimate],
    exact: bool,
    started: float,
    fields: dict[str, float | None],
    want: frozenset[str],
) -> MetricReport:
    """The report of the keys in `want` (a value computed on the way to another is left out)."""
    return MetricReport(
        class_count=k,
        sample_count=stats.sample_count,
        estimates={key: e for key, e in estimates.items() if key in want},
        exact_pairs=exact,
        seconds=time.perf_counter() - started,
        **{key: value for key, value in fields.items() if key in want},
    )


def mean_noise_ratio(
    variances: torch.Tensor, counts: torch.Tensor, sq_norms: torch.Tensor
) -> float | None:
    """`sum_c s~_c^2/n_c / sum_c ||m_c||^2` over the classes with n_c >= 2 (METRICS.md notation).

    The share of the class means' spread that is the noise of estimating them from this
    window: the drift guards compare metrics without a sound correction only when it is small.
    None with fewer than 2 such classes or no spread at all.
    """
    n = counts.to(_F64)
    usable = n >= 2
    if int(usable.sum()) < 2:
        return None
    n_u = n[usable]
    noise = float((variances[usable] / (n_u - 1.0)).sum())  # s~^2/n = sigma^2/(n-1)
    spread = float(sq_norms[usable].sum())
    return noise / spread if spread > 0 else None


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _nc4(
    stats: CollapseStats,
    eval_features: ArrayLike | None,
    classes: ClassMeans,
    head: HeadRows,
    max_samples: int,
    seed: int,
    device: torch.device,
) -> Estimate:
    if eval_features is not None:
        feats = as_tensor(eval_features, "eval_features")
        if feats.ndim != 2 or feats.shape[1] != stats.dim:
            raise InvalidInput(
                "wrong_dimension",
                f"eval features must be (N, {stats.dim}), got {tuple(feats.shape)}",
            )
        if not feats.is_floating_point() or not all_finite(feats):
            raise InvalidInput("non_finite", "eval features must be finite floating point values")
        return nc4_from_samples(feats.to(device), classes, head, max_samples=max_samples, seed=seed)
    if stats.nc4_total > 0:
        return agreement_estimate(
            stats.nc4_hits, stats.nc4_total, classes.num_classes, sampled=False
        )
    return Estimate(None)


def _check_head(
    stats: CollapseStats, classifier: ArrayLike | None, bias: ArrayLike | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if classifier is None:
        if bias is not None:
            raise InvalidInput("wrong_shape", "a bias was given without a classifier")
        return None, None
    w = as_tensor(classifier, "classifier")
    expected = (stats.num_classes, stats.dim)
    if tuple(w.shape) != expected:
        raise InvalidInput(
            "wrong_shape", f"classifier must have shape {expected}, got {tuple(w.shape)}"
        )
    if not w.is_floating_point() or not all_finite(w):
        raise InvalidInput("non_finite", "classifier weights must be finite floating point values")
    b = None
    if bias is not None:
        b = as_tensor(bias, "bias")
        if tuple(b.shape) != (stats.num_classes,):
            raise InvalidInput(
                "wrong_shape", f"bias must have shape ({stats.num_classes},), got {tuple(b.shape)}"
            )
        if not b.is_floating_point() or not all_finite(b):
            raise InvalidInput("non_finite", "bias must be finite floating point values")
    return w, b


def _cov(values: torch.Tensor) -> float | None:
    """Population coefficient of variation, None when the mean is 0."""
    mean = float(values.mean())
    return float(values.std(correction=0)) / mean if mean != 0 else None
