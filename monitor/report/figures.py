"""Matplotlib figures of a report: one per metric group, and the PCA panel of class means.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no display
is touched and no global state is shared, so a report can be drawn from a worker or the
in-process demo while other threads run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure

from monitor.alerts.thresholds import RATIO_KEYS, AlertingSettings
from monitor.metrics.keys import RATIO_SOURCE
from monitor.report.data import ReportData
from monitor.report.pca import MeanProjection
from monitor.snapshot import Snapshot

__all__ = [
    "BASE_COLOR",
    "CURRENT_COLOR",
    "GROUPS",
    "LINE_COLOR",
    "Panel",
    "draw_group",
    "draw_pca",
    "save_png",
]

LINE_COLOR = "#1f77b4"  # every metric line: the headless-browser test looks for this blue
BASE_COLOR = "#7f7f7f"
CURRENT_COLOR = "#2ca02c"
SEVERITY_COLOR = {"warning": "#ff7f0e", "critical": "#d62728"}
ALERT_SHADE = "#d62728"
DPI = 100

# (file stem, title, metric keys) in METRICS.md order; `drift_mmd` carries its threshold.
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "nc1",
        "NC1: within-class variability (CDNV)",
        ("nc1_cdnv", "nc1_cdnv_unbiased", "nc1_cdnv2", "nc1_trace_ratio"),
    ),
    (
        "nc2",
        "NC2: equinorm, equiangularity, uniformity",
        (
            "nc2_equinorm_cv",
            "nc2_equiangularity_mean",
            "nc2_equiangularity_std",
            "nc2_log_energy_mean",
            "nc2_log_energy_std",
        ),
    ),
    (
        "nc3",
        "NC3: self-duality with the LM head",
        ("nc3_duality_mean_cos", "nc3_uniform_duality_cv"),
    ),
    ("nc4", "NC4: nearest-class-centre agreement", ("nc4_ncc_agreement",)),
    (
        "geometry",
        "Geometry of the representation",
        ("anisotropy_mean_cos", "effective_rank", "class_count", "sample_count"),
    ),
    (
        "drift",
        "Drift against the pinned baseline",
        ("drift_mmd", "drift_mean_shift", "drift_class_mean_cos", "drift_label_js", *RATIO_KEYS),
    ),
)
_LOG_KEYS = frozenset({"nc1_cdnv", "nc1_cdnv_unbiased", "nc1_cdnv2", "nc1_trace_ratio"})
# The panel a ratio's baseline line belongs on: the metric it divides (the volume-robust CDNV).
_RATIO_OF = {
    key: RATIO_SOURCE[key.removeprefix("drift_").removesuffix("_ratio")] for key in RATIO_KEYS
}


@dataclass(frozen=True)
class Panel:
    """One drawn figure, not yet saved: its stem, title and the metrics it shows."""

    stem: str
    title: str
    figure: Figure
    metrics: tuple[str, ...]


def save_png(figure: Figure, handle: BinaryIO) -> None:
    """The figure as PNG into an open file (monitor.data.output writes it into place)."""
    figure.savefig(handle, format="png", dpi=DPI)


def series(snapshots: Sequence[Snapshot], key: str) -> list[float | None]:
    """Values of `key` per snapshot; missing, non-numeric or non-finite values are None."""
    out: list[float | None] = []
    for snap in snapshots:
        value = snap.metrics.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        out.append(float(value) if ok and math.isfinite(float(value)) else None)  # type: ignore[arg-type]
    return out


def _x_values(data: ReportData) -> list[float]:
    if data.x_labels is not None:
        return [float(i) for i in range(len(data.snapshots))]
    return [_date(s.timestamp) for s in data.snapshots]


def _date(ts: float) -> float:
    """Matplotlib's date number of a unix time (honours a configured date epoch)."""
    return float(date2num(datetime.fromtimestamp(ts, tz=UTC)))  # type: ignore[no-untyped-call]


def _x_of_time(data: ReportData, xs: list[float], ts: float) -> float:
    """An alert boundary's x: the time itself, or the position of the first snapshot at it."""
    if data.x_labels is None:
        return _date(ts)
    stamps = np.array([s.timestamp for s in data.snapshots])
    index = int(np.searchsorted(stamps, ts, side="left"))
    return xs[min(index, len(xs) - 1)] - 0.5 if xs else 0.0


