"""Every dashboard query parses as PromQL, returns data, and counts exporter replicas once.

Redis, the evaluator, the exporter subprocess and a real Prometheus scraping every second, as in
test_e2e_alerts.py. The snapshot has a pinned baseline and drift, one bad batch is sent so the
rejection panel has a series, and a probe rule named `Collapse*` fires so the alert annotation
has one too. A query that returns nothing here would show "No data" to an on-call engineer, so
every query must return a series unless it is listed in NO_DATA_BY_DESIGN with its reason.

Prometheus scrapes the one exporter as job `one` (one target) and as job `two` (two targets,
127.0.0.1 and localhost: two replicas exporting identical series, as a Deployment of two would).
Every query scoped to `two` must give what it gives scoped to `one`: the same series, and
values within scrape-timing noise, not doubled.
"""

from __future__ import annotations

import json
import math
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
                 "${candidate}": "m", "$candidate": "m", "$cluster": ".*", "$namespace": ".*",
                 "$job": ".*"}  # fmt: skip
# Series per replica by design (the store as each replica sees it), so not compared.
PER_REPLICA_BY_DESIGN = {"Store up over time": "one line per exporter replica (min by instance)"}
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
                    # by scrape job, as the shipped rules aggregate: one alert for two replicas
                    "expr": "max by (cluster, namespace, job) (collapse_store_up) == 1",
                    "labels": {"severity": "warning"},
                }
            ],
        }
    ]
}


def queries(job: str = ".*", rate_interval: str = "1m") -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation title, expr with variables substituted) for every query,
    scoped to the scrape job `job` (a regex)."""
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
        scope = {"$job": job, "$__rate_interval": rate_interval}
        for variable, value in {**SUBSTITUTIONS, **scope}.items():
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
    config = json.loads(server.config.read_text())
    config["scrape_configs"] = [
        {"job_name": "one", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
        {"job_name": "two", "static_configs": [{"targets": [f"127.0.0.1:{port}",
                                                            f"localhost:{port}"]}]},
    ]  # fmt: skip
    server.config.write_text(json.dumps(config))
    exporter = stack.start_exporter(port, tmp / "exporter.log")
    try:
        server.start()
        # Every target scraped before any data: each replica's series see every change.
        up = "count(up == 1 and on (instance, job) collapse_store_up == 1)"
        wait_for(lambda: _value(instant(server, up)) == 3.0, 60, "three scraped replicas")
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


def _value(answer: Any) -> float | None:
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _series(answer: Any) -> dict[tuple[tuple[str, str], ...], float]:
    """Result series by labels, without `job` (the scope under comparison)."""
    out = {}
    for item in answer["data"]["result"]:
        labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k != "job"))
        assert labels not in out, f"two series {labels}"
        out[labels] = float(item["value"][1])
    return out


def test_two_replicas_count_once(prometheus: PrometheusServer) -> None:
    """Each query over two replicas equals it over one: no duplicate series, no doubled sums."""
    # Rates over the series' whole life: each replica then sees every increase, and scrape
    # offsets move a rate by a few percent, where a double count would be 100 %.
    one_and_two = zip(queries("one", "10m"), queries("two", "10m"), strict=True)
    pairs = [
        (t, one, two) for (_, t, one), (_, _, two) in one_and_two if t not in PER_REPLICA_BY_DESIGN
    ]
    # Every target scraped the final state, and 20 times since its first scrape: a rate's
    # extrapolation past a series' ends then moves it by a few percent, not by half.
    final = (
        'count(count_over_time(collapse_samples_ingested_total{model="m"}[10m]) >= 20 '
        'and on (instance, job) collapse_drift_mmd{model="m"})'
    )
    wait_for(lambda: _value(instant(prometheus, final)) == 3.0, 60, "the replicas' scrapes")
    wrong = []
    for title, one, two in pairs:
        a, b = _series(instant(prometheus, one)), _series(instant(prometheus, two))
        if set(a) != set(b):
            wrong.append(f"{title}: series {sorted(a)} vs {sorted(b)}")
            continue
        for labels, value in a.items():
            other = b[labels]
            if not math.isclose(value, other, rel_tol=0.25, abs_tol=1e-9):
                wrong.append(f"{title} {dict(labels)}: one replica {value}, two {other}")
    assert not wrong, "\n".join(wrong)
    assert len(pairs) > 40


def test_every_query_parses_as_promql(prometheus: PrometheusServer) -> None:
    assert instant(prometheus, "rate(collapse_store_up[")["status"] == "error"  # the check bites
    bad = []
    for board, title, expr in queries():
        answer = instant(prometheus, expr)
        if answer.get("status") != "success":
            bad.append(f"{board} / {title}: {expr}: {answer.get('error')}")
    assert not bad, "\n".join(bad)


def test_every_query_returns_data(prometheus: PrometheusServer) -> None:
    # Other exporters' families (the workers dashboard's, from Flower) have no source in this
    # stack: tests/integration/test_worker_metrics.py checks those with a real Flower.
    ours = [q for q in queries() if "collapse_" in q[2] or "ALERTS" in q[2]]
    expected = [q for q in ours if q[1] not in NO_DATA_BY_DESIGN]

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
