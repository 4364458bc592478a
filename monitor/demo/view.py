"""Two faces of the demo: a rich live view on a terminal, a plain line log everywhere else.

The plain log is a contract for scripts and tests: events are single lines starting with the
elapsed time, and the important ones are stable and greppable (`phase inject`,
`ALERT FIRING <name>`, `ALERT RESOLVED <name>`, `metrics: <url>`, `report: <path>`).
"""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from monitor.demo.alerting import CDNV_RATIO_MAX, DRIFT_FACTOR, AlertState
from monitor.demo.state import PHASE_TEXT, DemoState
from monitor.metrics.report import format_value

MMD_RATIO = "mmd_over_threshold"  # derived here: what the drift alert compares with its factor
# (metric key, label, alert threshold text); ratios are "now over baseline".
ROWS: tuple[tuple[str, str, str], ...] = (
    ("sample_count", "samples in window", ""),
    ("class_count", "classes (>= min_count)", ""),
    ("nc1_cdnv", "NC1 CDNV", ""),
    ("drift_nc1_cdnv_ratio", "  CDNV / baseline", f"> {CDNV_RATIO_MAX:g}"),
    ("effective_rank", "effective rank", ""),
    ("drift_effective_rank_ratio", "  rank / baseline", ""),
    ("nc4_ncc_agreement", "NC4 NCC agreement", ""),
    ("anisotropy_mean_cos", "anisotropy (mean cos)", ""),
    ("drift_mmd", "drift MMD^2", ""),
    ("drift_mmd_threshold", "  MMD^2 null threshold", ""),
    (MMD_RATIO, "  MMD^2 / threshold", f"> {DRIFT_FACTOR:g}"),
    ("drift_label_js", "next-token JS (bits)", ""),
)
STATUS_KEYS = (
    ("drift_nc1_cdnv_ratio", "cdnv_ratio"),
    ("drift_effective_rank_ratio", "rank_ratio"),
    ("drift_mmd", "mmd"),
    ("drift_mmd_threshold", "mmd_threshold"),
    (MMD_RATIO, "mmd_ratio"),
    ("nc4_ncc_agreement", "nc4"),
)
STATE_STYLE = {
    AlertState.inactive: "green",
    AlertState.pending: "yellow",
    AlertState.firing: "bold red",
    AlertState.resolved: "cyan",
}


def shown(metrics: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """The snapshot's metrics plus MMD over its threshold (absent when either is)."""
    mmd, threshold = metrics.get("drift_mmd"), metrics.get("drift_mmd_threshold")
    ratio = mmd / threshold if mmd is not None and threshold else None
    return {**metrics, MMD_RATIO: ratio}


def fmt(value: float | int | None) -> str:
    return format_value(value, missing="-")


class DemoView(Protocol):
    def event(self, elapsed: float, text: str) -> None:
        """One notable thing happened (a phase, an alert, a path)."""

    def update(self, state: DemoState) -> None:
        """The picture of this tick."""

    def close(self) -> None:
        """Leave the terminal as it was."""


class PlainLog:
    """Line-oriented output: every event, plus a status line every `status_every` seconds."""

    def __init__(self, stream: TextIO | None = None, status_every: float = 5.0) -> None:
        self.stream = stream or sys.stdout
        self.status_every = status_every
        self._last_status = -1e9

    def _line(self, elapsed: float, text: str) -> None:
        self.stream.write(f"[{elapsed:6.1f}s] {text}\n")
        self.stream.flush()

    def event(self, elapsed: float, text: str) -> None:
        self._line(elapsed, text)

    def update(self, state: DemoState) -> None:
        if state.elapsed - self._last_status < self.status_every:
            return
        self._last_status = state.elapsed
        metrics = shown(state.metrics)
        values = " ".join(f"{name}={fmt(metrics.get(key))}" for key, name in STATUS_KEYS)
        alerts = ",".join(f"{a}:{s}" for a, s in state.alerts.items() if s != "inactive")
        self._line(
            state.elapsed,
            f"status phase={state.phase} samples/s={state.samples_per_second:.0f} "
            f"window_samples={fmt(state.metrics.get('sample_count'))} {values} "
            f"alerts={alerts or 'none'}",
        )

    def close(self) -> None:
        self.stream.flush()


class LiveView:
    """A rich Live panel redrawn each tick; events scroll above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live = Live(console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def event(self, elapsed: float, text: str) -> None:
        self._live.console.print(Text(f"[{elapsed:6.1f}s] {text}"), highlight=False)

    def update(self, state: DemoState) -> None:
        self._live.update(self._render(state))

    def close(self) -> None:
        if self._live.is_started:
            self._live.stop()

    def _render(self, state: DemoState) -> Group:
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        head.add_row("model", f"{state.model} (window {state.window})")
        head.add_row("phase", f"[bold]{state.phase}[/] - {PHASE_TEXT[state.phase]}")
        if state.injection:
            head.add_row("injection", state.injection)
        head.add_row("traffic", f"{state.samples_per_second:.0f} samples/s captured")
        head.add_row("metrics", state.metrics_url)
        bar = ProgressBar(total=state.duration, completed=min(state.elapsed, state.duration))
        head.add_row(f"{state.elapsed:5.0f}/{state.duration:.0f}s", bar)

        metrics = Table(title="window vs baseline", expand=False)
        metrics.add_column("metric")
        metrics.add_column("baseline", justify="right")
        metrics.add_column("now", justify="right")
        metrics.add_column("alert when", justify="right")
        now = shown(state.metrics)
        for key, label, rule in ROWS:
            metrics.add_row(label, fmt(state.baseline.get(key)), fmt(now.get(key)), rule)

        alerts = Table(title="alerts", expand=False)
        alerts.add_column("alert")
        alerts.add_column("state")
        for name, alert_state in state.alerts.items():
            alerts.add_row(name, Text(alert_state, style=STATE_STYLE[alert_state]))
        return Group(Panel(head, title="collapse-monitor demo"), metrics, alerts)
