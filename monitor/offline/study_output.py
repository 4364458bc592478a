"""The files of a study: study.csv (one row per checkpoint), correlations.csv, study.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from monitor.metrics import REPORT_KEYS
from monitor.offline.study import StudyResult

ROW_COLUMNS: tuple[str, ...] = (
    "name",
    "path",
    "parameters",
    "n_embd",
    "n_layer",
    "train_tokens",
    "eval_tokens",
    "val_loss",
)
CORRELATION_COLUMNS: tuple[str, ...] = (
    "metric",
    "n",
    "scale",
    "pearson_r",
    "r2",
    "spearman_rho",
    "expected_sign",
    "agrees",
)


def _cell(value: object) -> str:
    """Empty for None (METRICS.md: not computable), repr-exact for floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_study(result: StudyResult, out_dir: Path) -> list[Path]:
    """Write study.csv, correlations.csv and study.json into `out_dir` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = result.to_json()
    table = out_dir / "study.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ROW_COLUMNS + REPORT_KEYS)
        for row in doc["checkpoints"]:
            cells = [row[c] for c in ROW_COLUMNS] + [row["metrics"][k] for k in REPORT_KEYS]
            writer.writerow([_cell(v) for v in cells])
    corr = out_dir / "correlations.csv"
    with corr.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CORRELATION_COLUMNS)
        for item in doc["correlations"]:
            writer.writerow([_cell(item[c]) for c in CORRELATION_COLUMNS])
    js = out_dir / "study.json"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    return [table, corr, js]
