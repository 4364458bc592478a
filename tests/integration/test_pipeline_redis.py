"""The Redis store and pipeline against a real redis-server: exactly once, AOF restart, races."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import torch
from servers import RedisServer

from monitor.config import Settings
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import ALGEBRA, compact_model, maintain_model, window_stats
from monitor.stats import CollapseStats
from monitor.stats.fields import from_fields, to_fields
from monitor.store.redis_store import RedisStore

VOCAB, DIM = 300, 16
MODELS = [{"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True}]


def settings_for(server: RedisServer, **extra: object) -> Settings:
    return Settings(redis_url=server.url, models=MODELS, **extra)  # type: ignore[arg-type]


def batches(count: int, rows: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(VOCAB, DIM))
    out = []
    for _ in range(count):
        y = rng.integers(0, VOCAB, rows)
        x = (means[y] + 0.3 * rng.normal(size=(rows, DIM))).astype(np.float32)
        out.append((x, y))
    return out


def reference(data: list[tuple[np.ndarray, np.ndarray]]) -> CollapseStats:
    ref = CollapseStats(VOCAB, DIM, second_moment=True)
    for x, y in data:
        ref.update(x, y)
    return ref


def assert_same_stats(got: CollapseStats, want: CollapseStats) -> None:
    assert got.sample_count == want.sample_count
    a, b = got.classes(), want.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.sq_norms, b.sq_norms, rtol=1e-9, atol=1e-9)
    assert got.second is not None
    assert want.second is not None
    torch.testing.assert_close(got.second, want.second, rtol=1e-9, atol=1e-9)


def ingest_all(
    runtime: Runtime, data: list[tuple[np.ndarray, np.ndarray]], ts: float, first: int = 0
) -> None:
    for i, (x, y) in enumerate(data, start=first):
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=f"b{i}", ts=ts))


def test_redelivered_batch_counts_once_even_after_compaction(redis_server: RedisServer) -> None:
    runtime = Runtime(settings_for(redis_server))
    data = batches(3, 50)
    now = time.time()
    ingest_all(runtime, data, now)
    compact_model(runtime.store, "m")
    assert runtime.store.pending_count("m") == 0
    ingest_all(runtime, data, now)  # every task delivered a second time, after compaction
    assert runtime.store.pending_count("m") == 0
    assert runtime.store.counters("m")["batches_duplicate"] == 3
    current = window_stats(runtime.store, "m", "1h", 3600).stats
    assert current is not None
    assert_same_stats(current, reference(data))


def test_compacted_data_survives_redis_sigkill_with_aof(redis_server: RedisServer) -> None:
    runtime = Runtime(settings_for(redis_server))
    data = batches(6, 80, seed=1)
    now = time.time()
    ingest_all(runtime, data[:4], now)
    compact_model(runtime.store, "m")
    ingest_all(runtime, data[4:], now, first=4)  # left pending: must survive too
    redis_server.kill()
    redis_server.start()
    runtime = Runtime(settings_for(redis_server))
    assert runtime.store.pending_count("m") == 2
    compact_model(runtime.store, "m")
    current = window_stats(runtime.store, "m", "15m", 900).stats
    assert current is not None
    assert_same_stats(current, reference(data))


def _compact_in_child(url: str, rounds: int) -> int:
    runtime = Runtime(Settings(redis_url=url, models=MODELS))  # type: ignore[arg-type]
    return compact_model(runtime.store, "m", rounds=rounds).partials


def test_concurrent_compaction_equals_one(redis_server: RedisServer) -> None:
    runtime = Runtime(settings_for(redis_server))
    data = batches(120, 20, seed=2)
    now = time.time()
    for i, (x, y) in enumerate(data):
        # Spread over three fine buckets so the racers contend for several keys.
        ts = now - (i % 3) * runtime.store.policy.fine_seconds
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=f"c{i}", ts=ts))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        merged = pool.starmap(_compact_in_child, [(redis_server.url, 64)] * 2)
    assert sum(merged) == len(data)  # each partial merged by exactly one of the two
    assert runtime.store.pending_count("m") == 0
    current = window_stats(runtime.store, "m", "1h", 3600).stats
    assert current is not None
    assert_same_stats(current, reference(data))


def test_compaction_merges_partials_into_fine_and_coarse_buckets(
    redis_server: RedisServer,
) -> None:
    runtime = Runtime(settings_for(redis_server))
    store = runtime.store
    assert isinstance(store, RedisStore)
    now = time.time()
    data = batches(4, 30, seed=3)
    old = now - 2 * 3600  # outside 1h, inside 24h
    runtime.ingestor.ingest(encode_batch("m", *data[0], batch_id="old", ts=old))
    for i, (x, y) in enumerate(data[1:]):
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=f"new{i}", ts=now))
    compact_model(store, "m")
    hour = window_stats(store, "m", "1h", 3600, now=now).stats
    day = window_stats(store, "m", "24h", 86400, now=now).stats
    assert hour is not None
    assert day is not None
    assert_same_stats(hour, reference(data[1:]))
    assert_same_stats(day, reference(data))
    assert store.memory_bytes("m") > 0
    # Maintenance (run by every window read) dropped the old batch's fine bucket (past the 1 h
    # fine retention) and nothing else: the 24 h window reads coarse buckets and is unchanged.
    assert maintain_model(store, "m", now).dropped == 0
    assert store.bucket_starts("m", "fine") == [store.policy.start("fine", now)]
    day_after = window_stats(store, "m", "24h", 86400, now=now).stats
    assert day_after is not None
    assert_same_stats(day_after, reference(data))
    coarse = {store.policy.start("coarse", t) for t in (old, now)}  # one or two (3 h buckets)
    assert maintain_model(store, "m", now + 3 * 86400).dropped == 1 + len(coarse)
    assert window_stats(store, "m", "24h", 86400, now=now).stats is None


def test_merged_fields_are_the_sum() -> None:
    data = batches(3, 40, seed=4)
    parts = []
    for x, y in data:
        s = CollapseStats(VOCAB, DIM, second_moment=True)
        s.update(x, y)
        parts.append(to_fields(s))
    assert_same_stats(from_fields(ALGEBRA.merge_all(parts)), reference(data))


@pytest.mark.parametrize("replace", [False, True])
def test_baselines_round_trip_and_refuse_mismatch(redis_server: RedisServer, replace: bool) -> None:
    from monitor.errors import IncompatibleStats
    from monitor.pipeline.baselines import load_baseline, pin_window
    from monitor.store.base import BaselineExists

    runtime = Runtime(settings_for(redis_server))
    data = batches(2, 60, seed=5)
    ingest_all(runtime, data, time.time())
    compact_model(runtime.store, "m")
    pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600)
    if replace:
        pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600, replace=True)
    else:
        with pytest.raises(BaselineExists):
            pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600)
    stats, meta = load_baseline(runtime.store, runtime.registry, "m", "ref")
    assert meta["dim"] == DIM
    assert_same_stats(stats, reference(data))
    assert list(runtime.store.baselines("m")) == ["ref"]
    # The same store read by a deployment whose model now has another width: refused.
    wider = Settings(
        redis_url=redis_server.url, models=[{"name": "m", "vocab_size": VOCAB, "dim": DIM + 1}]
    )
    other = Runtime(wider)
    with pytest.raises(IncompatibleStats, match="dim"):
        load_baseline(other.store, other.registry, "m", "ref")
    assert runtime.store.unpin_baseline("m", "ref")
    assert runtime.store.baselines("m") == {}
