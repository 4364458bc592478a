"""The report page: one HTML file with inline CSS and the figures as base64 data URIs.

Self-contained on purpose: it is mailed, attached to tickets and opened from CI artifacts,
so it may not fetch anything (no scripts, fonts, stylesheets or images from elsewhere).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from monitor.report.data import AlertPeriod, ReportData
from monitor.snapshot import Snapshot

__all__ = ["Figure", "render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
max-width:1100px}
h1{font-size:1.5em;margin-bottom:4px}
h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555}table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}td.num{text-align:right;
font-variant-numeric:tabular-nums}th{background:#f4f4f4}.firing{color:#b00;font-weight:600}
.ok{color:#060}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
figure{margin:16px 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
"""


@dataclass(frozen=True)
class Figure:
    """A PNG to embed, with its caption."""

    title: str
    path: Path
    caption: str = ""


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else "null"
    return html.escape(str(value))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _summary(data: ReportData, latest: Snapshot, order: Sequence[str]) -> list[str]:
    status_class = "ok" if latest.ok else "firing"
    base = latest.baseline or {}
    when = ("checkpoint", data.x_labels[-1]) if data.x_labels else ("time", _time(latest.timestamp))
    rows = [
        (when[0], _e(when[1])),
        ("status", f"<span class='{status_class}'>{_e(latest.status)}</span>"),
        ("reason", _e(latest.reason or "-")),
        ("samples", _num(latest.sample_count)),
        ("classes", _num(latest.class_count)),
        ("baseline", _e(base.get("name", "none pinned"))),
        ("evaluation time", f"{latest.duration_seconds:.3f} s"),
    ]
    out = ["<h2>Latest snapshot</h2><table>"]
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table><table><tr><th>metric</th><th>value</th><th>stderr</th></tr>")
    keys = [k for k in order if k in latest.metrics]
    keys += sorted(k for k in latest.metrics if k not in keys and not k.endswith("_stderr"))
    for key in keys:
        err = latest.metrics.get(f"{key}_stderr")
        out.append(
            f"<tr><td>{_e(key)}</td><td class='num'>{_num(latest.metrics[key])}</td>"
            f"<td class='num'>{'' if err is None else _num(err)}</td></tr>"
        )
    out.append("</table>")
    return out


def _when(data: ReportData) -> Callable[[float | None], str]:
    """How a moment is shown: its time, or the checkpoint label of a `study` history."""
    if data.x_labels is None:
        return _time
    at = {s.timestamp: label for s, label in zip(data.snapshots, data.x_labels, strict=True)}

    def label(ts: float | None) -> str:
        return "-" if ts is None else at.get(ts, f"#{ts:g}")

    return label


def _alerts(
    periods: Sequence[AlertPeriod], has_thresholds: bool, when: Callable[[float | None], str]
) -> list[str]:
    out = ["<h2>Alerts</h2>"]
    if not has_thresholds:
        return [*out, "<p class='note'>No alert thresholds given: no alert periods.</p>"]
    firing = sorted({p.alert for p in periods if p.end is None})
    if firing:
        names = ", ".join(_e(n) for n in firing)
        out.append(f"<p class='firing'>Firing at the last snapshot: {names}</p>")
    else:
        out.append("<p class='ok'>Nothing firing at the last snapshot.</p>")
    if periods:
        out.append("<table><tr><th>alert</th><th>from</th><th>until</th></tr>")
        for p in periods:
            until = "still firing" if p.end is None else when(p.end)
            out.append(
                f"<tr><td>{_e(p.alert)}</td><td>{_e(when(p.start))}</td><td>{_e(until)}</td></tr>"
            )
        out.append("</table>")
    return out


def _token(text: str) -> str:
    """Token text quoted (leading spaces matter), a bare `#id` as it is."""
    return text if re.fullmatch(r"#[0-9]+", text) else repr(text)


def _top_drift(latest: Snapshot, names: dict[int, str]) -> list[str]:
    if not latest.top_drift:
        return []
    out = [
        "<h2>Most drifted tokens (latest snapshot)</h2><table><tr><th>class</th><th>token</th>"
        "<th>count</th><th>baseline count</th><th>1 - cos</th><th>contribution</th></tr>"
    ]
    for t in sorted(latest.top_drift, key=lambda t: -t.contribution):
        token = names.get(t.class_id, t.token)
        out.append(
            f"<tr><td class='num'>{t.class_id}</td><td><code>{_e(_token(token))}</code></td>"
            f"<td class='num'>{t.count}</td><td class='num'>{t.base_count}</td>"
            f"<td class='num'>{_num(t.cosine_distance)}</td>"
            f"<td class='num'>{_num(t.contribution)}</td></tr>"
        )
    out.append("</table>")
    return out


def _figure(fig: Figure) -> str:
    encoded = base64.b64encode(fig.path.read_bytes()).decode("ascii")
    caption = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
    return (
        f"<figure><img alt='{_e(fig.title)}' src='data:image/png;base64,{encoded}'>"
        f"{caption}</figure>"
    )


def render_html(
    data: ReportData,
    figures: Sequence[Figure],
    notes: Sequence[str],
    metric_order: Sequence[str],
    generated: float,
) -> str:
    """The whole page as one string."""
    names = data.token_names or {}
    title = f"collapse-monitor report: {data.model} ({data.window})"
    snaps = data.snapshots
    span = f"{_time(snaps[0].timestamp)} to {_time(snaps[-1].timestamp)}" if snaps else "-"
    if data.x_labels is not None and snaps:
        span = f"{_e(data.x_labels[0])} to {_e(data.x_labels[-1])}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>{len(snaps)} snapshot(s), {span}; generated {_e(_time(generated))}</p>",
    ]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    if snaps:
        parts += _summary(data, snaps[-1], metric_order)
    parts += _alerts(data.alert_periods, data.alerting is not None, _when(data))
    if snaps:
        parts += _top_drift(snaps[-1], names)
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(f) for f in figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
