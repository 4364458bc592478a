"""Inference for `study`: run-clustered bootstrap intervals and partial correlations.

Checkpoints of one training run are not independent draws (they share the initialisation, the
batch order and everything trained before them), so resampling checkpoints understates the
uncertainty of a correlation across them. The bootstrap here resamples whole runs: each
resample draws as many runs as there are, with replacement, and takes every checkpoint of each.

Loss falls with model size and training length, and so does almost every metric: a correlation
with loss is then no evidence that the metric carries anything beyond scale. The partial
correlations remove the linear part of the controls (log10 parameters, log10 tokens seen) from
both sides: Pearson's r of the residuals of ordinary least squares on [1, controls] (`partial_r`),
and the same on ranks (`partial_rho`: every variable replaced by its average ranks first).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitor.offline.correlation import Correlation, Interval, average_ranks, correlate, pearson

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
# A statistic of (x, y, controls (n, c)), None where it is not defined on that sample.
Statistic = Callable[[FloatArray, FloatArray, FloatArray], float | None]

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
# An interval needs this fraction of resamples to give a value (a resample can have a constant
# side, e.g. one run drawn every time); else it is null rather than an interval of the few.
MIN_VALID_FRACTION = 0.5


@dataclass(frozen=True)
class BootstrapPlan:
    """Which rows each resample takes: every checkpoint of the runs drawn, as index arrays."""

    resamples: list[IntArray]
    clusters: int
    level: float
    seed: int


def residuals(y: FloatArray, controls: FloatArray) -> FloatArray:
    """y minus its least-squares fit on [1, controls] (controls: (n, c); c may be 0)."""
    design = np.column_stack([np.ones(y.size), controls])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    out: FloatArray = y - design @ coef
    return out


def partial_pearson(x: FloatArray, y: FloatArray, controls: FloatArray) -> float | None:
    """Pearson's r of x and y after removing their linear fit on the controls.

    None when too few points remain to say anything (n <= controls + 2) or a residual is
    constant (a side explained exactly by the controls).
    """
    if x.size <= controls.shape[1] + 2:
        return None
    rx, ry = residuals(x, controls), residuals(y, controls)
    # Residuals at rounding level: the controls explain that side exactly.
    if _negligible(rx, x) or _negligible(ry, y):
        return None
    return pearson(rx, ry)


def partial_spearman(x: FloatArray, y: FloatArray, controls: FloatArray) -> float | None:
    """`partial_pearson` of the average ranks of x, y and of each control."""
    ranked = (
        np.column_stack([average_ranks(c) for c in controls.T]) if controls.shape[1] else (controls)
    )
    return partial_pearson(average_ranks(x), average_ranks(y), ranked)


def _negligible(resid: FloatArray, original: FloatArray) -> bool:
    scale = float(np.abs(original - original.mean()).max()) if original.size else 0.0
    return scale == 0.0 or float(np.abs(resid).max()) <= 1e-10 * scale


def plain_pearson(x: FloatArray, y: FloatArray, controls: FloatArray) -> float | None:
    return pearson(x, y)


def plain_spearman(x: FloatArray, y: FloatArray, controls: FloatArray) -> float | None:
    return pearson(average_ranks(x), average_ranks(y))


def cluster_plan(
    clusters: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> BootstrapPlan:
    """The row indices of `resamples` cluster-bootstrap samples of rows labelled `clusters`.

    Clusters are numbered in order of first appearance; resample b draws G cluster numbers with
    `numpy.random.default_rng(seed).integers(0, G, G)` (one call per resample, in order) and
    takes their rows in the order drawn. Labelling every row differently is the ordinary
    (checkpoint-level) bootstrap.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    order: dict[str, int] = {}
    members: list[list[int]] = []
    for i, label in enumerate(clusters):
        if label not in order:
            order[label] = len(members)
            members.append([])
        members[order[label]].append(i)
    g = len(members)
    arrays = [np.asarray(m, dtype=np.int64) for m in members]
    rng = np.random.default_rng(seed)
    draws: list[IntArray] = []
    if g >= 2:
        for _ in range(resamples):
            picked = rng.integers(0, g, g)
            draws.append(np.concatenate([arrays[int(c)] for c in picked]))
    return BootstrapPlan(draws, g, level, seed)


