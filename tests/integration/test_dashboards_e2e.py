"""Every dashboard query parses as PromQL and returns data in a real stack.

Redis, the evaluator, the exporter subprocess and a real Prometheus scraping every second, as in
test_e2e_alerts.py. The snapshot has a pinned baseline and drift, one bad batch is sent so the
rejection panel has a series, and a probe rule named `Collapse*` fires so the alert annotation
has one too. A query that returns nothing here would show "No data" to an on-call engineer, so
every query must return a series unless it is listed in NO_DATA_BY_DESIGN with its reason.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from minute_stack import MinuteStack, model_m, traffic
from servers import (
    ROOT,
    PrometheusServer,
    RedisServer,
    free_port,
    http_json,
    stop_process,
    wait_for,
)

from monitor.errors import InvalidInput
from monitor.pipeline.baselines import pin_window
from monitor.pipeline.payload import encode_batch

pytestmark = pytest.mark.slow

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
# ab.json compares two models: here both are `m` (a difference of 0 is still data).
SUBSTITUTIONS = {"$__rate_interval": "1m", "${model}": "m", "$model": "m",
                 "${window}": "1m", "$window": "1m", "${reference}": "m", "$reference": "m",
                 "${candidate}": "m", "$candidate": "m"}  # fmt: skip
# Queries that may be empty in a healthy stack, and why. Empty today: every query we ship has
# its data produced below (the bad batch, the probe alert), so nothing needs excluding.
NO_DATA_BY_DESIGN: dict[str, str] = {}
PROBE_RULES = {
    "groups": [
        {
            "name": "dashboard-probe",
            "rules": [
                {
                    "alert": "CollapseDashboardProbe",
                    "expr": "collapse_store_up == 1",
                    "labels": {"severity": "warning"},
                }
            ],
        }
    ]
}


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation title, expr with variables substituted) for every query."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        items = [p for row in board["panels"] for p in [row, *row.get("panels", [])]]
        for panel in items:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
        for annotation in board["annotations"]["list"]:
            if "expr" in annotation:
                found.append((path.name, annotation["name"], annotation["expr"]))
    out = []
    for board_name, title, expr in found:
        for variable, value in SUBSTITUTIONS.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{board_name} {title}: unsubstituted variable in {expr}"
        out.append((board_name, title, expr))
    return out


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A stack with baseline, drift, a rejection and a firing probe alert, scraped each second."""
    tmp = tmp_path_factory.mktemp("dashboards")
    rules = tmp / "probe.yml"
    rules.write_text(json.dumps(PROBE_RULES))
    redis_server = RedisServer(tmp)
    redis_server.start()
    stack = MinuteStack(redis_server.url, [model_m(tmp, second_moment=True)])
    port = free_port()
    server = PrometheusServer(tmp, [f"127.0.0.1:{port}"], [rules])
    exporter = stack.start_exporter(port, tmp / "exporter.log")
    try:
        server.start()
        t0 = stack.t0
        stack.feed(1.0, t0, "base", nc4_hits=150)
        pin_window(stack.runtime.store, stack.runtime.registry, "m", "ref", "1m", 60)
        stack.feed(0.6, t0 + 100, "drifted", nc4_hits=90)
        assert stack.evaluate(t0 + 100).ok
        bad_x, bad_y = traffic(7, 10, 1.0)
        with pytest.raises(InvalidInput):  # wrong width: counted as a rejection
            stack.runtime.ingestor.ingest(
                encode_batch("m", bad_x[:, :5], bad_y, batch_id="bad", ts=t0)
            )
        yield server
    finally:
        stop_process(exporter)
        server.stop()
        redis_server.stop()


def instant(server: PrometheusServer, expr: str) -> Any:
    url = f"{server.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return http_json(url)
    except Exception as exc:  # 400 bad_data: the body says why
        body = getattr(exc, "read", lambda: b"")()
        return json.loads(body) if body else {"status": "error", "error": str(exc)}


def test_every_query_parses_as_promql(prometheus: PrometheusServer) -> None:
    assert instant(prometheus, "rate(collapse_store_up[")["status"] == "error"  # the check bites
    bad = []
    for board, title, expr in queries():
        answer = instant(prometheus, expr)
        if answer.get("status") != "success":
            bad.append(f"{board} / {title}: {expr}: {answer.get('error')}")
    assert not bad, "\n".join(bad)


def test_every_query_returns_data(prometheus: PrometheusServer) -> None:
    expected = [q for q in queries() if q[1] not in NO_DATA_BY_DESIGN]

    def empty() -> list[str]:
        return [
            f"{board} / {title}: {expr}"
            for board, title, expr in expected
            if not instant(prometheus, expr)["data"]["result"]
        ]

    try:  # rates need two scrapes, the probe alert one rule evaluation
        wait_for(lambda: not empty(), 60, "data for every dashboard query", interval=1.0)
    except TimeoutError:
        pytest.fail("queries without data:\n" + "\n".join(empty()))