def _matches(matchers: dict[str, str], data: ReportData) -> bool:
    labels = {"model": data.model, "window": data.window}
    return all(labels.get(k) == v for k, v in matchers.items())


def _thresholds(ax: Axes, key: str, data: ReportData, values: list[float | None]) -> None:
    """Absolute bounds on the metric; relative bounds on its ratio and, scaled by the baseline
    value the snapshots imply (value / ratio), on the metric itself."""
    alerting: AlertingSettings | None = data.alerting
    if alerting is None:
        return
    for bound in alerting.absolute:
        if bound.enabled and bound.metric == key and _matches(bound.matchers, data):
            _hlines(ax, bound.alert, bound.severity, bound.min, bound.max, 1.0)
    drawn_base = False
    for rel in alerting.relative:
        if not rel.enabled or not _matches(rel.matchers, data):
            continue
        if rel.metric == key:
            _hlines(ax, rel.alert, rel.severity, rel.min, rel.max, 1.0)
        elif _RATIO_OF[rel.metric] == key:
            base = _baseline_value(values, series(data.snapshots, rel.metric))
            if base is None:
                continue
            if not drawn_base:
                ax.axhline(base, color=BASE_COLOR, linestyle=":", linewidth=1.2, label="baseline")
                drawn_base = True
            _hlines(ax, rel.alert, rel.severity, rel.min, rel.max, base)


def _baseline_value(values: list[float | None], ratios: list[float | None]) -> float | None:
    """The baseline's value of a metric, from the latest snapshot with both value and ratio."""
    for value, ratio in zip(reversed(values), reversed(ratios), strict=True):
        if value is not None and ratio is not None and ratio != 0:
            return value / ratio
    return None


def _hlines(
    ax: Axes, name: str, severity: str, low: float | None, high: float | None, scale: float
) -> None:
    color = SEVERITY_COLOR.get(severity, "#d62728")
    for side, bound in (("min", low), ("max", high)):
        if bound is not None:
            ax.axhline(
                bound * scale,
                color=color,
                linestyle="--",
                linewidth=1.0,
                label=f"{name} ({severity}) {side}",
            )


def _drift_threshold(ax: Axes, data: ReportData, xs: list[float]) -> None:
    """factor x the calibrated MMD threshold of each snapshot (it scales with the sample count)."""
    threshold = series(data.snapshots, "drift_mmd_threshold")
    rules = [d for d in (data.alerting.drift if data.alerting else []) if d.enabled]
    rules = [d for d in rules if _matches(d.matchers, data)] or []
    factors = [(d.alert, d.severity, d.factor) for d in rules] or [("threshold", "warning", 1.0)]
    for name, severity, factor in factors:
        ys = [np.nan if t is None else t * factor for t in threshold]
        if not all(np.isnan(ys)):
            ax.plot(
                xs,
                ys,
                color=SEVERITY_COLOR.get(severity, "#d62728"),
                linestyle="--",
                linewidth=1.0,
                drawstyle="steps-mid",
                label=f"{name} ({severity}): {factor:g} x threshold",
            )


def _shade(ax: Axes, data: ReportData, xs: list[float]) -> None:
    last = xs[-1] if xs else 0.0
    for i, period in enumerate(data.alert_periods):
        start = _x_of_time(data, xs, period.start)
        end = last + (0.5 if data.x_labels is not None else 0.0)
        if period.end is not None:
            end = _x_of_time(data, xs, period.end)
        if end <= start:  # still firing at the last point of a time axis: a visible sliver
            end = start + (0.5 if data.x_labels is not None else 1.0 / 1440)
        ax.axvspan(
            start, end, color=ALERT_SHADE, alpha=0.12, linewidth=0,
            label="alert firing (see Alerts)" if i == 0 else None,
        )  # fmt: skip


def _format_x(ax: Axes, data: ReportData, xs: list[float]) -> None:
    if data.x_labels is not None:
        ax.set_xticks(xs, labels=[_plain(x) for x in data.x_labels], rotation=30, ha="right")
        ax.set_xlim(-0.5, max(len(xs) - 0.5, 0.5))
        return
    ax.set_xlabel("time (UTC)", fontsize=8)
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    if len(xs) == 1 or (xs and xs[0] == xs[-1]):
        pad = max(data.snapshots[0].window_seconds / 10, 60) / 86400  # date units are days
        ax.set_xlim(xs[0] - pad, xs[0] + pad)


