"""`MetricReport`: the typed result of `compute_metrics`, flattened to METRICS.md keys on demand.

A value that cannot be computed (too few classes, no classifier, no second moment) is `None`,
never 0 or NaN, so an exporter can omit the sample instead of drawing a false line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The key tuples live torch-free in monitor.metrics.keys; re-exported here, their first home.
from monitor.metrics.keys import (
    ALERT_STDERR_KEYS,
    COLLAPSE_KEYS,
    ESTIMATED_KEYS,
    GEOMETRY_KEYS,
    REPORT_KEYS,
    STDERR_KEYS,
    TRAFFIC_STDERR_KEYS,
    TRAFFIC_STDERR_SUFFIX,
)

__all__ = [
    "ALERT_STDERR_KEYS",
    "COLLAPSE_KEYS",
    "ESTIMATED_KEYS",
    "GEOMETRY_KEYS",
    "REPORT_KEYS",
    "STDERR_KEYS",
    "TRAFFIC_STDERR_KEYS",
    "TRAFFIC_STDERR_SUFFIX",
    "Estimate",
    "MetricReport",
    "finite_or_none",
    "format_value",
]


def finite_or_none(value: float | None) -> float | None:
    """The value as a float, or None when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error; `stderr` is None when the value is exact."""

    value: float | None
    stderr: float | None = None


@dataclass(frozen=True)
class MetricReport:
    """Every collapse and geometry metric of one set of statistics.

    `estimates` holds the metrics of ESTIMATED_KEYS with their standard errors; the others are
    plain fields. `exact_pairs` says whether pairwise metrics used every pair of classes.
    """

    class_count: int
    sample_count: int
    nc1_trace_ratio: float | None = None
    nc2_equinorm_cv: float | None = None
    nc3_duality_mean_cos: float | None = None
    nc3_uniform_duality_cv: float | None = None
    anisotropy_mean_cos: float | None = None
    effective_rank: float | None = None
    mean_noise_ratio: float | None = None
    estimates: dict[str, Estimate] = field(default_factory=dict)
    exact_pairs: bool = True
    seconds: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.estimates) - set(ESTIMATED_KEYS)
        if unknown:
            raise ValueError(f"unknown estimated metrics: {sorted(unknown)}")

    def value(self, key: str) -> float | int | None:
        """One metric by its METRICS.md key (including `<key>_stderr`)."""
        if key.endswith("_stderr") and key[: -len("_stderr")] in ESTIMATED_KEYS:
            est = self.estimates.get(key[: -len("_stderr")])
            return None if est is None else finite_or_none(est.stderr)
        if key in ESTIMATED_KEYS:
            est = self.estimates.get(key)
            return None if est is None else finite_or_none(est.value)
        if key in ("class_count", "sample_count"):
            return int(getattr(self, key))
        if key in REPORT_KEYS:
            return finite_or_none(getattr(self, key))
        raise KeyError(key)

    def as_dict(self) -> dict[str, float | int | None]:
        """Flat METRICS.md keys -> value (None where not computable), in catalogue order."""
        return {key: self.value(key) for key in REPORT_KEYS}


def format_value(value: float | int | None, digits: int = 4, missing: str = "null") -> str:
    """A metric value for a table or log line: counts exactly, floats to `digits` significant
    figures, `missing` for a metric that could not be computed."""
    if value is None:
        return missing
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"
