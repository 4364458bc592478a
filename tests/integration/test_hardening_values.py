"""Hostile values and timestamps through real processes (issue 16: items 1, 2 and 6).

An attacker with a valid token once poisoned a model for good with finite float64 features
beyond float32 (the RFF step made them inf, then NaN in the sums, and a first batch fixed the
bandwidth at inf), parked samples in every window with a `ts` a year ahead, had stale ones
counted as ingested and dropped, stalled compaction with an embed task at `ts = inf`, burned a
batch id with `ts = NaN`, got a 500 for `nc4.total = 2**64`, and overflowed a rejection counter
with a declared shape of 2**63. Each attack here goes through a real redis-server and a real
`collapse-monitor worker` (the API through its app in queue mode, the baseline import through
the CLI), and each must be refused with its reason, counted once with the rows it really
carried, and leave every stored key but the counters byte-identical, other models and later
good batches untouched, and the RFF bandwidth finite.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from celery import Celery
from fastapi.testclient import TestClient
from servers import ROOT, RedisServer, service_env, start_worker, wait_for
from test_bad_input import stored_state
from test_pipeline_redis import DIM, VOCAB, batches

from monitor.api.app import create_api
from monitor.config import Settings
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.queues import TASK_EMBED, TASK_INGEST
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats, median_bandwidth
from monitor.worker.app import create_app

MODELS = [{"name": n, "vocab_size": VOCAB, "dim": DIM} for n in ("a", "b")]
TOKEN = "hardening-token-0123456789abcdef"


def start(
    server: RedisServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    models: list[dict[str, Any]] = MODELS,
    queues: str = "ingest",
) -> tuple[Runtime, Celery, Path]:
    """A real worker on `queues`, with this process's runtime and Celery app beside it."""
    log = tmp_path / "worker.log"
    processes.append(start_worker(service_env(server.url, json.dumps(models)), log, queues))
    wait_for(lambda: "ready." in log.read_text(errors="replace"), 90, "celery worker")
    settings = Settings(redis_url=server.url, models=models, api_token=TOKEN)  # type: ignore[arg-type]
    return Runtime(settings), create_app(settings), log


def refused_by_worker(
    app: Celery,
    runtime: Runtime,
    server: RedisServer,
    task: str,
    payload: dict[str, Any],
    reason: str,
    rows: int,
) -> None:
    """Send a bad task; it is counted once under `reason` with `rows`, and nothing else moves."""
    owner = str(payload["model"])
    key = f"rejected:{reason}"
    before, counted = stored_state(server), runtime.store.counters(owner).get(key, 0)
    app.send_task(task, args=[payload])
    wait_for(lambda: runtime.store.counters(owner).get(key, 0) >= counted + rows, 60, key)
    wait_for(lambda: server.client().hlen("unacked") == 0, 10, "task acknowledged")
    assert runtime.store.counters(owner).get(key, 0) == counted + rows
    assert stored_state(server) == before


def in_process(runtime: Runtime, model: str, data: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """The statistics the store must hold: the same data through an in-process CollapseStats."""
    rff = runtime.registry.rff(model, runtime.store, torch.from_numpy(data[0][0]))
    want = CollapseStats(VOCAB, DIM, rff=rff)
    for x, y in data:
        want.update(x, y)
    return want


def assert_window_is(runtime: Runtime, model: str, want: CollapseStats, window: str) -> None:
    seconds = runtime.settings.windows[window]
    got = window_stats(runtime.store, model, window, seconds).stats
    assert got is not None
    assert got.sample_count == want.sample_count
    a, b = got.classes(), want.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=0)
    assert got.rff_sum is not None
    assert bool(torch.isfinite(got.rff_sum).all())
    assert want.rff_sum is not None
    torch.testing.assert_close(got.rff_sum, want.rff_sum, rtol=1e-9, atol=1e-9)


def finished_cleanly(log: Path, worker: subprocess.Popen[bytes]) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "raised unexpected" not in text
    assert worker.poll() is None


