"""Write a report's PNGs and HTML page (being written: a first, rough version)."""

from __future__ import annotations

from pathlib import Path

from monitor.report.data import ReportData, ReportFiles


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write `report.html` (and PNG figures) for `data` into `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / "report.html"
    html.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{data.model}</title></head>"
        f"<body><h1>{data.model} ({data.window})</h1><p>{len(data.snapshots)} snapshots</p>"
        "</body></html>",
        encoding="utf-8",
    )
    return ReportFiles(html=html, pngs=[])
