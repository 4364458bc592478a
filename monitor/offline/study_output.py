"""The files of a study: study.csv (one row per checkpoint), correlations.csv, study.json.

study.csv: ROW_COLUMNS, every METRICS.md key, then the study's DERIVED_KEYS. correlations.csv:
CORRELATION_COLUMNS, each interval split into `<name>_low` and `<name>_high`. With `--layers`
also layers.csv (LAYER_COLUMNS, the head-free keys, DERIVED_KEYS: one row per checkpoint and
hidden state) and layer_correlations.csv (`layer`, then correlations.csv's columns).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from monitor.data.output import OutputDir
from monitor.metrics import REPORT_KEYS
from monitor.offline.study import DERIVED_KEYS, StudyResult
from monitor.offline.study_layers import HEAD_FREE_KEYS

ROW_COLUMNS: tuple[str, ...] = (
    "name",
    "path",
    "parameters",
    "n_embd",
    "n_layer",
    "train_tokens",
    "eval_tokens",
    "val_loss",
    "run",
    "tokens_seen",
)
LAYER_COLUMNS: tuple[str, ...] = ("name", "layer", "head_input")
CORRELATION_COLUMNS: tuple[str, ...] = (
    "metric",
    "n",
    "runs",
    "scale",
    "pearson_r",
    "pearson_ci",
    "r2",
    "spearman_rho",
    "spearman_ci",
    "partial_r",
    "partial_r_ci",
    "partial_rho",
    "partial_rho_ci",
    "expected_sign",
    "agrees",
)


def _correlation_cells(item: dict[str, object]) -> list[str]:
    """One row of correlations.csv: each `*_ci` interval as two columns, `_low` and `_high`."""
    cells: list[str] = []
    for column in CORRELATION_COLUMNS:
        value = item[column]
        if column.endswith("_ci"):
            pair = value if isinstance(value, list) else [None, None]
            cells.extend(_cell(v) for v in pair)
        else:
            cells.append(_cell(value))
    return cells


def _correlation_header() -> list[str]:
    out: list[str] = []
    for column in CORRELATION_COLUMNS:
        out.extend([f"{column}_low", f"{column}_high"] if column.endswith("_ci") else [column])
    return out


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
    table: list[list[str]] = [list(ROW_COLUMNS + REPORT_KEYS + DERIVED_KEYS)]
    for row in doc["checkpoints"]:
        cells = [row[c] for c in ROW_COLUMNS] + [row["metrics"][k] for k in REPORT_KEYS]
        cells += [row["derived"][k] for k in DERIVED_KEYS]
        table.append([_cell(v) for v in cells])
    corr: list[list[str]] = [_correlation_header()]
    corr.extend(_correlation_cells(item) for item in doc["correlations"])
    with OutputDir(out_dir) as out:
        written = [
            out.write_text("study.csv", _csv(table)),
            out.write_text("correlations.csv", _csv(corr)),
        ]
        if "layer_correlations" in doc:
            written += [
                out.write_text("layers.csv", _csv(_layer_table(doc))),
                out.write_text("layer_correlations.csv", _csv(_layer_corr_table(doc))),
            ]
        written.append(out.write_text("study.json", json.dumps(doc, indent=2) + "\n"))
        return written


def _layer_table(doc: dict[str, Any]) -> list[list[str]]:
    table: list[list[str]] = [list(LAYER_COLUMNS + HEAD_FREE_KEYS + DERIVED_KEYS)]
    for row in doc["checkpoints"]:
        for layer in row.get("layers") or []:
            cells = [row["name"], layer["layer"], layer["head_input"]]
            cells += [layer["metrics"][k] for k in HEAD_FREE_KEYS]
            cells += [layer["derived"][k] for k in DERIVED_KEYS]
            table.append([_cell(v) for v in cells])
    return table


def _layer_corr_table(doc: dict[str, Any]) -> list[list[str]]:
    table: list[list[str]] = [["layer", *_correlation_header()]]
    for item in doc["layer_correlations"]:
        table.append([_cell(item["layer"]), *_correlation_cells(item)])
    return table
