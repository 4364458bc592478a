"""Decayed window mode end to end: real `collapse-monitor worker` processes configured by the
environment (COLLAPSE_WINDOW_MODE=decayed) ingest and compact on a real Redis; the windows they
write are decayed states that read back as the data sent (all of it in one fine bucket, so every
sample weighs the same and the presented statistics are exactly the plain ones)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from servers import RedisServer, service_env, start_worker, wait_for, worker_ready
from test_pipeline_redis import MODELS, assert_same_stats, batches, reference

from monitor.config import Settings
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.queues import TASK_COMPACT
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import window_stats
from monitor.stats.decayed import is_decayed
from monitor.stats.fields import GLOBAL_FIELD
from monitor.store.base import bucket_state, window_state
from monitor.worker.app import create_app

pytestmark = pytest.mark.slow

WINDOWS = {"15m": 900, "1h": 3600}


def test_workers_in_decayed_mode_write_decayed_windows_equal_to_the_data(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = service_env(
        redis_server.url,
        json.dumps(MODELS),
        COLLAPSE_WINDOW_MODE="decayed",
        COLLAPSE_WINDOWS=json.dumps(WINDOWS),
    )
    log = tmp_path / "worker.log"
    processes.append(start_worker(env, log, queues="ingest,maintenance"))
    wait_for(lambda: worker_ready(log), 60, "celery worker")

    settings = Settings(
        redis_url=redis_server.url, models=MODELS, windows=WINDOWS, window_mode="decayed"
    )  # type: ignore[arg-type]
    runtime = Runtime(settings)
    client = MonitorClient(settings)
    data = batches(8, 300, seed=5)
    ts = time.time()  # one time for every batch: one fine bucket, equal weights
    for i, (x, y) in enumerate(data):
        client.submit_features("m", x, y, batch_id=f"d-{i}", ts=ts)
    store = runtime.store
    wait_for(lambda: store.counters("m").get("batches_ingested", 0) == len(data), 60, "ingest")
    create_app(settings).send_task(TASK_COMPACT)
    wait_for(lambda: store.pending_count("m") == 0, 60, "compaction by the worker")

    for label, seconds in WINDOWS.items():
        blob = store.state_field("m", window_state(label), GLOBAL_FIELD)
        assert blob is not None, label
        assert is_decayed(blob), label
        current = window_stats(store, "m", label, seconds).stats
        assert current is not None
        assert_same_stats(current, reference(data))
    fine = store.policy.start("fine", ts)
    assert store.state_size("m", bucket_state("fine", fine)) == 1  # globals only
    assert "Traceback" not in log.read_text(errors="replace")
