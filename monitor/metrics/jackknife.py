"""Delete-a-group jackknife: standard errors of a window's metrics under its own traffic.

The window W is the sum of its time buckets. They are dealt into G groups of *consecutive*
buckets (balanced by sample count); replicate g is W with group g taken out, and every metric
is computed again on each replicate. With theta the window's value, theta_g replicate g's,
m_g the samples of group g and N those of the window:

    u_g  = (theta_g - theta) (N - m_g) / m_g        (for a mean: exactly theta - mean of group g)
    u    = sum_g m_g u_g / sum_g m_g
    se^2 = sum_g (m_g / N) (u_g - u)^2 / (G - 1)

With G equal groups that cover the window this is the textbook delete-a-group jackknife,
`(G-1)/G sum_g (theta_g - mean theta_g)^2`. The general form stays unbiased for a mean when
groups differ in size (diurnal traffic) and when part of the window is held fixed in every
replicate (the buckets that may still receive data: `monitor.evaluate.evaluator`); centring
the u_g at their weighted mean also cancels a bias that moves with volume (the plug-in keys),
which centring at theta would add to the variance.

Why consecutive buckets and not an interleaved deal: neighbouring buckets share autocorrelated
traffic (a burst of one topic, the hour's mix). Deleted together, that correlation moves the
replicates and shows up as variance; dealt round-robin, every group would hold a slice of each
burst, the replicates would barely move, and clumpy traffic would get a falsely small error.

Assumptions: the groups are exchangeable (the model and its traffic's distribution do not
change within the window: the se is that of a stationary window, which is what an alert asks
to beat), and the metric is a smooth function of the window's sums. With G groups the se has
about G - 1 degrees of freedom, so it is itself noisy (+-25% at G = 8); interval coverage was
checked by simulation (tests/unit/test_jackknife.py).

Memory: replicates are made in place in the window's own statistics. A group's statistics
stream in (`Part`s: globals, chunks of class rows, second-moment blocks), are subtracted,
the metrics computed, and the same parts streamed and added back; no copy of the window or
of a group is held, only the chunks (the caller's reader bounds them).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.errors import IncompatibleStats
from monitor.metrics.baseline import BaselineSummary
from monitor.metrics.drift import RATIO_KEYS, RATIO_SOURCE
from monitor.metrics.report import TRAFFIC_STDERR_SUFFIX
from monitor.stats import CollapseStats
from monitor.stats.fields import Globals, Rows

_F64 = torch.float64
# The key whose size is its own counter: NC4 agreement is hits / total of the NC4 counts.
NC4_KEY = "nc4_ncc_agreement"


@dataclass(frozen=True)
class SecondBlock:
    """Rows `start .. start + len(rows) - 1` of a group's second moment `sum h h^T`."""

    start: int
    rows: torch.Tensor  # (r, d) float64


Part = Globals | Rows | SecondBlock
Metrics = Mapping[str, float | int | None]


@dataclass(frozen=True)
class Group:
    """One group of consecutive buckets, as a way to stream its statistics.

    `read` is called twice, to subtract and then to add back, and must give the same statistics
    both times (a reader that finds them changed the second time raises, and the jackknife is
    abandoned). The first read may leave out buckets that changed since the window was read:
    the group's size is what its globals parts say, so a left-out bucket simply stays in every
    replicate.
    """

    read: Callable[[], Iterator[Part]]


@dataclass(frozen=True)
class JackknifeResult:
    """Standard errors per key (only the keys that could be computed) and how they were made."""

    stderrs: dict[str, float]
    groups: int
    replicates: dict[str, list[float | None]] = field(default_factory=dict)
    seconds: float = 0.0


def deal_groups(sizes: Sequence[int], groups: int) -> list[list[int]]:
    """Indices of `sizes` (buckets oldest first) in `groups` runs of consecutive buckets.

    Buckets with no samples are left out (deleting them changes nothing). The cut points are
    where the running sample count is closest to k/G of the total, each group keeping at least
    one bucket, so groups are about equal in samples as far as whole buckets allow. Fewer than
    `groups` usable buckets give one group per bucket.
    """
    usable = [i for i, n in enumerate(sizes) if n > 0]
    g = min(groups, len(usable))
    if g < 1:
        return []
    cumulative: list[int] = []
    running = 0
    for i in usable:
        running += sizes[i]
        cumulative.append(running)
    total = cumulative[-1]
    cuts = [0]
    for k in range(1, g):
        lo, hi = cuts[-1] + 1, len(usable) - (g - k)  # a group needs at least one bucket
        target = k * total / g
        best = min(range(lo, hi + 1), key=lambda j: (abs(cumulative[j - 1] - target), j))
        cuts.append(best)
    cuts.append(len(usable))
    return [usable[a:b] for a, b in itertools.pairwise(cuts)]


