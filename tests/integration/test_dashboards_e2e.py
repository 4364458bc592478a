"""Every dashboard query parses as PromQL and returns data in a real stack.

Redis, the evaluator, the exporter subprocess and a real Prometheus scraping every second, as in
test_e2e_alerts.py. The snapshot has a pinned baseline and drift, one bad batch is sent so the
rejection panel has a series, and a probe rule named `Collapse*` fires so the alert annotation
has one too. A query that returns nothing here would show "No data" to an on-call engineer, so
every query must return a series unless it is listed in NO_DATA_BY_DESIGN with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servers import (
    ROOT,
    PrometheusServer,
    RedisServer,
    free_port,
    http_json,
    service_env,
    stop_process,
    wait_for,
)

from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.evaluate.evaluator import Evaluator
from monitor.pipeline.baselines import pin_window
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model

pytestmark = pytest.mark.slow

VOCAB, DIM = 40, 8
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
SUBSTITUTIONS = {"$__rate_interval": "1m", "${model}": "m", "$model": "m",
                 "${window}": "1m", "$window": "1m"}  # fmt: skip
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


def traffic(seed: int, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(VOCAB, DIM)) * 3 * spread
    y = rng.integers(0, VOCAB, n)
    return (means[y] + rng.normal(size=(n, DIM))).astype(np.float32), y


def feed(runtime: Runtime, spread: float, at: float, tag: str, nc4_hits: int) -> None:
    """Five batches, one per 10-second bucket; NC4 hits come from the capture side."""
    for i in range(5):
        x, y = traffic(zlib.crc32(f"{tag}{i}".encode()), 300, spread)
        payload = encode_batch("m", x, y, batch_id=f"{tag}{i}", ts=at - 5 - 10 * i,
                               nc4=(nc4_hits, 300))  # fmt: skip
        runtime.ingestor.ingest(payload)
    compact_model(runtime.store, "m")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A stack with baseline, drift, a rejection and a firing probe alert, scraped each second."""
    tmp = tmp_path_factory.mktemp("dashboards")
    np.save(tmp / "head.npy", np.random.default_rng(1).normal(size=(VOCAB, DIM)))
    models = [{"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True,
               "classifier_path": str(tmp / "head.npy")}]  # fmt: skip
    service = {
        "COLLAPSE_WINDOWS": json.dumps({"1m": 60}),
        "COLLAPSE_BUCKET_SECONDS": "10",
        "COLLAPSE_COARSE_BUCKET_SECONDS": "60",
        "COLLAPSE_FINE_RETENTION_SECONDS": "60",
    }
    rules = tmp / "probe.yml"
    rules.write_text(json.dumps(PROBE_RULES))
    redis_server = RedisServer(tmp)
    redis_server.start()
    env = service_env(redis_server.url, json.dumps(models), **service)
    settings = Settings(
        redis_url=redis_server.url,
        models=models,
        windows={"1m": 60},
        bucket_seconds=10,
        coarse_bucket_seconds=60,
        fine_retention_seconds=60,
    )
    runtime = Runtime(settings)
    evaluator = Evaluator(runtime)
    port = free_port()
    server = PrometheusServer(tmp, [f"127.0.0.1:{port}"], [rules])
    log = open(tmp / "exporter.log", "ab")  # noqa: SIM115 - closed with the process
    exporter = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "exporter", "--port", str(port)],
        env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        server.start()
        t0 = time.time()
        feed(runtime, 1.0, t0, "base", nc4_hits=150)
        pin_window(runtime.store, runtime.registry, "m", "ref", "1m", 60)
        feed(runtime, 0.6, t0 + 100, "drifted", nc4_hits=90)
        snapshot = evaluator.evaluate_model("m", now=t0 + 100)[0]
        assert snapshot.ok
        bad_x, bad_y = traffic(7, 10, 1.0)
        with pytest.raises(InvalidInput):  # wrong width: counted as a rejection
            runtime.ingestor.ingest(encode_batch("m", bad_x[:, :5], bad_y, batch_id="bad", ts=t0))
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
