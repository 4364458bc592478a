"""What a report draws: a model's snapshot history, thresholds, alert periods and class means.

Plain dataclasses so that every source (Redis, the in-process demo, `analyze`/`study` JSON)
builds the same input and `write_report` knows nothing about where the numbers came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from monitor.alerts.thresholds import AlertingSettings
from monitor.snapshot import Snapshot
from monitor.stats.collapse_stats import CollapseStats

__all__ = ["AlertPeriod", "ReportData", "ReportFiles"]


@dataclass(frozen=True)
class AlertPeriod:
    """A span during which an alert fired; `end` None means still firing at report time."""

    alert: str
    start: float
    end: float | None


@dataclass
class ReportData:
    """Everything one report shows for one model and window (snapshots oldest first)."""

    model: str
    window: str
    snapshots: list[Snapshot]
    alerting: AlertingSettings | None = None
    alert_periods: list[AlertPeriod] = field(default_factory=list)
    baseline: CollapseStats | None = None
    current: CollapseStats | None = None
    token_names: dict[int, str] | None = None
    # One label per snapshot (e.g. checkpoints of a `study`): x becomes the snapshot's position
    # with these tick labels instead of its timestamp.
    x_labels: list[str] | None = None
    min_count: int = 2  # classes need this many samples to enter the PCA panel
    notes: list[str] = field(default_factory=list)  # shown at the top of the page


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by `write_report`: the HTML page and each PNG figure."""

    html: Path
    pngs: list[Path]
