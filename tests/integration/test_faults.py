"""Faults and load with real processes on loopback (issue 10, sections Faults and Load).

Covered elsewhere, not repeated here: a worker SIGKILLed mid-stream (test_celery_workers.py),
the API answering 503 JSON with an unreachable store or broker (tests/unit/test_api.py:
test_readyz_with_unreachable_store_is_503_quickly, test_unreachable_broker_answers_503_quickly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from servers import RedisServer, service_env, start_worker, stop_process, wait_for, worker_ready
from test_pipeline_redis import MODELS, assert_same_stats, batches, reference

from monitor.config import Settings
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats

pytestmark = pytest.mark.slow

VISIBILITY = 3  # seconds before an unacknowledged task is redelivered


def _ingested(runtime: Runtime, model: str = "m") -> int:
    return runtime.store.counters(model).get("batches_ingested", 0)


def _submit_with_retry(
    client: MonitorClient, model: str, x: np.ndarray, y: np.ndarray, batch_id: str
) -> int:
    """Submit until the broker acknowledges it (same batch id: a retry is counted once);
    returns the number of failed tries. Backoff 0.05 s doubling up to 1 s, 60 s at most."""
    failures, delay, deadline = 0, 0.05, time.monotonic() + 60
    while True:
        try:
            client.submit_features(model, x, y, batch_id=batch_id)
            return failures
        except Exception:
            failures += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(1.0, delay * 2)


def test_redis_restart_mid_stream_loses_no_acknowledged_batch(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = service_env(
        redis_server.url, json.dumps(MODELS), COLLAPSE_TASK_VISIBILITY_TIMEOUT=str(VISIBILITY)
    )
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(env, log) for log in logs]
    processes += workers
    for log in logs:
        wait_for(lambda log=log: worker_ready(log), 60, f"celery worker ({log.name})")

    settings = Settings(
        redis_url=redis_server.url, models=MODELS, task_visibility_timeout=VISIBILITY
    )  # type: ignore[arg-type]
    client = MonitorClient(settings)
    data = batches(80, 300, seed=21)
    acknowledged: list[int] = []
    send_errors = 0
    for i, (x, y) in enumerate(data):
        if i == 30:  # mid-stream: SIGKILL Redis (AOF, appendfsync always), restart it later
            redis_server.kill()
            restart = threading.Timer(2.0, redis_server.start)
            restart.start()
        send_errors += _submit_with_retry(client, "m", x, y, f"restart-{i}")
        acknowledged.append(i)
        time.sleep(0.02)
    restart.join(timeout=30)
    assert send_errors > 0, "the producer never saw the outage: the test did not test it"

    runtime = Runtime(settings)
    wait_for(
        lambda: _ingested(runtime) >= len(acknowledged), 120, "every batch ingested", interval=0.5
    )
    time.sleep(VISIBILITY + 1)  # a late redelivery, if any, would show up as a duplicate
    counters = runtime.store.counters("m")
    sent = [data[i] for i in acknowledged]
    assert counters["batches_ingested"] == len(acknowledged)
    assert counters["samples_ingested"] == sum(len(y) for _, y in sent)
    compact_model(runtime.store, "m")
    current = window_stats(runtime.store, "m", "1h", 3600).stats
    assert current is not None
    assert current.sample_count == sum(len(y) for _, y in sent)
    assert_same_stats(current, reference(sent))
    assert all(w.poll() is None for w in workers), "a worker died instead of reconnecting"
    for log in logs:  # each worker saw the outage and reconnected in place, once
        text = log.read_text(errors="replace")
        assert "Connection to broker lost" in text
        assert text.count("Connected to redis://") == 2, "no reconnect, or a reconnect loop"
        assert text.count("ready.") == 1, "the worker restarted instead of reconnecting"
    print(f"producer send errors during the outage: {send_errors}")


def test_worker_started_without_redis_retries_then_works(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    server = RedisServer(tmp_path)  # a free loopback port, nothing listening yet
    env = service_env(server.url, json.dumps(MODELS))
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    processes.append(worker)
    try:
        wait_for(
            lambda: "Cannot connect to redis://" in log.read_text(errors="replace"),
            30,
            "a clear 'Cannot connect' log line",
        )
        time.sleep(3)
        assert worker.poll() is None, "the worker gave up instead of retrying"
        assert not worker_ready(log)
        server.start()
        wait_for(lambda: worker_ready(log), 60, "worker ready once Redis is up")
        settings = Settings(redis_url=server.url, models=MODELS)  # type: ignore[arg-type]
        x, y = batches(1, 50, seed=5)[0]
        MonitorClient(settings).submit_features("m", x, y, batch_id="late")
        runtime = Runtime(settings)
        wait_for(lambda: _ingested(runtime) == 1, 60, "batch ingested")
        assert worker.poll() is None
    finally:
        stop_process(worker)
        server.stop()


def _start_beat(env: dict[str, str], logfile: Path, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(logfile, "ab")  # noqa: SIM115 - lives as long as the beat
    return subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "beat", "--loglevel", "info"],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def test_two_beats_neither_double_compact_nor_double_evaluate(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = service_env(
        redis_server.url,
        json.dumps(MODELS),
        COLLAPSE_COMPACTION_INTERVAL="1",
        COLLAPSE_EVALUATION_INTERVAL="1",
    )
    log = tmp_path / "worker.log"
    processes.append(start_worker(env, log, queues="ingest,maintenance"))
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    beat_logs = [tmp_path / "beat-a.log", tmp_path / "beat-b.log"]
    for i, beat_log in enumerate(beat_logs):
        workdir = tmp_path / f"beat-{i}"
        workdir.mkdir()
        processes.append(_start_beat(env, beat_log, workdir))
    for beat_log in beat_logs:
        wait_for(
            lambda b=beat_log: "Sending due task" in b.read_text(errors="replace"),
            60,
            f"beat ({beat_log.name}) sending",
        )

    settings = Settings(redis_url=redis_server.url, models=MODELS, evaluation_interval=1)  # type: ignore[arg-type]
    runtime = Runtime(settings)
    client = MonitorClient(settings)
    data = batches(30, 200, seed=31)
    for i, (x, y) in enumerate(data):
        client.submit_features("m", x, y, batch_id=f"beats-{i}")
        time.sleep(0.05)
    wait_for(lambda: _ingested(runtime) == len(data), 60, "every batch ingested")
    wait_for(lambda: runtime.store.pending_count("m") == 0, 30, "everything compacted")

    store = runtime.store
    started = time.time()
    time.sleep(6)
    ended = time.time()
    current = window_stats(store, "m", "1h", 3600).stats
    assert current is not None
    assert_same_stats(current, reference(data))  # compacted once: no partial merged twice
    assert store.counters("m")["batches_ingested"] == len(data)

    for window in settings.windows:
        stamps = [json.loads(s)["timestamp"] for s in store.history("m", window, 100)]
        during = [t for t in stamps if started <= t <= ended]
        slots = (ended - started) / settings.evaluation_interval
        assert 2 <= len(during) <= slots + 1, (window, len(during), slots)
    worker_log = log.read_text(errors="replace")
    assert "skipped: already done in this interval" in worker_log  # both beats' tasks arrived
    assert "Traceback" not in worker_log


LOAD_MODEL = {"name": "load", "vocab_size": 1000, "dim": 64, "second_moment": False}
LOAD_RATE = 20  # batches per second
LOAD_ROWS = 256


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants (the worker and its prefork pool), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def test_steady_load_keeps_memory_flat_and_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """COLLAPSE_LOAD_SECONDS=120 for the docs/benchmarks.md numbers; 30 s in the suite."""
    seconds = float(os.environ.get("COLLAPSE_LOAD_SECONDS", "30"))
    models = [LOAD_MODEL]
    env = service_env(redis_server.url, json.dumps(models))
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(env, log) for log in logs]
    processes += workers
    for log in logs:
        wait_for(lambda log=log: worker_ready(log), 60, f"celery worker ({log.name})")

    settings = Settings(redis_url=redis_server.url, models=models)  # type: ignore[arg-type]
    runtime = Runtime(settings)
    store = runtime.store
    client = MonitorClient(settings)
    rng = np.random.default_rng(7)
    means = rng.normal(size=(1000, 64)).astype(np.float32)
    submitted: dict[str, float] = {}
    ingested: dict[str, float] = {}
    samples: list[tuple[float, int, int]] = []  # (time, worker RSS, Redis used_memory)
    lock = threading.Lock()
    stop = threading.Event()

    def watch_ingestion() -> None:  # each batch's seen marker, every 10 ms
        poll = redis_server.client()
        while not stop.is_set():
            with lock:
                waiting = [b for b in submitted if b not in ingested]
            if waiting:
                pipe = poll.pipeline(transaction=False)
                for b in waiting:
                    pipe.exists(store.keys("load").seen(b))
                now = time.monotonic()
                with lock:
                    for b, found in zip(waiting, pipe.execute(), strict=True):
                        if found:
                            ingested[b] = now
            time.sleep(0.01)

    def sample_memory() -> None:  # every second: compact, then sample memory
        info = redis_server.client()
        while not stop.wait(1.0):
            compact_model(store, "load")
            rss = sum(_rss_bytes(p) for w in workers for p in _process_tree(w.pid))
            used = int(info.info("memory")["used_memory"])
            samples.append((time.monotonic(), rss, used))

    threads = [threading.Thread(target=watch_ingestion), threading.Thread(target=sample_memory)]
    for t in threads:
        t.start()
    send_errors = 0
    rows = 0
    try:
        t0 = time.monotonic()
        count = int(seconds * LOAD_RATE)
        for i in range(count):
            delay = t0 + i / LOAD_RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            y = rng.integers(0, 1000, LOAD_ROWS)
            x = means[y] + 0.3 * rng.standard_normal((LOAD_ROWS, 64), dtype=np.float32)
            batch_id = f"load-{i}"
            try:
                client.submit_features("load", x, y, batch_id=batch_id)
            except Exception:
                send_errors += 1
                continue
            with lock:
                submitted[batch_id] = time.monotonic()
            rows += LOAD_ROWS
        sent_for = time.monotonic() - t0
        wait_for(lambda: len(ingested) == len(submitted), 60, "every batch ingested", 0.2)
        drained = max(ingested.values()) - t0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)

    counters = store.counters("load")
    assert send_errors == 0
    assert counters.get("batches_ingested") == count
    assert counters.get("samples_ingested") == rows
    assert not {k: v for k, v in counters.items() if k.startswith("rejected:")}
    assert counters.get("batches_duplicate", 0) == 0
    compact_model(store, "load")
    window = window_stats(store, "load", "1h", 3600).stats
    assert window is not None
    assert window.sample_count == rows
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text
        assert "ERROR" not in text
    assert all(w.poll() is None for w in workers)

    first, second = samples[: len(samples) // 2], samples[len(samples) // 2 :]
    rss_first, rss_second = max(s[1] for s in first), max(s[1] for s in second)
    mem_first, mem_second = max(s[2] for s in first), max(s[2] for s in second)
    latencies = [ingested[b] - submitted[b] for b in submitted]
    report = {
        "seconds": round(sent_for, 1),
        "batches": count,
        "rows_per_batch": LOAD_ROWS,
        "dim": 64,
        "throughput_batches_per_s": round(count / drained, 1),
        "throughput_rows_per_s": round(rows / drained),
        "latency_ms": {
            q: round(1000 * _percentile(latencies, p), 1)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },
        "worker_rss_mib": [round(rss_first / 2**20, 1), round(rss_second / 2**20, 1)],
        "redis_used_memory_mib": [round(mem_first / 2**20, 2), round(mem_second / 2**20, 2)],
    }
    print("LOAD " + json.dumps(report))
    assert rss_second <= 1.2 * rss_first, report
    assert mem_second <= 1.2 * mem_first, report
