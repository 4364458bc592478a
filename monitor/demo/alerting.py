"""The demo's alert rules and the states of its alerts (inactive, pending, firing, resolved).

The rules are ordinary `AlertingSettings`, judged by the evaluator's own `VerdictTracker` (the
direct-Alertmanager path of the service), so the demo shows the verdicts production would
send. Only the `for` durations are compressed to demo time. Pending is what a rule engine
shows between "the condition holds" and "it held for `for`": a second tracker with every
`for` set to zero tells which conditions hold now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from monitor.alerts.thresholds import AlertingSettings, DriftBound, RelativeBound
from monitor.alerts.verdicts import VerdictTracker
from monitor.snapshot import Snapshot

# MMD must exceed 5x its calibrated null quantile. The calibration has at most ~20 one-second
# buckets, so its 0.99 quantile is about their largest value; over a quiet run's ~100
# evaluations the ratio reached 1.7 (measured), while the injected collapse gives over 100.
DRIFT_FACTOR = 5.0
CDNV_RATIO_MAX = 1.5  # the shipped default's warning tier


def demo_alerting(hold_seconds: int) -> AlertingSettings:
    """Two rules on the baseline comparison, each pending for `hold_seconds` before firing.

    No effective-rank rule: the rank of a window that mixes healthy and collapsed states first
    rises (two subspaces), and only falls once the window holds collapsed states alone, so it
    would fire late and flap at the phase change; it is shown, not alerted on.
    """
    hold = f"{max(0, int(hold_seconds))}s"
    return AlertingSettings(
        absolute=[],
        predictive=[],
        relative=[
            RelativeBound(
                alert="CollapseCDNVRisingVsBaseline",
                metric="drift_nc1_cdnv_ratio",
                max=CDNV_RATIO_MAX,
                for_=hold,
            ),
        ],
        drift=[DriftBound(alert="CollapseDriftAboveThreshold", factor=DRIFT_FACTOR, for_=hold)],
    )


def rule_names(alerting: AlertingSettings) -> list[str]:
    """Alert names in rule order, each once."""
    names: list[str] = []
    rules = [*alerting.relative, *alerting.absolute, *alerting.drift]
    for rule in rules:
        if rule.enabled and rule.alert not in names:
            names.append(rule.alert)
    return names


class AlertState(StrEnum):
    inactive = "inactive"
    pending = "pending"
    firing = "firing"
    resolved = "resolved"


@dataclass(frozen=True)
class Transition:
    """An alert changed state at `timestamp` (the evaluation's time)."""

    alert: str
    old: AlertState
    new: AlertState
    timestamp: float


@dataclass(frozen=True)
class Period:
    """One firing period of one alert; `end` is None while it still fires."""

    alert: str
    start: float
    end: float | None


class AlertBoard:
    """Per alert name: its state now, and every firing period so far."""

    def __init__(self, alerting: AlertingSettings) -> None:
        self.alerting = alerting
        self._firing = VerdictTracker(alerting)
        self._holding = VerdictTracker(alerting.instant())
        self.states: dict[str, AlertState] = {n: AlertState.inactive for n in rule_names(alerting)}
        self.periods: list[Period] = []

    def update(self, snapshots: Iterable[Snapshot], timestamp: float) -> list[Transition]:
        """Judge one evaluation's snapshots; returns the state changes it caused."""
        snaps = list(snapshots)
        firing = {a.labels["alertname"] for a in self._firing.firing(snaps)}
        holding = {a.labels["alertname"] for a in self._holding.firing(snaps)}
        changes: list[Transition] = []
        for name, old in self.states.items():
            if name in firing:
                new = AlertState.firing
            elif name in holding:
                new = AlertState.pending
            elif old in (AlertState.firing, AlertState.resolved):
                new = AlertState.resolved
            else:
                new = AlertState.inactive
            if new != old:
                changes.append(Transition(name, old, new, timestamp))
                self.states[name] = new
                self._record(name, old, new, timestamp)
        return changes

    def _record(self, name: str, old: AlertState, new: AlertState, ts: float) -> None:
        if new is AlertState.firing:
            self.periods.append(Period(name, ts, None))
        elif old is AlertState.firing:
            for i in range(len(self.periods) - 1, -1, -1):
                if self.periods[i].alert == name and self.periods[i].end is None:
                    self.periods[i] = Period(name, self.periods[i].start, ts)
                    break

    @property
    def firing(self) -> list[str]:
        return [n for n, s in self.states.items() if s is AlertState.firing]

    def ever_fired(self) -> bool:
        return bool(self.periods)
