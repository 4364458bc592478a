"""Real `collapse-monitor worker` processes on a real Redis broker: exactly once under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from servers import RedisServer, service_env, start_worker, wait_for, worker_ready
from test_pipeline_redis import DIM, MODELS, VOCAB, assert_same_stats, batches, reference

from monitor.config import Settings
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats

pytestmark = pytest.mark.slow

VISIBILITY = 3  # seconds before a dead worker's unacknowledged task is redelivered


def _ingested(runtime: Runtime) -> int:
    return runtime.store.counters("m").get("batches_ingested", 0)


def _pool_children(pid: int) -> list[int]:
    """Process ids of the Celery pool processes under a worker's main process."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.parametrize("target", ["worker", "pool child"])
def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(
    redis_server: RedisServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    target: str,
) -> None:
    env = service_env(
        redis_server.url, json.dumps(MODELS), COLLAPSE_TASK_VISIBILITY_TIMEOUT=str(VISIBILITY)
    )
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    victim, survivor = (start_worker(env, log) for log in logs)
    processes += [victim, survivor]
    for log in logs:
        wait_for(lambda log=log: worker_ready(log), 60, f"celery worker ({log.name})")

    settings = Settings(
        redis_url=redis_server.url, models=MODELS, task_visibility_timeout=VISIBILITY
    )  # type: ignore[arg-type]
    runtime = Runtime(settings)
    client = MonitorClient(settings)
    data = batches(60, 4000, seed=11)  # big enough that tasks take a while each
    for i, (x, y) in enumerate(data):
        client.submit_features("m", x, y, batch_id=f"kill-{i}")

    wait_for(lambda: _ingested(runtime) >= 5, 60, "first batches ingested")
    # Kill when both workers hold an unacknowledged task: the victim dies mid-task.
    broker = redis_server.client()
    children = _pool_children(victim.pid)
    assert children, "the worker has no pool process"
    wait_for(lambda: broker.hlen("unacked") == 2, 30, "both workers busy", interval=0.005)
    if target == "worker":
        os.killpg(victim.pid, signal.SIGKILL)
    else:  # the pool process dies mid-task; its parent lives on and starts another
        os.kill(children[0], signal.SIGKILL)
    done_before_kill = _ingested(runtime)
    if target == "worker":
        victim.wait(timeout=10)
    assert done_before_kill < len(data), "the stream finished before the kill: make it longer"

    wait_for(lambda: _ingested(runtime) == len(data), 120, "every batch ingested", interval=0.5)
    time.sleep(VISIBILITY + 1)  # a late redelivery, if any, would show up as a duplicate
    counters = runtime.store.counters("m")
    assert counters["batches_ingested"] == len(data)
    assert counters["samples_ingested"] == sum(len(y) for _, y in data)

    compact_model(runtime.store, "m")
    current = window_stats(runtime.store, "m", "1h", 3600).stats
    assert current is not None
    assert_same_stats(current, reference(data))
    assert survivor.poll() is None, "the surviving worker died"
    if target == "pool child":
        assert victim.poll() is None, "the worker died with its pool process"
    assert broker.hlen("unacked") == 0, "a task is still unacknowledged"


def test_bad_batch_is_counted_once_and_not_redelivered(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = service_env(redis_server.url, json.dumps(MODELS))
    log = tmp_path / "worker.log"
    processes.append(start_worker(env, log))
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    settings = Settings(redis_url=redis_server.url, models=MODELS)  # type: ignore[arg-type]
    runtime = Runtime(settings)
    client = MonitorClient(settings)
    x = np.ones((10, DIM), dtype=np.float32)
    x[3, 2] = np.nan
    client.submit_features("m", x, np.arange(10) % VOCAB, batch_id="bad")
    client.submit_features("m", np.ones((5, DIM + 1), np.float32), np.arange(5), batch_id="wide")
    good_x, good_y = batches(1, 50, seed=3)[0]
    client.submit_features("m", good_x, good_y, batch_id="good")
    wait_for(lambda: _ingested(runtime) == 1, 60, "good batch ingested")
    time.sleep(1.0)
    counters = runtime.store.counters("m")
    assert counters["rejected:non_finite"] == 10
    assert counters["rejected:wrong_dimension"] == 5
    assert runtime.store.pending_count("m") == 1
