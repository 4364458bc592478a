"""What a jackknife of the alerting metrics computes, and how its errors are carried between
jackknifes: the affordable jackknife at an LLM's size (docs/architecture.md, "Standard errors").

A replicate computes only the alerting keys (`compute_metrics(keys=...)`: no trace ratio, NC3,
NC4 from a head, plug-in CDNV or log energy), with the window's pair mode:

- exact window (K <= max_exact_classes): every pair, as the window's value. Sampled pairs here
  would overstate `nc2_equiangularity_std`'s error many times (3x at K = 1,551, 38x at K =
  19,009 with 100,000 pairs: docs/benchmarks.md): a pair's cosine moves with both classes'
  noise, and that interaction averages out only over all K^2/2 pairs;
- sampled window: every replicate uses the same `pair_samples` pairs, drawn once by class id (a
  replicate uses those whose two classes it keeps), and the window's value it is compared with
  is computed from the same pairs. Which pairs were drawn then adds nothing to the spread of
  the replicates (pairs drawn by position in each replicate's own class list, as first
  shipped, added it: 2.8x the error of `nc2_equiangularity_std` at K = 19,009); what remains
  is the traffic noise of a mean over that many pairs, which the window's own value has too
  when it has as many pairs. The pair-sampling error of the window's value stays
  `<key>_stderr`, added in quadrature by `traffic_stderrs`.
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
    sampled: bool,
    pair_samples: int,
    seed: int,
    min_count: int,
    keys: Sequence[str] = ALERT_STDERR_KEYS,
) -> tuple[Evaluate, dict[str, float | int | None]]:
    """The `evaluate` of a jackknife of `keys` (default the alerting keys) over `stats`, and
    the window values its replicates are compared with (`window`'s; the pair keys' from the
    shared pairs).

    `sampled`: the window's pair metrics were sampled; then the replicates share
    `pair_samples` pairs drawn with `seed` (else they walk every pair, as the window did). NC4
    agreement is each replicate's own NC4 counts when the window has a value (from its counts
    too).
    """
    computed = tuple(k for k in keys if k != NC4_KEY)
    pair_keys = tuple(k for k in computed if k in PAIR_METRICS)
    full = dict(window)
    pairs = None
    if pair_keys and sampled:
        pairs = draw_class_pairs(stats, samples=pair_samples, seed=seed, min_count=min_count)
        reference = compute(stats, pairs, pair_keys)
        full.update({key: reference.get(key) for key in pair_keys})
    with_nc4 = NC4_KEY in keys and full.get(NC4_KEY) is not None

    def evaluate(replicate: CollapseStats) -> dict[str, float | int | None]:
        values = dict(compute(replicate, pairs, computed))
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
