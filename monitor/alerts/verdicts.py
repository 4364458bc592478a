"""The evaluator's own alert verdicts, for the direct Alertmanager path.

They mirror the rendered rules that compare a snapshot's values (absolute bounds, baseline
ratios, MMD above its threshold), with the same names and labels, so Alertmanager merges the two
paths; a relative bound's `min_z` is judged by `RelativeBound.significant`, the arithmetic of
the rendered `unless` clause. Trend (`predict_linear`) and pipeline alerts need a time-series
database and stay with Prometheus. `for` durations are honoured per process: a condition must
hold on consecutive evaluations for that long before it fires.
"""

from __future__ import annotations

from collections.abc import Iterable

from monitor.alerts.alertmanager import Alert
from monitor.alerts.rules import alert_labels
from monitor.alerts.thresholds import (
    AbsoluteBound,
    AlertingSettings,
    RelativeBound,
    duration_seconds,
)
from monitor.snapshot import Snapshot


def _outside(value: float | int | None, low: float | None, high: float | None) -> bool:
    if value is None:
        return False
    return (low is not None and value < low) or (high is not None and value > high)


def _matches(matchers: dict[str, str], snapshot: Snapshot) -> bool:
    labels = {"model": snapshot.model, "window": snapshot.window}
    return all(labels.get(k) == v for k, v in matchers.items())


class VerdictTracker:
    """Turns snapshots into firing alerts, remembering since when each condition holds."""

    def __init__(self, alerting: AlertingSettings) -> None:
        self.alerting = alerting
        self._since: dict[tuple[tuple[str, str], ...], float] = {}

    def firing(self, snapshots: Iterable[Snapshot]) -> list[Alert]:
        holding: dict[tuple[tuple[str, str], ...], tuple[Alert, float, float]] = {}
        for snap in snapshots:
            if not snap.ok:
                continue
            for alert, hold in self._conditions(snap):
                holding[alert.fingerprint] = (alert, hold, snap.timestamp)
        self._since = {key: self._since.get(key, ts) for key, (_, _, ts) in holding.items()}
        return [
            alert for key, (alert, hold, ts) in holding.items() if ts - self._since[key] >= hold
        ]

    def _conditions(self, snap: Snapshot) -> list[tuple[Alert, float]]:
        found: list[tuple[Alert, float]] = []
        values = snap.metrics
        for bound in [*self.alerting.absolute, *self.alerting.relative]:
            if not bound.enabled or not _matches(bound.matchers, snap):
                continue
            value = values.get(bound.metric)
            if not _outside(value, bound.min, bound.max):
                continue
            if isinstance(bound, AbsoluteBound) and snap.sample_count < (bound.min_samples or 0):
                continue
            if value is not None and (
                not isinstance(bound, RelativeBound)
                or bound.significant(value, values.get(bound.stderr_metric))
            ):
                alert = self._alert(bound.alert, bound.severity, snap, value)
                found.append((alert, duration_seconds(bound.for_)))
        for drift in self.alerting.drift:
            mmd, threshold = values.get("drift_mmd"), values.get("drift_mmd_threshold")
            if not drift.enabled or not _matches(drift.matchers, snap):
                continue
            if drift.fires(mmd, threshold):
                alert = self._alert(drift.alert, drift.severity, snap, mmd)
                found.append((alert, duration_seconds(drift.for_)))
        return found

    def _alert(self, name: str, severity: str, snap: Snapshot, value: float | int | None) -> Alert:
        labels = alert_labels(
            name, snap.model, snap.window, severity, self.alerting.direct_labels()
        )
        anchor = name.lower()
        return Alert(
            labels,
            {
                "summary": f"{name} on {snap.model} ({snap.window})",
                "description": f"value {value} in the evaluator's snapshot at {snap.timestamp:.0f}",
                "runbook_url": f"{self.alerting.runbook_base_url}#{anchor}",
            },
        )
