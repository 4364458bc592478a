"""The files of a study: study.csv (one row per checkpoint), correlations.csv, study.json."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from monitor.data.output import OutputDir
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


def _csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def write_study(result: StudyResult, out_dir: Path) -> list[Path]:
    """Write study.csv, correlations.csv and study.json into `out_dir` (created).

    Through `monitor.data.output`: a symbolic link at `out_dir` is refused and each file is
    replaced atomically.
    """
    doc = result.to_json()
    table: list[list[str]] = [list(ROW_COLUMNS + REPORT_KEYS)]
    for row in doc["checkpoints"]:
        cells = [row[c] for c in ROW_COLUMNS] + [row["metrics"][k] for k in REPORT_KEYS]
        table.append([_cell(v) for v in cells])
    corr: list[list[str]] = [list(CORRELATION_COLUMNS)]
    for item in doc["correlations"]:
        corr.append([_cell(item[c]) for c in CORRELATION_COLUMNS])
    with OutputDir(out_dir) as out:
        return [
            out.write_text("study.csv", _csv(table)),
            out.write_text("correlations.csv", _csv(corr)),
            out.write_text("study.json", json.dumps(doc, indent=2) + "\n"),
        ]
