"""dashboards/workers.json: the Workers row names only what Flower and the exporter export.

The metric families come from the installed Flower itself (its PrometheusMetrics, built in a
subprocess so that its collectors never enter this process's registry), so a Flower upgrade
that renames one breaks this test instead of a graph. The generic dashboard rules (datasource,
units, descriptions, scope variables, rate intervals) are those of test_dashboards.py, which
runs on every file in dashboards/; whether each query returns data from a real Flower scraped by
a real Prometheus is tests/integration/test_worker_metrics.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from monitor.exporter import PREFIX

ROOT = Path(__file__).resolve().parents[2]
BOARD = ROOT / "dashboards" / "workers.json"
CHART_COPY = ROOT / "helm" / "collapse-monitor" / "dashboards" / "workers.json"
SCOPE = 'cluster=~"$cluster", namespace=~"$namespace", job=~"$job"'
LIST_FAMILIES = """
import json
from flower.events import PrometheusMetrics
families = {}
for metric in vars(PrometheusMetrics()).values():
    for family in metric.describe():
        families[family.name] = family.type
print(json.dumps(families))
"""
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


@cache
def flower_families() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", LIST_FAMILIES], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    found: dict[str, str] = json.loads(out.stdout)
    return found


def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(BOARD.read_text(encoding="utf-8"))
    return loaded


def targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [
        (panel["title"], target["expr"])
        for row in board()["panels"]
        for panel in [row, *row.get("panels", [])]
        for target in panel.get("targets", [])
    ]


def test_flower_exports_the_families_the_dashboard_relies_on() -> None:
    families = flower_families()
    assert families["flower_events"] == "counter"
    assert families["flower_task_runtime_seconds"] == "histogram"
    assert families["flower_worker_online"] == "gauge"
    assert families["flower_worker_number_of_currently_executing_tasks"] == "gauge"


def test_queries_name_only_flower_and_exporter_series() -> None:
    allowed = {
        name + suffix for name, kind in flower_families().items() for suffix in SUFFIXES[kind]
    } | {PREFIX + "queue_depth"}
    for title, expr in targets():
        text = re.sub(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]', "", expr)
        names = set(re.findall(r"\b(?:flower|collapse)_[a-z_]+\b", text))
        assert names, f"{title}: no metric in {expr}"
        assert names <= allowed, f"{title}: unknown {sorted(names - allowed)}"
        for name in names:  # every selector carries the scope filter
            assert re.search(rf"{name}\{{{re.escape(SCOPE)}[,}}]", expr), f"{title}: {expr}"


def test_the_workers_row_has_its_panels() -> None:
    rows = [p for p in board()["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Workers"]
    exprs = dict(targets())
    by_title = {title: [e for t, e in targets() if t == title] for title in exprs}
    assert "flower_worker_online" in by_title["Workers online"][0]
    assert (
        "flower_worker_number_of_currently_executing_tasks"
        in by_title["Tasks executing by worker"][0]
    )
    rate = by_title["Tasks per second by task and state"][0]
    assert "sum by (task, type)" in rate
    assert "task-(received|started|succeeded|failed|retried|rejected|revoked)" in rate
    failures = by_title["Task failures per second"][0]
    assert "task-(failed|retried|rejected|revoked)" in failures
    p50, p95 = by_title["Task runtime p50 and p95"]
    assert p50.startswith("histogram_quantile(0.5, sum by (task, le)")
    assert p95.startswith("histogram_quantile(0.95, sum by (task, le)")
    assert "flower_task_runtime_seconds_bucket" in p50
    assert "collapse_queue_depth" in by_title["Queue depth"][0]


def test_uid_and_chart_copy() -> None:
    assert board()["uid"] == "collapse-workers"
    assert CHART_COPY.read_bytes() == BOARD.read_bytes()
