"""Correlation of a metric with validation loss across checkpoints, in numpy (no scipy).

Wu & Papyan report how well a collapse metric predicts validation loss across many models:
R^2 of a linear fit of loss on log10 CDNV, for instance. `correlate` reproduces that: Pearson
on log10 of the metric when the metric is positive and spans more than one decade (it says
which scale it used), Spearman on ranks (ties get their average rank), and R^2 = r^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Scale = Literal["log10", "linear"]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval and how many resamples gave a value."""

    low: float
    high: float
    valid: int


@dataclass(frozen=True)
class Correlation:
    """How one metric goes with validation loss over the checkpoints where it is defined.

    `pearson_r`/`r2` are of `scale`(metric) against loss; `spearman_rho` does not depend on
    the scale. A value is None when fewer than 3 points remain or one side is constant.
    `expected_sign` is the sign Wu & Papyan's finding predicts (+1: more collapse, i.e. a
    lower metric, goes with lower loss; -1: a higher metric does), None when there is none;
    `agrees` says whether Spearman's sign matches it.

    The inference fields are filled in by `study_stats.infer` (None otherwise): `runs` is the
    number of runs (bootstrap clusters) among the checkpoints used; `*_ci` are run-clustered
    bootstrap intervals; `partial_r`/`partial_rho` are Pearson/Spearman after removing the
    linear fit on the controls (log10 parameters, log10 tokens seen) from both sides.
    """

    metric: str
    n: int
    scale: Scale
    pearson_r: float | None
    r2: float | None
    spearman_rho: float | None
    expected_sign: int | None = None
    runs: int | None = None
    pearson_ci: Interval | None = None
    spearman_ci: Interval | None = None
    partial_r: float | None = None
    partial_r_ci: Interval | None = None
    partial_rho: float | None = None
    partial_rho_ci: Interval | None = None

    @property
    def agrees(self) -> bool | None:
        if self.expected_sign is None or self.spearman_rho is None or self.spearman_rho == 0:
            return None
        return (self.spearman_rho > 0) == (self.expected_sign > 0)


def _array(values: Sequence[float] | FloatArray) -> FloatArray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def pearson(x: Sequence[float] | FloatArray, y: Sequence[float] | FloatArray) -> float | None:
    """Pearson's r in float64; None for fewer than 2 points or a constant side."""
    a, b = _array(x), _array(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    if denom == 0.0 or not math.isfinite(denom):
        return None
    # Rounding can push |r| a hair past 1 for exactly linear data.
    return max(-1.0, min(1.0, float(np.dot(da, db)) / denom))


def average_ranks(values: Sequence[float] | FloatArray) -> FloatArray:
    """Ranks 1..n; tied values share the average of the ranks they span."""
    a = _array(values)
    order = np.argsort(a, kind="mergesort")
    sorted_vals = a[order]
    ranks = np.empty(a.size, dtype=np.float64)
    start = 0
    while start < a.size:
        stop = start + 1
        while stop < a.size and sorted_vals[stop] == sorted_vals[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1..stop
        start = stop
    return ranks


def spearman(x: Sequence[float] | FloatArray, y: Sequence[float] | FloatArray) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def choose_scale(values: Sequence[float] | FloatArray) -> Scale:
    """log10 when every value is positive and max/min exceeds 10, else linear."""
    a = _array(values)
    if a.size and bool(np.all(a > 0)) and float(a.max()) / float(a.min()) > 10.0:
        return "log10"
    return "linear"


def correlate(
    metric: str,
    values: Sequence[float | None],
    losses: Sequence[float],
    expected_sign: int | None = None,
) -> Correlation:
    """Correlate the defined (finite) values of one metric with the matching losses."""
    if len(values) != len(losses):
        raise ValueError(f"{len(values)} metric values but {len(losses)} losses")
    pairs = [
        (float(v), float(loss))
        for v, loss in zip(values, losses, strict=True)
        if v is not None and math.isfinite(v) and math.isfinite(loss)
    ]
    x, y = _array([p[0] for p in pairs]), _array([p[1] for p in pairs])
    scale = choose_scale(x)
    if len(pairs) < 3:
        return Correlation(metric, len(pairs), scale, None, None, None, expected_sign)
    r = pearson(np.log10(x) if scale == "log10" else x, y)
    return Correlation(
        metric=metric,
        n=len(pairs),
        scale=scale,
        pearson_r=r,
        r2=None if r is None else r * r,
        spearman_rho=spearman(x, y),
        expected_sign=expected_sign,
    )


def _interval(value: Interval | None) -> list[float] | None:
    return None if value is None else [value.low, value.high]


def correlation_json(c: Correlation) -> dict[str, Any]:
    """One correlation as study.json has it (intervals as [low, high] or null)."""
    return {
        "metric": c.metric,
        "n": c.n,
        "runs": c.runs,
        "scale": c.scale,
        "pearson_r": c.pearson_r,
        "pearson_ci": _interval(c.pearson_ci),
        "r2": c.r2,
        "spearman_rho": c.spearman_rho,
        "spearman_ci": _interval(c.spearman_ci),
        "partial_r": c.partial_r,
        "partial_r_ci": _interval(c.partial_r_ci),
        "partial_rho": c.partial_rho,
        "partial_rho_ci": _interval(c.partial_rho_ci),
        "expected_sign": c.expected_sign,
        "agrees": c.agrees,
    }