def test_values_beyond_float32_never_poison_a_model(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    runtime, app, log = start(redis_server, tmp_path, processes)
    rows = np.arange(8) % VOCAB
    # As model a's very first batch: refused before it could propose the kernel bandwidth.
    for x, reason in (
        (np.full((8, DIM), 1e39), "value_out_of_range"),
        (np.where(np.arange(8)[:, None] % 3 == 0, -1e300, 1.0) * np.ones((8, DIM)), None),
        (np.where(np.eye(8, DIM) > 0, np.nan, 1.0), "non_finite"),
    ):
        payload = encode_batch("a", x, rows, batch_id=f"poison-{len(x)}-{reason}")
        refused_by_worker(
            app, runtime, redis_server, TASK_INGEST, payload, reason or "value_out_of_range", 8
        )
    assert runtime.store.meta("a") == {}  # no bandwidth was proposed from the poison
    assert runtime.store.counters("a") == {
        "rejected:value_out_of_range": 16,
        "rejected:non_finite": 8,
    }

    good_a = batches(2, 40, seed=21)
    good_b = batches(1, 40, seed=22)
    # Model b: a float32 batch at 3e38 is in range, and its random features stay finite (the
    # float32 projection overflows; those rows are projected again in float64).
    huge = (np.full((8, DIM), 3e38, np.float32), rows)
    app.send_task(TASK_INGEST, args=[encode_batch("a", *good_a[0], batch_id="a-0")])
    app.send_task(TASK_INGEST, args=[encode_batch("b", *good_b[0], batch_id="b-0")])
    wait_for(lambda: runtime.store.pending_count("b") == 1, 60, "b's first batch")
    app.send_task(TASK_INGEST, args=[encode_batch("b", *huge, batch_id="b-huge")])
    app.send_task(TASK_INGEST, args=[encode_batch("a", *good_a[1], batch_id="a-1")])
    wait_for(
        lambda: runtime.store.pending_count("a") + runtime.store.pending_count("b") == 4, 60, "good"
    )

    bandwidth = float(runtime.store.meta("a")["rff_bandwidth"])
    assert bandwidth == median_bandwidth(torch.from_numpy(good_a[0][0]).to(torch.float64))
    assert math.isfinite(float(runtime.store.meta("b")["rff_bandwidth"]))
    for model in ("a", "b"):
        assert compact_model(runtime.store, model).partials == 2
        assert runtime.store.pending_count(model) == 0
    assert_window_is(runtime, "a", in_process(runtime, "a", good_a), "15m")
    assert_window_is(runtime, "b", in_process(runtime, "b", [good_b[0], huge]), "15m")
    finished_cleanly(log, processes[0])


def test_timestamps_outside_the_windows_are_refused_and_counted(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    runtime, app, log = start(redis_server, tmp_path, processes)
    (x, y), (x2, y2), (x3, y3) = batches(3, 12, seed=31)
    now = time.time()
    for i, (ts, reason) in enumerate(
        (
            (now + 3600, "future_timestamp"),  # a year ahead would do the same
            (1e300, "future_timestamp"),
            (now - 2 * 86400, "stale_timestamp"),  # older than the 24h window's first bucket
            (0.0, "stale_timestamp"),
        )
    ):
        payload = encode_batch("a", x, y, batch_id=f"ts-{i}", ts=ts)
        refused_by_worker(app, runtime, redis_server, TASK_INGEST, payload, reason, 12)
    # The same id is still free (a refusal writes no seen marker); in-range times are stored.
    app.send_task(TASK_INGEST, args=[encode_batch("a", x, y, batch_id="ts-0", ts=now + 100)])
    app.send_task(TASK_INGEST, args=[encode_batch("a", x2, y2, batch_id="old", ts=now - 20 * 3600)])
    app.send_task(TASK_INGEST, args=[encode_batch("b", x3, y3, batch_id="b", ts=now)])
    wait_for(lambda: runtime.store.counters("a").get("batches_ingested") == 2, 60, "in range")
    wait_for(lambda: runtime.store.pending_count("b") == 1, 60, "model b")
    for model in ("a", "b"):
        compact_model(runtime.store, model)
    counters = runtime.store.counters("a")
    assert counters == {
        "rejected:future_timestamp": 24,
        "rejected:stale_timestamp": 24,
        "batches_ingested": 2,
        "samples_ingested": 24,
    }
    # Every sample counted as ingested is in the 24h window; the 1h window holds the recent one.
    assert_window_is(runtime, "a", in_process(runtime, "a", [(x, y), (x2, y2)]), "24h")
    assert_window_is(runtime, "a", in_process(runtime, "a", [(x, y)]), "1h")
    assert_window_is(runtime, "b", in_process(runtime, "b", [(x3, y3)]), "15m")
    finished_cleanly(log, processes[0])


def _array(a: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": a.dtype.name,
        "shape": list(a.shape),
        "data": base64.b64encode(a.tobytes()).decode(),
    }


def test_api_refuses_poison_with_bounded_counts(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The HTTP API in queue mode, in front of a real broker and worker."""
    runtime, _, log = start(redis_server, tmp_path, processes)
    client = TestClient(create_api(runtime.settings, Runtime(runtime.settings)))
    headers = {"authorization": f"Bearer {TOKEN}"}
    url = "/v1/models/a/samples"
    x, y = batches(1, 4, seed=41)[0]
    labels = y.astype(np.int32)
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"features": _array(x), "labels": _array(labels), "nc4": {"hits": 0, "total": 2**64}},
            "malformed_payload",
        ),
        (
            {"features": _array(x), "labels": _array(labels), "nc4": {"hits": 1, "total": 5}},
            "malformed_payload",
        ),
        (
            {"features": _array(np.full((4, DIM), 1e39)), "labels": _array(labels)},
            "value_out_of_range",
        ),
    ]
    declared = {**_array(labels), "shape": [2**63 - 1]}  # 16 bytes that claim 9e18 rows
    cases += [({"features": _array(x), "labels": declared}, "length_mismatch")] * 3
    cases += [({"features": _array(x), "labels": declared, "extra": 1}, "malformed_payload")] * 3
    before = stored_state(redis_server)
    for body, reason in cases:
        response = client.post(url, json=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["reason"] == reason
    assert runtime.store.counters("a") == {
        "rejected:malformed_payload": 4 * 5,  # four bodies of 4 real rows each, never 9e18
        "rejected:value_out_of_range": 4,
        "rejected:length_mismatch": 4 * 3,
    }
    assert stored_state(redis_server) == before
    # A time far ahead is refused at the door with the worker's own reason, counted once.
    response = client.post(
        url, json={"features": _array(x), "labels": _array(labels), "ts": 1e300}, headers=headers
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == "future_timestamp"
    wait_for(
        lambda: runtime.store.counters("a").get("rejected:future_timestamp") == 4, 60, "worker"
    )
    response = client.post(
        url,
        json={"features": _array(x), "labels": _array(labels), "batch_id": "good"},
        headers=headers,
    )
    assert response.status_code == 202
    wait_for(lambda: runtime.store.pending_count("a") == 1, 60, "good batch")
    compact_model(runtime.store, "a")
    assert_window_is(runtime, "a", in_process(runtime, "a", [(x, labels)]), "15m")
    finished_cleanly(log, processes[0])


def test_baseline_import_of_poisoned_features_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`baseline pin --features`: a float64 file beyond float32 pins nothing and, as the first
    data the model sees, fixes no bandwidth; after good data, the bandwidth stays that data's."""
    good = batches(1, 64, seed=51)[0][0].astype(np.float64)
    poison = np.full((16, DIM), 1e39)
    runtime = Runtime(Settings(redis_url=redis_server.url, models=MODELS))  # type: ignore[arg-type]
    for name, x in (
        ("first", np.concatenate([poison, good])),
        ("last", np.concatenate([good, poison])),
    ):
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", np.arange(len(x)) % VOCAB)
        done = subprocess.run(
            [sys.executable, "-m", "monitor.cli", "baseline", "pin", "--model", "a", "--name",
             name, "--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")],
            env=service_env(redis_server.url, json.dumps(MODELS)),
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "exceed the float32 range" in done.stderr
        assert "Traceback" not in done.stderr
        assert runtime.store.baseline("a", name) is None
        if name == "first":
            assert "rff_bandwidth" not in runtime.store.meta("a")
    bandwidth = float(runtime.store.meta("a")["rff_bandwidth"])
    assert bandwidth == median_bandwidth(torch.from_numpy(good[:5]))  # the CLI's first slice


@pytest.mark.slow
def test_embed_task_timestamps_and_token_ids(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """ts = inf once stalled compaction for good; ts = NaN left an orphan partial and burned
    its batch id. Both are refused before any key is written, and the id stays usable."""
    from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        vocab_size=300, n_embd=32, n_layer=1, n_head=2, max_steps=3, max_seconds=30
    )
    checkpoint = build_tiny_model(tmp_path / "tiny", spec)
    models = [{"name": "tiny", "checkpoint": str(checkpoint)}]
    runtime, app, log = start(redis_server, tmp_path, processes, models, queues="embed")
    ids = [[1, 2, 3, 4, 5], [6, 7, 8]]
    now = time.time()
    for ts, reason in (
        (math.inf, "malformed_payload"),
        (math.nan, "malformed_payload"),
        (now + 3600, "future_timestamp"),
        (now - 3 * 86400, "stale_timestamp"),
    ):
        payload = {"v": 1, "model": "tiny", "batch_id": "id-1", "ts": ts, "token_ids": ids}
        refused_by_worker(app, runtime, redis_server, TASK_EMBED, payload, reason, 2)
    payload = {"v": 1, "model": "tiny", "batch_id": "id-1", "token_ids": [[1, 2, 300]]}
    refused_by_worker(app, runtime, redis_server, TASK_EMBED, payload, "token_out_of_range", 1)
    assert redis_server.client().keys("cm:{tiny}:seen:*") == []
    app.send_task(
        TASK_EMBED,
        args=[{"v": 1, "model": "tiny", "batch_id": "id-1", "ts": now, "token_ids": ids}],
    )
    wait_for(lambda: runtime.store.pending_count("tiny") == 1, 120, "embedded batch")
    assert compact_model(runtime.store, "tiny").partials == 1
    got = window_stats(runtime.store, "tiny", "15m", 900).stats
    assert got is not None
    assert got.sample_count == 4 + 2  # next-token positions of the two sequences
    assert math.isfinite(float(runtime.store.meta("tiny")["rff_bandwidth"]))
    finished_cleanly(log, processes[0])


def test_the_stored_bandwidth_is_always_one_the_map_can_use(redis_server: RedisServer) -> None:
    """A proposal outside the float32 map's range is clamped into it; a bandwidth an older
    release stored from a poisoned batch is refused with what to do, never used."""
    from monitor.pipeline.registry import MEDIAN_RANGE, InvalidStoredBandwidth

    runtime = Runtime(Settings(redis_url=redis_server.url, models=MODELS))  # type: ignore[arg-type]
    spread = np.zeros((4, DIM), np.float32)
    spread[:, 0] = [0.0, 1e35, -1e35, 2e35]  # in range, but a median distance of ~1e35
    runtime.ingestor.ingest(encode_batch("a", spread, np.arange(4), batch_id="wide"))
    assert float(runtime.store.meta("a")["rff_bandwidth"]) == MEDIAN_RANGE[1]
    compact_model(runtime.store, "a")
    got = window_stats(runtime.store, "a", "15m", 900).stats
    assert got is not None
    assert got.rff_sum is not None
    assert bool(torch.isfinite(got.rff_sum).all())

    for i, stored in enumerate(("inf", "nan", "4e+39", "0.0", "-1.0", "oops")):
        redis_server.client().hset("cm:{b}:meta", "rff_bandwidth", stored)
        fresh = Runtime(Settings(redis_url=redis_server.url, models=MODELS))  # type: ignore[arg-type]
        x, y = batches(1, 10, seed=61)[0]
        with pytest.raises(InvalidStoredBandwidth, match="delete the field rff_bandwidth"):
            fresh.ingestor.ingest(encode_batch("b", x, y, batch_id=f"after-{i}"))
        assert fresh.store.pending_count("b") == 0