def group_stderr(
    full: float | None,
    replicates: Sequence[float | None],
    sizes: Sequence[int],
    total: int,
) -> float | None:
    """The jackknife standard error of the module docstring; None when it cannot be computed.

    `replicates[g]` is the value without group g (None: not computable), `sizes[g]` that
    group's size and `total` the window's (including any part held fixed). Groups of size 0
    are left out; fewer than 2 usable groups, or a missing value, give None.
    """
    if full is None or not math.isfinite(full) or len(replicates) != len(sizes):
        return None
    pairs = [(v, m) for v, m in zip(replicates, sizes, strict=True) if m > 0]
    if len(pairs) < 2 or any(m >= total for _, m in pairs):
        return None
    if any(v is None or not math.isfinite(v) for v, _ in pairs):
        return None
    u = [(float(v) - full) * (total - m) / m for v, m in pairs if v is not None]
    weights = [m for _, m in pairs]
    centre = sum(w * x for w, x in zip(weights, u, strict=True)) / sum(weights)
    var = sum(w / total * (x - centre) ** 2 for w, x in zip(weights, u, strict=True))
    return math.sqrt(var / (len(pairs) - 1))


def apply_part(stats: CollapseStats, part: Part, sign: int) -> None:
    """`stats += sign * part`, in place. Raises IncompatibleStats when the part is not part of
    `stats` (a class it lacks, a count that would go negative, another shape)."""
    if isinstance(part, Globals):
        _apply_globals(stats, part, sign)
    elif isinstance(part, Rows):
        _apply_rows(stats, part, sign)
    else:
        if stats.second is None or part.rows.shape[1] != stats.dim:
            raise IncompatibleStats("a second-moment block that the window does not have")
        stop = part.start + part.rows.shape[0]
        if part.start < 0 or stop > stats.dim:
            raise IncompatibleStats("a second-moment block outside the matrix")
        stats.second[part.start : stop] += sign * part.rows.to(stats.device, _F64)


def _apply_globals(stats: CollapseStats, g: Globals, sign: int) -> None:
    if (g.num_classes, g.dim, g.second_moment) != (
        stats.num_classes,
        stats.dim,
        stats.has_second_moment,
    ):
        raise IncompatibleStats("a bucket of another shape than its window")
    counters = {
        "sample_count": stats.sample_count + sign * g.counters["sample_count"],
        "unit_count": stats.unit_count + sign * g.counters["unit_count"],
        "nc4_hits": stats.nc4_hits + sign * g.counters["nc4_hits"],
        "nc4_total": stats.nc4_total + sign * g.counters["nc4_total"],
    }
    if min(counters.values()) < 0:
        raise IncompatibleStats("a bucket holds more samples than its window")
    stats.sample_count = counters["sample_count"]
    stats.unit_count = counters["unit_count"]
    stats.nc4_hits = counters["nc4_hits"]
    stats.nc4_total = counters["nc4_total"]
    stats.unit_sum += sign * torch.from_numpy(g.unit_sum).to(stats.device, _F64)
    # The RFF sums are left alone: no replicate metric reads them, and W keeps them whole.


def _apply_rows(stats: CollapseStats, rows: Rows, sign: int) -> None:
    # Private storage of CollapseStats, as StatsBuilder uses it: the rows are written in place
    # because a subtracting merge has no public form (statistics only ever add).
    ids = rows.class_ids.to(stats.device)
    slots = stats._slot[ids]
    if bool((slots < 0).any()):
        raise IncompatibleStats("a bucket holds a class its window does not")
    counts = stats._counts[slots] + sign * rows.counts.to(stats.device)
    if bool((counts < 0).any()):
        raise IncompatibleStats("a bucket holds more samples of a class than its window")
    stats._counts[slots] = counts
    stats._sums[slots] += sign * rows.sums.to(stats.device, _F64)
    stats._sq_norms[slots] += sign * rows.sq_norms.to(stats.device, _F64)
    empty = slots[counts == 0]
    if empty.numel():  # no rounding residue in a class the replicate does not hold
        stats._sums[empty] = 0.0
        stats._sq_norms[empty] = 0.0


