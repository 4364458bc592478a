"""Build `ReportData` from the store (Redis or memory) or from `analyze` / `study` JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from monitor.alerts.thresholds import AlertingSettings
from monitor.errors import IncompatibleStats, InvalidInput
from monitor.pipeline.windows import read_state, window_stats
from monitor.report.data import ReportData
from monitor.report.periods import alert_periods
from monitor.snapshot import Snapshot
from monitor.stats import CollapseStats
from monitor.store.base import Store

__all__ = ["from_json", "from_store"]

# Row fields that name a checkpoint in `study` output (first one present wins).
_LABEL_FIELDS = ("checkpoint", "name", "label", "step", "revision")
_ROW_LISTS = ("checkpoints", "rows", "results", "history")
_ROW_METRICS = ("val_loss",)  # row fields of `study` JSON plotted with the metrics


def from_store(
    store: Store,
    model: str,
    window: str,
    *,
    count: int = 288,
    alerting: AlertingSettings | None = None,
    min_count: int = 2,
    known_models: list[str] | None = None,
) -> ReportData:
    """The last `count` snapshots of `model`/`window`, its baseline and window statistics.

    Raises `InvalidInput` (unknown_model, no_snapshots, bad_snapshot). A baseline or window
    that cannot be read leaves the PCA panel out with a note instead of failing the report.
    """
    raw = store.history(model, window, count)
    if not raw:
        known = sorted(set(store.models()) | set(known_models or []))
        if model not in known:
            raise InvalidInput("unknown_model", f"model {model!r} is unknown; known: {known}")
        raise InvalidInput("no_snapshots", f"no snapshots of {model!r} for window {window!r} yet")
    try:
        snapshots = sorted((Snapshot.from_json(r) for r in raw), key=lambda s: s.timestamp)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput(
            "bad_snapshot", f"a stored snapshot of {model!r} is unreadable: {exc}"
        ) from None
    latest = snapshots[-1]
    notes: list[str] = []
    current = window_stats(store, model, window, latest.window_seconds).stats
    if current is None:
        notes.append(f"The statistics of window {window} have expired from the store.")
    baseline = _baseline(store, model, latest, current, notes)
    tokens = {t.class_id: t.token for s in snapshots for t in s.top_drift}
    return ReportData(
        model=model,
        window=window,
        snapshots=snapshots,
        alerting=alerting,
        alert_periods=alert_periods(snapshots, alerting) if alerting else [],
        baseline=baseline,
        current=current,
        token_names=tokens or None,
        min_count=min_count,
        notes=notes,
    )


def _baseline(
    store: Store,
    model: str,
    latest: Snapshot,
    current: CollapseStats | None,
    notes: list[str],
) -> CollapseStats | None:
    """The baseline the latest snapshot was compared with (else the newest pinned one)."""
    name = (latest.baseline or {}).get("name")
    if not isinstance(name, str):
        pinned = store.baselines(model)
        if not pinned:
            return None
        name = max(pinned, key=lambda n: _created(pinned[n]))
    found = store.baseline(model, name)
    if found is None:
        notes.append(f"Baseline {name!r} is no longer pinned.")
        return None
    try:
        stats = read_state(store, model, found.state)
    except (InvalidInput, IncompatibleStats, ValueError) as exc:
        notes.append(f"Baseline {name!r} is unreadable: {exc}")
        return None
    if stats is None:
        notes.append(f"Baseline {name!r} is no longer pinned.")
        return None
    if current is not None and (stats.num_classes, stats.dim) != (
        current.num_classes,
        current.dim,
    ):
        notes.append(
            f"Baseline {name!r} ({stats.num_classes} x {stats.dim}) does not match the window "
            f"({current.num_classes} x {current.dim}): pin it again."
        )
        return None
    return stats


def _created(meta: dict[str, object]) -> float:
    value = meta.get("created")
    return float(value) if isinstance(value, int | float) else 0.0


def from_json(
    path: Path,
    *,
    model: str | None = None,
    alerting: AlertingSettings | None = None,
) -> ReportData:
    """`analyze --format json` (one point) or `study` JSON (one point per checkpoint row).

    Rows are a top-level list or the list under one of `rows`, `checkpoints`, `results`,
    `history`; a row holds its metrics flat or under `metrics` (with `val_loss` beside them in
    `study` JSON), and is named by its first
    field of `checkpoint`, `name`, `label`, `step`, `revision` (else its position). Alerts
    fire without `for` (there is no time between checkpoints).
    """
    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput("bad_json", f"{path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("bad_json", f"{path}: not valid JSON: {exc}") from None
    rows, title = _rows(doc, path)
    name = model or title or path.stem
    window = "checkpoints" if len(rows) > 1 or not _is_flat(doc) else "analyze"
    snapshots: list[Snapshot] = []
    labels: list[str] = []
    for i, row in enumerate(rows):
        metrics = _metrics(row, f"{path}: row {i}")
        default = path.name if window == "analyze" else i
        label = next((row[f] for f in _LABEL_FIELDS if isinstance(row.get(f), str | int)), default)
        labels.append(str(label))
        snapshots.append(
            Snapshot(
                model=name,
                window=window,
                window_seconds=0,
                timestamp=float(i),  # the row's position: x is the checkpoint, not time
                status="ok",
                reason=None,
                duration_seconds=0.0,
                sample_count=int(metrics.get("sample_count") or 0),
                class_count=int(metrics.get("class_count") or 0),
                metrics=metrics,
            )
        )
    periods = alert_periods(snapshots, alerting.instant()) if alerting else []
    return ReportData(
        model=name,
        window=window,
        snapshots=snapshots,
        alerting=alerting,
        alert_periods=periods,
        x_labels=labels,
    )


def _is_flat(doc: Any) -> bool:
    return isinstance(doc, dict) and not any(isinstance(doc.get(k), list) for k in _ROW_LISTS)


def _rows(doc: Any, path: Path) -> tuple[list[dict[str, Any]], str | None]:
    title = doc.get("model") if isinstance(doc, dict) else None
    if isinstance(doc, list):
        rows: Any = doc
    elif isinstance(doc, dict):
        found = next((doc[k] for k in _ROW_LISTS if isinstance(doc.get(k), list)), None)
        rows = [doc] if found is None else found
    else:
        raise InvalidInput("bad_json", f"{path}: expected an object or a list of rows")
    if not rows:
        raise InvalidInput("bad_json", f"{path}: no rows of metrics")
    if not all(isinstance(r, dict) for r in rows):
        raise InvalidInput("bad_json", f"{path}: every row must be an object of metrics")
    return rows, title if isinstance(title, str) else None


def _metrics(row: dict[str, Any], where: str) -> dict[str, float | int | None]:
    nested = isinstance(row.get("metrics"), dict)
    source: dict[str, Any] = row["metrics"] if nested else row
    if nested:  # a study row keeps its validation loss beside the metrics: plot it too
        source = {**source, **{k: row[k] for k in _ROW_METRICS if k in row}}
    out: dict[str, float | int | None] = {}
    for key, value in source.items():
        if key in _LABEL_FIELDS or key in ("model", "timestamp", "metrics"):
            continue
        if isinstance(value, bool):
            continue  # a flag (exact_pairs), not a metric
        if value is None:
            out[str(key)] = None
        elif isinstance(value, int | float):
            out[str(key)] = value if math.isfinite(value) else None
        elif isinstance(value, dict | list | str):
            continue  # nested detail (top classes, options, paths): not a plotted metric
    if not any(v is not None for v in out.values()):
        raise InvalidInput("bad_json", f"{where}: no numeric metric values")
    return out
