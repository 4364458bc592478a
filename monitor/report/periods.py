"""Alert periods from a snapshot history: when each threshold alert fired, and until when.

The evaluator's own `VerdictTracker` decides, snapshot by snapshot in time order, so a report
shades exactly what the direct Alertmanager path would have sent (same names, same `for`).
"""

from __future__ import annotations

from collections.abc import Sequence

from monitor.alerts.thresholds import AlertingSettings
from monitor.alerts.verdicts import VerdictTracker
from monitor.report.data import AlertPeriod
from monitor.snapshot import Snapshot

__all__ = ["alert_periods"]


def alert_periods(snapshots: Sequence[Snapshot], alerting: AlertingSettings) -> list[AlertPeriod]:
    """Spans during which an alert fired (any severity), oldest first.

    A period starts at the first snapshot the alert fires on and ends at the first later
    snapshot where it no longer does; `end` is None while it still fires on the last one.
    """
    tracker = VerdictTracker(alerting)
    open_since: dict[str, float] = {}
    periods: list[AlertPeriod] = []
    for snap in sorted(snapshots, key=lambda s: s.timestamp):
        # A snapshot without metrics ends every alert, as it does on the direct path.
        firing = {a.labels["alertname"] for a in tracker.firing([snap])}
        for name in sorted(firing - open_since.keys()):
            open_since[name] = snap.timestamp
        for name in sorted(open_since.keys() - firing):
            periods.append(AlertPeriod(name, open_since.pop(name), snap.timestamp))
    periods.extend(AlertPeriod(name, start, None) for name, start in open_since.items())
    return sorted(periods, key=lambda p: (p.start, p.alert))