def bootstrap_interval(
    statistic: Statistic,
    x: FloatArray,
    y: FloatArray,
    controls: FloatArray,
    plan: BootstrapPlan,
) -> Interval | None:
    """The percentile interval of `statistic` over the plan's resamples (None: fewer than 2
    clusters, or fewer than MIN_VALID_FRACTION of the resamples gave a value)."""
    if not plan.resamples:
        return None
    defined = np.isfinite(x) & np.isfinite(y)
    values = []
    for drawn in plan.resamples:
        rows = drawn[defined[drawn]]  # rows where this metric is not null
        value = statistic(x[rows], y[rows], controls[rows])
        if value is not None and math.isfinite(value):
            values.append(value)
    if len(values) < MIN_VALID_FRACTION * len(plan.resamples):
        return None
    tail = (1.0 - plan.level) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    return Interval(float(low), float(high), len(values))


def infer(
    metric: str,
    values: Sequence[float | None],
    losses: Sequence[float],
    clusters: Sequence[str],
    controls: FloatArray,
    plan: BootstrapPlan,
    expected_sign: int | None = None,
) -> Correlation:
    """`correlate`, plus the run-clustered intervals and the partial correlations.

    `controls` (n, c) are the control variables per row (c = 0: the partials are the plain
    correlations); the Pearson statistics use the scale `correlate` chose (log10 or linear)
    for the metric, fixed from the full sample so every resample measures the same thing.
    """
    base = correlate(metric, values, losses, expected_sign)
    x = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    defined = np.isfinite(x) & np.isfinite(y)
    if base.scale == "log10":
        x = np.where(defined, np.log10(np.where(defined, x, 1.0)), math.nan)
    runs = len({c for c, ok in zip(clusters, defined, strict=True) if ok})
    if base.n < 3:
        return dataclasses.replace(base, runs=runs)
    xs, ys, cs = x[defined], y[defined], controls[defined]
    return dataclasses.replace(
        base,
        runs=runs,
        pearson_ci=bootstrap_interval(plain_pearson, x, y, controls, plan),
        spearman_ci=bootstrap_interval(plain_spearman, x, y, controls, plan),
        partial_r=partial_pearson(xs, ys, cs),
        partial_r_ci=bootstrap_interval(partial_pearson, x, y, controls, plan),
        partial_rho=partial_spearman(xs, ys, cs),
        partial_rho_ci=bootstrap_interval(partial_spearman, x, y, controls, plan),
    )


@dataclass(frozen=True)
class Analysis:
    """Every metric's correlations with loss, and how the inference was made."""

    controls: tuple[str, ...]  # the partial correlations' control variables
    runs: int  # clusters of the bootstrap
    resamples: int
    level: float
    seed: int
    correlations: list[Correlation]


def control_matrix(
    parameters: Sequence[int], tokens_seen: Sequence[int | None]
) -> tuple[tuple[str, ...], FloatArray]:
    """log10 parameters, and log10 tokens seen when every checkpoint has it: (names, (n, c))."""
    names = ["log10_parameters"]
    columns = [np.log10(np.asarray(parameters, dtype=np.float64))]
    if tokens_seen and all(t is not None for t in tokens_seen):
        names.append("log10_tokens_seen")
        columns.append(np.log10(np.asarray(tokens_seen, dtype=np.float64)))
    return tuple(names), np.column_stack(columns)


def analyse(
    columns: dict[str, list[float | None]],
    losses: Sequence[float],
    runs: Sequence[str],
    parameters: Sequence[int],
    tokens_seen: Sequence[int | None],
    expected_sign: dict[str, int],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Analysis:
    """`infer` for each metric column (one bootstrap plan shared by all of them)."""
    names, controls = control_matrix(parameters, tokens_seen)
    plan = cluster_plan(runs, resamples, seed, level)
    out = [
        infer(key, values, losses, runs, controls, plan, expected_sign.get(key))
        for key, values in columns.items()
    ]
    return Analysis(names, plan.clusters, resamples, level, seed, out)
