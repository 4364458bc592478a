"""Worker metrics end to end: a worker, Flower, the exporter and Prometheus, Redis with a password.

- Flower (`celery -A monitor.worker.flower flower`, basic auth from FLOWER_BASIC_AUTH, as
  the chart runs it) counts the tasks a real `collapse-monitor worker` ran, by task name and
  state. The references are what the test sent and what the store recorded: good batches, a
  batch refused for bad input and a malformed message dead-lettered all end as task-succeeded
  (they are records, not failures: the exporter counts them by reason), and a task that raises
  is task-failed. Workers online is 1, then 0 after the worker's goodbye, then the series goes
  (--purge_offline_workers). A real Prometheus scrapes Flower and the exporter, and every query
  of dashboards/workers.json returns data. Neither password reaches Flower's log.
- With nobody listening, events are PUBLISHes that leave no key: the broker's keys stay the same
  size however many tasks run. A listener killed without closing leaves its binding with a
  deadline (event_queue_expires), not in kombu's permanent set.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import (
    ROOT,
    PrometheusServer,
    RedisServer,
    free_port,
    http_json,
    service_env,
    start_worker,
    stop_process,
    wait_for,
)

from monitor.config import Settings
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.queues import TASK_COMPACT, TASK_INGEST
from monitor.pipeline.runtime import Runtime

pytestmark = pytest.mark.slow

MODELS = [{"name": "m", "vocab_size": 50, "dim": 8}]
REDIS_PASSWORD = "redis-pw-5e1f0c"
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-pw-77a2b9"
PURGE_SECONDS = 5
WORKER = f"celery@{socket.gethostname()}"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _env(server: RedisServer, **extra: str) -> dict[str, str]:
    return service_env(server.url, json.dumps(MODELS), COLLAPSE_REDIS_PASSWORD=REDIS_PASSWORD,
                       **extra)  # fmt: skip


def _worker_ready(log: Path) -> bool:
    return log.exists() and "ready." in log.read_text(errors="replace")


def _start_flower(env: dict[str, str], port: int, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "celery", "-A", "monitor.worker.flower", "flower",
            "--address=127.0.0.1", f"--port={port}", "--read_only=true", "--persistent=false",
            f"--purge_offline_workers={PURGE_SECONDS}"]  # fmt: skip
    flower_env = {**env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    with open(log, "ab") as handle:
        return subprocess.Popen(
            args,
            env=flower_env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _text(url: str, auth: bool = False) -> str:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


def _samples(url: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(_text(url)):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _batch(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((20, dim)).astype(np.float32), rng.integers(0, 50, 20).astype(
        np.int32
    )


def _wait(check: Callable[[], bool], timeout: float, what: str, show: Callable[[], str]) -> None:
    try:
        wait_for(check, timeout, what, interval=0.2)
    except TimeoutError:
        pytest.fail(f"{what} not seen within {timeout} s:\n{show()}")


def test_flower_counts_tasks_by_name_and_state_and_prometheus_serves_the_dashboard(
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path, password=REDIS_PASSWORD)
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    env = _env(redis_server)
    flower_port, exporter_port = free_port(), free_port()
    flower_log = tmp_path / "flower.log"
    try:
        worker_log = tmp_path / "worker.log"
        worker = start_worker(env, worker_log, queues="ingest,maintenance")
        procs.append(worker)
        (tmp_path / "cwd").mkdir()
        flower = _start_flower(env, flower_port, flower_log, tmp_path / "cwd")
        procs.append(flower)
        exporter_args = [sys.executable, "-m", "monitor.cli", "exporter", "--host", "127.0.0.1",
                         "--port", str(exporter_port)]  # fmt: skip
        with open(tmp_path / "exporter.log", "ab") as handle:
            exporter = subprocess.Popen(
                exporter_args,
                env=env,
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(exporter)
        metrics_url = f"http://127.0.0.1:{flower_port}/metrics"

        def show() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in (worker_log, flower_log))  # fmt: skip

        _wait(lambda: _worker_ready(worker_log), 120, "worker ready", show)
        # Workers online comes from heartbeats (every 2 s), so Flower has to see one first.
        _wait(lambda: _value(_samples(metrics_url), "flower_worker_online", worker=WORKER) == 1,
              60, "worker online in Flower", show)  # fmt: skip

        settings = Settings(redis_url=redis_server.url, redis_password=REDIS_PASSWORD,
                            models=MODELS)  # type: ignore[arg-type]  # fmt: skip
        client = MonitorClient(settings)
        assert client.app is not None
        rng = np.random.default_rng(3)
        for i in range(3):
            client.submit_features("m", *_batch(rng, 8), batch_id=f"good-{i}")
        client.submit_features("m", *_batch(rng, 5), batch_id="bad-width")  # refused, counted
        client.app.send_task(TASK_INGEST, args=[], kwargs={"nope": 1})  # dead-lettered
        client.app.send_task(TASK_COMPACT)
        client.app.send_task(TASK_COMPACT, args=[1])  # compact() takes none: the task raises

        def counted() -> bool:
            s = _samples(metrics_url)
            events = "flower_events_total"
            return (
                _value(s, events, worker=WORKER, type="task-succeeded", task=TASK_INGEST) == 5
                and _value(s, events, worker=WORKER, type="task-succeeded", task=TASK_COMPACT) == 1
                and _value(s, events, worker=WORKER, type="task-failed", task=TASK_COMPACT) == 1
            )

        _wait(counted, 60, "task counts in Flower", show)
        s = _samples(metrics_url)
        events = "flower_events_total"
        assert _value(s, events, worker=WORKER, type="task-failed", task=TASK_INGEST) is None
        assert _value(s, events, worker=WORKER, type="task-received", task=TASK_INGEST) == 5
        assert _value(s, events, worker=WORKER, type="task-started", task=TASK_INGEST) == 5
        # Succeeded tasks carry their runtime; the one that raised does not.
        runtime = "flower_task_runtime_seconds_count"
        assert _value(s, runtime, worker=WORKER, task=TASK_INGEST) == 5
        assert _value(s, runtime, worker=WORKER, task=TASK_COMPACT) == 1
        online = {dict(k[1])["worker"]: v for k, v in s.items() if k[0] == "flower_worker_online"}
        assert online == {WORKER: 1}
        executing = "flower_worker_number_of_currently_executing_tasks"  # from heartbeats
        _wait(lambda: _value(_samples(metrics_url), executing, worker=WORKER) == 0, 30,
              "tasks executing in Flower", show)  # fmt: skip
        # The producers' task-sent series are purged at every scrape (they send no heartbeats).
        assert not [k for k in s if ("type", "task-sent") in k[1]]

        # What Flower calls succeeded holds the records the store made: 3 batches stored, one
        # refused for its width, one dead-lettered (references from the store, not Flower).
        counters = Runtime(settings).store.counters("m")
        assert counters.get("batches_ingested") == 3
        assert counters.get("rejected:wrong_dimension", 0) >= 1
        assert redis_server.client().llen("cm:dead_letters") == 1

        # Task pages hold no payload: arguments are summarised one level deep.
        tasks = json.loads(_text(f"http://127.0.0.1:{flower_port}/api/tasks", auth=True))
        ingest = [t for t in tasks.values() if t["name"] == TASK_INGEST and t["args"] != "()"]
        assert len(ingest) == 4
        assert {t["args"] for t in ingest} == {"[{...}]"}

        prometheus = PrometheusServer(tmp_path, [f"127.0.0.1:{flower_port}",
                                                 f"127.0.0.1:{exporter_port}"], [])  # fmt: skip
        prometheus.start()
        try:
            _every_dashboard_query_returns_data(prometheus)
        finally:
            prometheus.stop()

        # The worker says goodbye: online 0, then its series leave once purged.
        stop_process(worker)

        def online_is(value: float | None) -> Callable[[], bool]:
            return lambda: _value(_samples(metrics_url), "flower_worker_online",
                                  worker=WORKER) == value  # fmt: skip

        _wait(online_is(0), 30, "worker offline in Flower", show)
        _wait(online_is(None), PURGE_SECONDS + 30, "offline worker purged", show)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        redis_server.stop()
    assert list((tmp_path / "cwd").iterdir()) == []  # no state file: persistent mode is off
    log = flower_log.read_text(errors="replace")
    assert "Visit me at" in log
    assert REDIS_PASSWORD not in log
    assert FLOWER_PASSWORD not in log


def _every_dashboard_query_returns_data(prometheus: PrometheusServer) -> None:
    board = json.loads((ROOT / "dashboards" / "workers.json").read_text(encoding="utf-8"))
    substitutions = {"$__rate_interval": "1m", "$cluster": ".*", "$namespace": ".*",
                     "$job": ".*"}  # fmt: skip
    queries = []
    for row in board["panels"]:
        for panel in [row, *row.get("panels", [])]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in substitutions.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, expr
                queries.append((panel["title"], expr))
    assert len(queries) >= 7

    def result(expr: str) -> list[object]:
        url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = http_json(url)
        assert answer["status"] == "success", (expr, answer)
        found: list[object] = answer["data"]["result"]
        return found

    def empty() -> list[str]:
        return [f"{title}: {expr}" for title, expr in queries if not result(expr)]

    try:  # rates need two scrapes of each target
        wait_for(lambda: not empty(), 60, "data for every workers.json query", interval=1.0)
    except TimeoutError:
        pytest.fail("queries without data:\n" + "\n".join(empty()))


def _broker_keys(server: RedisServer) -> dict[str, tuple[str, int]]:
    """Every key outside the store's prefix (Celery's and kombu's): type and size."""
    client = server.client()
    sizes = {"list": client.llen, "set": client.scard, "zset": client.zcard, "hash": client.hlen,
             "string": client.strlen}  # fmt: skip
    out = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if key.startswith("cm:"):
            continue
        kind = client.type(key).decode()
        out[key] = (kind, int(sizes[kind](key)))
    return out


