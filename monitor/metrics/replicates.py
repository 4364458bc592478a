"""What a jackknife of the alerting metrics computes, and how its errors are carried between
jackknifes: the affordable jackknife at an LLM's size (docs/architecture.md, "Standard errors").

A replicate computes only the alerting keys (`compute_metrics(keys=...)`: no trace ratio, NC3,
NC4 from a head, plug-in CDNV or log energy). When the window has more class pairs than
`pair_samples`, every replicate uses the same `pair_samples` pairs, drawn once by class id
(a replicate uses those whose two classes it keeps), and the window's value it is compared with
is computed from the same pairs: the replicate-to-replicate differences then carry almost no
pair-sampling noise, where pairs drawn afresh per replicate (by position in each replicate's
own class list) would add the full pair noise of every replicate to the jackknife's spread.
The pair-sampling error of the window's own value stays `<key>_stderr`, added in quadrature by
`traffic_stderrs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from monitor.metrics.engine import ClassPairs, draw_class_pairs
from monitor.metrics.jackknife import NC4_KEY, JackknifeResult, Metrics
from monitor.metrics.pairwise import PAIR_METRICS
from monitor.metrics.report import ALERT_STDERR_KEYS
from monitor.stats import CollapseStats

# What a replicate computes: the alerting keys but NC4 agreement, which is its own NC4 counts.
REPLICATE_KEYS: tuple[str, ...] = tuple(k for k in ALERT_STDERR_KEYS if k != NC4_KEY)
PAIR_KEYS: tuple[str, ...] = tuple(k for k in REPLICATE_KEYS if k in PAIR_METRICS)
# compute(stats, pairs, keys): the metrics of `keys` of a replicate (`compute_metrics` with
# the window's options, `keys=keys, pairs=pairs`).
Compute = Callable[[CollapseStats, ClassPairs | None, Sequence[str]], Metrics]
Evaluate = Callable[[CollapseStats], dict[str, float | int | None]]


def alert_replicates(
    stats: CollapseStats,
    window: Metrics,
    compute: Compute,
    *,
    class_count: int,
    pair_samples: int,
    seed: int,
    min_count: int,
) -> tuple[Evaluate, dict[str, float | int | None]]:
    """The `evaluate` of a jackknife of ALERT_STDERR_KEYS over `stats`, and the window values
    its replicates are compared with (`window`'s, the pair keys' from the shared pairs).

    `class_count` is the window's kept classes: above `pair_samples` pairs, the replicates
    share `pair_samples` pairs drawn with `seed`. NC4 agreement is each replicate's own NC4
    counts when the window has a value (from its counts too).
    """
    full = dict(window)
    pairs = None
    if class_count * (class_count - 1) // 2 > pair_samples:
        pairs = draw_class_pairs(stats, samples=pair_samples, seed=seed, min_count=min_count)
        reference = compute(stats, pairs, PAIR_KEYS)
        full.update({key: reference.get(key) for key in PAIR_KEYS})
    with_nc4 = full.get(NC4_KEY) is not None

    def evaluate(replicate: CollapseStats) -> dict[str, float | int | None]:
        values = dict(compute(replicate, pairs, REPLICATE_KEYS))
        total = replicate.nc4_total
        values[NC4_KEY] = replicate.nc4_hits / total if with_nc4 and total > 0 else None
        return values

    return evaluate, full


@dataclass(frozen=True)
class CarriedStderrs:
    """A window's last jackknife, kept for the evaluations until the next (`stderr_interval`).

    Relative errors are carried: a metric's error moves with its scale, and falls as 1/sqrt(N)
    with the window's volume (N: its samples; for NC4 agreement, its NC4 total), so the error
    of a later evaluation is `(se_then / |value_then|) |value_now| sqrt(N_then / N_now)`. A key
    whose value was 0 then is not carried (no relative error).
    """

    at: float  # the evaluation time of the jackknife
    groups: int
    relative: dict[str, float]
    sample_count: int
    nc4_total: int

    @classmethod
    def of(
        cls, result: JackknifeResult, full: Metrics, stats: CollapseStats, at: float
    ) -> CarriedStderrs:
        """From a jackknife of `stats` whose window values were `full`."""
        relative = {}
        for key, se in result.stderrs.items():
            value = full.get(key)
            if value is not None and math.isfinite(value) and value != 0:
                relative[key] = se / abs(float(value))
        return cls(at, result.groups, relative, stats.sample_count, stats.nc4_total)

    def scaled(self, metrics: Metrics, sample_count: int, nc4_total: int) -> JackknifeResult:
        """The carried errors for a window now holding `sample_count` samples (`nc4_total`)."""
        stderrs = {}
        for key, rel in self.relative.items():
            value = metrics.get(key)
            then, now = (
                (self.nc4_total, nc4_total) if key == NC4_KEY else (self.sample_count, sample_count)
            )
            if value is None or not math.isfinite(value) or then <= 0 or now <= 0:
                continue
            stderrs[key] = rel * abs(float(value)) * math.sqrt(then / now)
        return JackknifeResult(stderrs, self.groups)