def draw_group(data: ReportData, stem: str, title: str, keys: Sequence[str]) -> Panel | None:
    """One figure, one stacked subplot per metric with data; None if none of them has any."""
    xs = _x_values(data)
    present = [k for k in keys if any(v is not None for v in series(data.snapshots, k))]
    if not present:
        return None
    fig = Figure(figsize=(10, 1.2 + 2.1 * len(present)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(_plain(f"{title} - {data.model} ({data.window})"), fontsize=12)
    for ax, key in zip(axes, present, strict=True):
        values = series(data.snapshots, key)
        ys = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        errs = series(data.snapshots, f"{key}_stderr")
        if any(e is not None for e in errs):
            err = np.array([np.nan if e is None else e for e in errs], dtype=np.float64)
            ax.fill_between(xs, ys - err, ys + err, color=LINE_COLOR, alpha=0.15, linewidth=0)
        size = 3 if len(xs) > 3 else 7  # a lone point must still be seen
        ax.plot(
            xs, ys, color=LINE_COLOR, linewidth=1.8, marker="o", markersize=size, label=_plain(key)
        )
        if key == "drift_mmd":
            _drift_threshold(ax, data, xs)
        _thresholds(ax, key, data, values)
        _shade(ax, data, xs)
        finite = ys[np.isfinite(ys)]
        if key in _LOG_KEYS and finite.size and bool((finite > 0).all()):
            ax.set_yscale("log")
        ax.set_ylabel(_plain(key), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    _format_x(axes[-1], data, xs)
    return Panel(stem, title, fig, tuple(present))


def _plain(text: str) -> str:
    """Text drawn as it is: a `$` in a model name would otherwise start mathtext (and an
    unbalanced one fails the whole figure)."""
    return text.replace("$", r"\$")


def _mathtext_safe(text: str) -> str:
    """Token text as a label: `$` would start mathtext, control characters draw as boxes."""
    if re.fullmatch(r"#[0-9]+", text):  # a class id without token text: no quotes
        return text
    shown = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return _plain(repr(shown))


def draw_pca(
    projection: MeanProjection,
    labelled: Sequence[int],
    names: dict[int, str],
    title: str,
) -> Figure:
    """Baseline means (hollow grey) and current means (green), moves of labelled classes as
    arrows, on the two shared principal axes."""
    fig = Figure(figsize=(10, 8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(
        projection.base_xy[:, 0], projection.base_xy[:, 1], s=22, facecolors="none",
        edgecolors=BASE_COLOR, linewidths=0.9, label=f"baseline ({projection.base_ids.size})",
    )  # fmt: skip
    ax.scatter(
        projection.current_xy[:, 0], projection.current_xy[:, 1], s=14, color=CURRENT_COLOR,
        alpha=0.8, label=f"current window ({projection.current_ids.size})",
    )  # fmt: skip
    base_at = {int(c): i for i, c in enumerate(projection.base_ids)}
    cur_at = {int(c): i for i, c in enumerate(projection.current_ids)}
    for class_id in labelled:
        i, j = base_at.get(class_id), cur_at.get(class_id)
        label = _mathtext_safe(names.get(class_id, f"#{class_id}"))
        if i is not None and j is not None:
            x0, y0 = projection.base_xy[i]
            x1, y1 = projection.current_xy[j]
            ax.annotate(
                "", xy=(x1, y1), xytext=(x0, y0),
                arrowprops={"arrowstyle": "->", "color": ALERT_SHADE, "linewidth": 1.2},
            )  # fmt: skip
            ax.annotate(label, (x1, y1), xytext=(4, 4), textcoords="offset points", fontsize=8)
        elif j is not None:
            x1, y1 = projection.current_xy[j]
            ax.annotate(label, (x1, y1), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ex0, ex1 = projection.explained
    ax.set_xlabel(f"PC1 ({100 * ex0:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ex1:.1f}% of variance)")
    ax.set_title(_plain(title))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