def _publishes(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


def test_events_leave_no_growing_key_without_a_listener(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path, password=REDIS_PASSWORD)
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    env = _env(redis_server)
    try:
        worker_log = tmp_path / "worker.log"
        procs.append(start_worker(env, worker_log))
        wait_for(lambda: _worker_ready(worker_log), 120, "worker ready")
        settings = Settings(redis_url=redis_server.url, redis_password=REDIS_PASSWORD,
                            models=MODELS)  # type: ignore[arg-type]  # fmt: skip
        client = MonitorClient(settings)
        runtime = Runtime(settings)
        rng = np.random.default_rng(5)
        rounds = 3
        per_round = 15
        snapshots = []
        for r in range(rounds):
            before = _publishes(redis_server)
            for i in range(per_round):
                client.submit_features("m", *_batch(rng, 8), batch_id=f"r{r}-{i}")
            wait_for(lambda r=r: runtime.store.counters("m").get("batches_ingested", 0)
                     == (r + 1) * per_round, 60, f"round {r} ingested")  # fmt: skip
            wait_for(lambda: not redis_server.client().llen("ingest"), 30, "queue drained")
            time.sleep(1.0)  # the worker's buffered task events go out with its next flush
            # Each send publishes its task-sent event; the worker adds its own (batched).
            assert _publishes(redis_server) - before >= per_round
            snapshots.append(_broker_keys(redis_server))
        assert not [k for k in snapshots[-1] if k.startswith("celeryev")]
        # The same keys with the same sizes after 15 tasks and after 45: nothing accumulates.
        assert snapshots[1] == snapshots[2], (snapshots[1], snapshots[2])

        # A listener killed without closing its queue: its binding carries a deadline (an hour
        # at least, kombu's floor over event_queue_expires) instead of staying forever.
        (tmp_path / "cwd").mkdir()
        flower = _start_flower(env, free_port(), tmp_path / "flower.log", tmp_path / "cwd")
        procs.append(flower)
        broker = redis_server.client()
        wait_for(lambda: broker.scard("_kombu.binding.celeryev") >= 1, 60, "Flower's binding")
        os.killpg(flower.pid, signal.SIGKILL)
        flower.wait(timeout=10)
        deadline = broker.zscore("_kombu.binding_deadlines", "celeryev")
        assert deadline is not None
        assert 3500 <= deadline / 1000 - time.time() <= 3700
        assert not broker.exists("_kombu.binding_permanent.celeryev")
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        redis_server.stop()
