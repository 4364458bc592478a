"""`write_report`: every figure of a `ReportData` as PNG, and the HTML page that embeds them."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from monitor.data.output import OutputDir
from monitor.report.data import ReportData, ReportFiles
from monitor.report.figures import GROUPS, draw_group, draw_pca, save_png
from monitor.report.html import Figure, render_html
from monitor.report.pca import drift_ranking, project_means, top_drift_ids

__all__ = ["HTML_NAME", "PCA_STEM", "write_report"]

HTML_NAME = "report.html"
PCA_STEM = "class_means_pca"
CUSTOM_STEM = "custom"
_KNOWN = {k for _, _, keys in GROUPS for k in keys} | {"drift_mmd_threshold"}
LABELLED = 10  # drifted tokens named on the PCA panel


def _custom_keys(data: ReportData) -> tuple[str, ...]:
    """Metrics outside the catalogue (custom metric plugins), in first-seen order."""
    seen: dict[str, None] = {}
    for snap in data.snapshots:
        for key in snap.metrics:
            if key not in _KNOWN and not key.endswith("_stderr"):
                seen.setdefault(key, None)
    return tuple(seen)


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write `report.html` and one PNG per figure with data into `out_dir`; returns the paths.

    Never fails on thin data: no snapshots, a single one, no baseline or no window statistics
    give a page with a note in place of the missing figures. Files go through
    `monitor.data.output`: `out_dir` must not be a symbolic link, and each file is replaced
    atomically (a browser refreshing the demo's page never sees half of one).
    """
    if data.x_labels is not None and len(data.x_labels) != len(data.snapshots):
        raise ValueError(f"{len(data.x_labels)} x labels for {len(data.snapshots)} snapshots")
    if data.x_labels is None:  # oldest first, without touching the caller's object
        data = replace(data, snapshots=sorted(data.snapshots, key=lambda s: s.timestamp))
    with OutputDir(out_dir) as out:
        return _write(data, out)


def _write(data: ReportData, out: OutputDir) -> ReportFiles:
    notes: list[str] = list(data.notes)
    figures: list[Figure] = []
    groups = [*GROUPS]
    custom = _custom_keys(data)
    if custom:
        groups.append((CUSTOM_STEM, "Other metrics", custom))
    written: set[str] = set()
    if not data.snapshots:
        notes.append(f"No snapshots of {data.model} ({data.window}) yet: nothing to plot.")
    else:
        missing: list[str] = []
        for stem, title, keys in groups:
            panel = draw_group(data, stem, title, keys)
            if panel is None:
                missing.append(title)
                continue
            path = out.write_with(f"{stem}.png", partial(save_png, panel.figure))
            written.add(stem)
            figures.append(Figure(title, path, "Metrics: " + ", ".join(panel.metrics)))
        if missing:
            notes.append("No values in any snapshot for: " + "; ".join(missing) + ".")
    pca = _pca(data, out, notes)
    if pca is not None:
        figures.append(pca)
        written.add(PCA_STEM)
    for stem in {s for s, _, _ in groups} | {PCA_STEM, CUSTOM_STEM}:
        if stem not in written:  # a figure from an earlier report would no longer be true
            out.remove(f"{stem}.png")
    order = [k for _, _, keys in groups for k in keys] + ["drift_mmd_threshold"]
    page = render_html(data, figures, notes, order, time.time())
    html = out.write_text(HTML_NAME, page)
    return ReportFiles(html=html, pngs=[f.path for f in figures])


def _pca(data: ReportData, out: OutputDir, notes: list[str]) -> Figure | None:
    if data.baseline is None or data.current is None:
        what = {
            (True, True): "class statistics (baseline and window)",
            (True, False): "baseline",
            (False, True): "current window statistics",
        }[(data.baseline is None, data.current is None)]
        notes.append(f"No {what}: the class-means projection (PCA) is skipped.")
        return None
    projection = project_means(data.baseline, data.current, min_count=data.min_count)
    if projection is None:
        notes.append(
            f"Fewer than 3 class means with at least {data.min_count} samples: "
            "the class-means projection (PCA) is skipped."
        )
        return None
    latest = data.snapshots[-1] if data.snapshots else None
    if latest is not None and latest.top_drift:
        labelled = top_drift_ids(latest.top_drift, LABELLED)
        names = {t.class_id: t.token for t in latest.top_drift}
    else:
        labelled = drift_ranking(
            data.baseline, data.current, min_count=data.min_count, top=LABELLED
        )
        names = {}
    names.update(data.token_names or {})
    title = f"Class means, current window against the baseline - {data.model} ({data.window})"
    figure = draw_pca(projection, labelled, names, title)
    path = out.write_with(f"{PCA_STEM}.png", partial(save_png, figure))
    caption = (
        f"Both sets projected on the two principal axes of their union; arrows: the {LABELLED} "
        "most drifted tokens, from the baseline mean to the current one."
    )
    return Figure("Class means (PCA)", path, caption)
