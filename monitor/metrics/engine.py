"""`compute_metrics`: every collapse and geometry metric of METRICS.md from `CollapseStats`."""

from __future__ import annotations

import time

import torch

from monitor.errors import InvalidInput
from monitor.metrics.duality import duality, nc4_from_samples
from monitor.metrics.geometry import anisotropy_mean_cos, effective_rank, trace_ratio
from monitor.metrics.options import (  # defined torch-free there; imported from here before
    DEFAULT_MAX_EXACT_CLASSES,
    DEFAULT_MIN_COUNT,
    DEFAULT_NC4_MAX_SAMPLES,
    DEFAULT_PAIR_SAMPLES,
    DEFAULT_TILE_SIZE,
)
from monitor.metrics.options import MetricOptions as MetricOptions
from monitor.metrics.pairwise import PairInputs, exact_pair_metrics, sampled_pair_metrics
from monitor.metrics.report import Estimate, MetricReport
from monitor.metrics.rows import ClassMeans, HeadRows
from monitor.stats import CollapseStats
from monitor.stats.validation import ArrayLike, all_finite, as_tensor

_F64 = torch.float64


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
    """
    started = time.perf_counter()
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    dev = resolve_device(device) if device is not None else stats.device
    weight, head_bias = _check_head(stats, classifier, bias)
    kept = stats.classes(min_count=min_count)
    k = kept.num_classes
    classes = ClassMeans(kept, dev)
    exact = k <= max_exact_classes
    if k >= 2 and (exact or dev != kept.storage.device):
        # The exact walk reads every tile K / tile times, and a device other than the storage's
        # would copy every tile across each time: one (K, d) matrix of centred means instead.
        classes.materialise()
    fields: dict[str, float | None] = {
        "anisotropy_mean_cos": anisotropy_mean_cos(stats),
        "effective_rank": effective_rank(stats, dev),
    }
    estimates: dict[str, Estimate] = {}
    if k >= 2:
        norms = classes.centred_norms()
        fields["nc2_equinorm_cv"] = _cov(norms)
        fields["nc1_trace_ratio"] = trace_ratio(stats, kept, classes, min_count, dev)
        counts = kept.counts.to(dev)
        inputs = PairInputs(classes, kept.variances().to(dev), norms * norms, counts)
        fields["mean_noise_ratio"] = mean_noise_ratio(inputs.variances, counts, inputs.sq_norms)
        if exact:
            estimates.update(exact_pair_metrics(inputs, tile=tile_size))
        else:
            estimates.update(sampled_pair_metrics(inputs, samples=pair_samples, seed=seed))
    else:
        exact = True
    if weight is not None and k >= 1:
        head = HeadRows(weight, head_bias, kept.class_ids, dev)
        if k >= 2:
            mean_cos, cv = duality(head, classes)
            fields["nc3_duality_mean_cos"] = mean_cos
            fields["nc3_uniform_duality_cv"] = cv
        estimates["nc4_ncc_agreement"] = _nc4(
            stats, eval_features, classes, head, nc4_max_samples, seed, dev
        )
    return MetricReport(
        class_count=k,
        sample_count=stats.sample_count,
        estimates=estimates,
        exact_pairs=exact,
        seconds=time.perf_counter() - started,
        **fields,
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
        return Estimate(stats.nc4_hits / stats.nc4_total)
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