def _stream(group: Group, stats: CollapseStats, sign: int) -> tuple[int, int]:
    """Apply the group's parts; returns its (samples, NC4 total) from the globals applied."""
    samples = nc4_total = 0
    parts = group.read()
    try:
        for part in parts:
            apply_part(stats, part, sign)
            if isinstance(part, Globals):
                samples += part.sample_count
                nc4_total += part.counters["nc4_total"]
    finally:  # a generator reader holds the store's lock until it is closed
        close = getattr(parts, "close", None)
        if close is not None:
            close()
    return samples, nc4_total


def jackknife(
    stats: CollapseStats,
    groups: Sequence[Group],
    evaluate: Callable[[CollapseStats], Metrics],
    full: Metrics,
    keys: Sequence[str],
) -> JackknifeResult:
    """Delete-a-group jackknife of `keys` over `groups` of the window `stats` (module doc).

    `evaluate` computes the metrics of a replicate (it must only read the statistics); `full`
    holds the window's own values. `stats` is changed in place while this runs and restored to
    float64 rounding at the end (every count exactly); if a reader raises, the exception goes
    to the caller and `stats` is left part way: do not use it any more.
    """
    started = time.perf_counter()
    if len(groups) < 2:
        return JackknifeResult({}, 0, seconds=time.perf_counter() - started)
    replicates: dict[str, list[float | None]] = {k: [] for k in keys}
    sizes: list[tuple[int, int]] = []
    for group in groups:
        taken = _stream(group, stats, -1)
        if taken[0] == 0:  # every bucket of it changed: nothing deleted, no replicate
            continue
        values = evaluate(stats)
        if _stream(group, stats, 1) != taken:
            raise IncompatibleStats("a group read back other statistics than it subtracted")
        sizes.append(taken)
        for key in keys:
            value = values.get(key)
            replicates[key].append(None if value is None else float(value))
    stderrs: dict[str, float] = {}
    for key in keys:
        value = full.get(key)
        if key == NC4_KEY:
            weights, total = [n for _, n in sizes], stats.nc4_total
        else:
            weights, total = [n for n, _ in sizes], stats.sample_count
        se = group_stderr(None if value is None else float(value), replicates[key], weights, total)
        if se is not None:
            stderrs[key] = se
    return JackknifeResult(stderrs, len(sizes), replicates, time.perf_counter() - started)


# --------------------------------------------------------------------------- combining


def traffic_stderrs(
    metrics: Mapping[str, float | int | None], result: JackknifeResult
) -> dict[str, float]:
    """`<key>_traffic_stderr`: the jackknife's error, with the pair-sampling `<key>_stderr` in
    quadrature where pairs were sampled (the two are independent sources of error)."""
    out = {}
    for key, jk in result.stderrs.items():
        sampled = metrics.get(f"{key}_stderr")
        pair = float(sampled) if sampled is not None and math.isfinite(sampled) else 0.0
        out[f"{key}{TRAFFIC_STDERR_SUFFIX}"] = math.hypot(jk, pair)
    return out


def ratio_stderrs(
    metrics: Mapping[str, float | int | None],
    base_metrics: Mapping[str, float | int | None],
    base_stderrs: Mapping[str, float],
    base: BaselineSummary,
) -> dict[str, float]:
    """`drift_<k>_ratio_stderr` by the delta method, window and baseline independent:
    `|r| sqrt((se_w/w)^2 + (se_b/b)^2)`.

    se_b is the baseline's own traffic stderr recorded when it was pinned from a window; when
    it has none (pinned from a corpus, or before any evaluation of its window), the window's
    relative error scaled to the baseline's volume, `(se_w/w) sqrt(N_w/N_b)`: the same model
    and traffic with N_b samples (an error of a smooth statistic falls as 1/sqrt(N)).
    """
    out = {}
    n_w = metrics.get("sample_count")
    for key in RATIO_KEYS:
        src = RATIO_SOURCE[key]
        ratio = metrics.get(f"drift_{key}_ratio")
        w, se_w, b = (
            metrics.get(src),
            metrics.get(f"{src}{TRAFFIC_STDERR_SUFFIX}"),
            base_metrics.get(src),
        )
        if ratio is None or w is None or se_w is None or b is None or w == 0 or b == 0:
            continue
        if src in base_stderrs:
            rel_b = base_stderrs[src] / abs(float(b))
        elif isinstance(n_w, int) and n_w > 0 and base.sample_count > 0:
            rel_b = float(se_w) / abs(float(w)) * math.sqrt(n_w / base.sample_count)
        else:
            continue
        se = abs(float(ratio)) * math.hypot(float(se_w) / float(w), rel_b)
        if math.isfinite(se):
            out[f"drift_{key}_ratio_stderr"] = se
    return out
