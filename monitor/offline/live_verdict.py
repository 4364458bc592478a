"""The verdict on one metric of `compare --live`: the offline tolerance rule, then significance.

A metric fails when it moved beyond its tolerance in its bad direction
(`monitor.offline.compare.judge_metric`, the offline gate's rule) *and* the confidence interval
of the difference excludes zero. The two windows are independent samples of traffic, so the
variances of the two estimates add: `d +- z sqrt(se_r^2 + se_c^2)`. Without a standard error on
both sides there is no interval, and a move beyond the tolerance cannot be shown significant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from statistics import NormalDist
from typing import Any

from monitor.errors import InvalidInput
from monitor.offline.compare import Status, Value, judge_metric
from monitor.offline.tolerances import Tolerances

DEFAULT_Z = 1.96


class LiveStatus(StrEnum):
    """The verdict on one metric; only `regressed` fails. The offline statuses keep their
    meaning; the live ones say why a move beyond the tolerance did not fail."""

    ok = Status.ok.value
    regressed = Status.regressed.value  # beyond its tolerance and significant
    unchecked = Status.unchecked.value
    skipped = Status.skipped.value  # a tolerance, but a side has no value
    not_significant = "not_significant"  # beyond its tolerance, the interval holds zero
    no_interval = "no_interval"  # beyond its tolerance, no traffic stderr on both sides
    not_comparable = "not_comparable"  # depends on width or vocabulary, and those differ


@dataclass(frozen=True)
class Interval:
    """The confidence interval of `candidate - reference` at `z` standard errors."""

    stderr: float  # sqrt(se_r^2 + se_c^2)
    low: float
    high: float
    z_score: float | None  # difference / stderr; None when stderr is 0
    significant: bool  # the interval excludes zero, i.e. |z_score| >= z


def difference_interval(
    difference: float, reference_stderr: float | None, candidate_stderr: float | None, z: float
) -> Interval | None:
    """The interval of a difference of two independent estimates; None without both errors."""
    if reference_stderr is None or candidate_stderr is None:
        return None
    se = math.hypot(reference_stderr, candidate_stderr)
    if se > 0:
        score: float | None = difference / se
        significant = abs(difference / se) >= z
    else:  # two exact values: any difference is real
        score, significant = None, difference != 0
    return Interval(se, difference - z * se, difference + z * se, score, significant)


@dataclass(frozen=True)
class LiveMetric:
    """One metric of both models; the offline entry's fields plus the difference and its
    interval (None where a side has no value or no traffic standard error)."""

    key: str
    reference: Value
    candidate: Value
    difference: float | None
    relative_change: float | None
    bad_direction: str | None
    tolerance: float | None
    reference_stderr: float | None
    candidate_stderr: float | None
    interval: Interval | None
    status: LiveStatus

    @property
    def regressed(self) -> bool:
        return self.status is LiveStatus.regressed

    def as_dict(self) -> dict[str, Any]:
        """The offline entry's fields, the difference and the interval's, then `status`."""
        out = {k: v for k, v in asdict(self).items() if k not in ("interval", "status")}
        iv = self.interval
        out.update(
            stderr=None if iv is None else iv.stderr,
            ci_low=None if iv is None else iv.low,
            ci_high=None if iv is None else iv.high,
            z_score=None if iv is None else iv.z_score,
            significant=None if iv is None else iv.significant,
            status=self.status.value,
        )
        return out


def judge_live(
    key: str,
    reference: Value,
    candidate: Value,
    reference_stderr: float | None,
    candidate_stderr: float | None,
    tol: Tolerances,
    z: float,
    *,
    comparable: bool = True,
) -> LiveMetric:
    """The verdict on one metric: the offline rule on the tolerance, then significance.

    `z == 0` turns the significance requirement off: the tolerance alone decides, also for
    metrics without a standard error.
    """
    base = judge_metric(key, reference, candidate, tol)
    difference = None
    if comparable and reference is not None and candidate is not None:
        difference = float(candidate) - float(reference)
    interval = None
    if difference is not None:
        interval = difference_interval(difference, reference_stderr, candidate_stderr, z)
    if not comparable:
        status = LiveStatus.not_comparable
    elif base.status is Status.regressed:
        if candidate is None:  # a window without it (no NC4 counts, no second moment)
            status = LiveStatus.skipped
        elif z == 0 or (interval is not None and interval.significant):
            status = LiveStatus.regressed
        else:
            status = LiveStatus.no_interval if interval is None else LiveStatus.not_significant
    else:
        status = LiveStatus(base.status.value)
    return LiveMetric(
        key,
        reference,
        candidate,
        difference,
        base.relative_change if comparable else None,
        base.bad_direction,
        base.tolerance,
        reference_stderr,
        candidate_stderr,
        interval,
        status,
    )


def z_for(confidence: float) -> float:
    """The z of a two-sided interval of this coverage (0.95 -> 1.95996)."""
    if not 0 < confidence < 1:
        raise InvalidInput("invalid_option", f"--confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1 + confidence) / 2)
