"""The split store at LLM widths and over time, against a real redis-server.

- No value Redis holds exceeds 64 MB at d = 8,192 with thousands of touched classes, proven by
  lowering Redis's own `proto-max-bulk-len` to 64 MB: any larger value would be refused.
- A window equals a float64 brute force over the raw samples of its span while time advances,
  data arrives late and buckets slide out (add, subtract, rebuild).
- Statistics of the old one-blob format are refused with a one-line error saying what to do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from typing import Any, cast

import numpy as np
import pytest
import redis
import torch
from servers import RedisServer, wait_for

from monitor.config import Settings
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import (
    ALGEBRA,
    compact_model,
    maintain_model,
    read_state,
    window_stats,
)
from monitor.stats import CollapseStats
from monitor.stats.fields import MAX_VALUE_BYTES, to_fields
from monitor.store.base import BucketPolicy, LegacyStoreFormat, window_state
from monitor.store.redis_store import RedisStore

T0 = 1_800_000_000.0


def largest_value(client: redis.Redis) -> int:
    """The largest single value (string, or hash field) Redis holds, in bytes."""
    largest = 0
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            largest = max(largest, int(client.strlen(key)))
        elif kind == b"hash":
            for field in cast(list[bytes], client.hkeys(key)):
                largest = max(largest, int(client.hstrlen(key, field)))
    return largest


@pytest.mark.slow
def test_no_value_above_64_mb_at_width_8192(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.config_set("proto-max-bulk-len", str(MAX_VALUE_BYTES))  # Redis refuses larger values
    vocab, dim, per_batch, batches = 128_256, 8192, 1000, 3
    settings = Settings(
        redis_url=redis_server.url,
        models=[{"name": "big", "vocab_size": vocab, "dim": dim}],  # type: ignore[list-item]
        windows={"15m": 900},
    )
    runtime = Runtime(settings)
    rng = np.random.default_rng(0)
    labels = rng.permutation(vocab)[: per_batch * batches]
    for i in range(batches):
        y = labels[i * per_batch : (i + 1) * per_batch]
        x = rng.normal(size=(per_batch, dim)).astype(np.float16)
        runtime.ingestor.ingest(encode_batch("big", x, y, batch_id=f"b{i}", ts=T0), now=T0)
    compact_model(runtime.store, "big")
    maintain_model(runtime.store, "big", T0 + 1)
    largest = largest_value(client)
    assert 0 < largest <= MAX_VALUE_BYTES
    current = window_stats(runtime.store, "big", "15m", 900, now=T0 + 1).stats
    assert current is not None
    assert current.sample_count == per_batch * batches
    assert current.touched_classes == per_batch * batches  # one class per sample, all distinct


VOCAB, DIM = 40, 6


def test_window_equals_brute_force_over_its_span(redis_server: RedisServer) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        models=[{"name": "m", "vocab_size": VOCAB, "dim": DIM}],  # type: ignore[list-item]
        bucket_seconds=60,
        coarse_bucket_seconds=600,
        fine_retention_seconds=600,
        windows={"3m": 180, "10m": 600, "1h": 3600},
    )
    runtime = Runtime(settings)
    store = runtime.store
    policy = store.policy
    rng = np.random.default_rng(3)
    means = rng.normal(scale=20.0, size=(VOCAB, DIM))  # ||mu|| >> sigma: cancellation bites
    raw: list[tuple[float, np.ndarray, np.ndarray]] = []
    now = T0
    for step in range(30):
        now += float(rng.choice([20.0, 45.0, 130.0]))
        for i in range(int(rng.integers(1, 3))):
            ts = now - float(rng.choice([0.0, 0.0, 70.0, 400.0]))  # some arrive late
            y = rng.integers(0, VOCAB, 25)
            x = means[y] + rng.normal(size=(25, DIM))
            payload = encode_batch("m", x, y, batch_id=f"s{step}.{i}", ts=ts)
            runtime.ingestor.ingest(payload, now=now)
            raw.append((ts, x, y))
        compact_model(store, "m")
        for label, seconds in settings.windows.items():
            got = window_stats(store, "m", label, seconds, now=now).stats
            level = policy.level_for(seconds)
            since = policy.window_since(seconds, now)
            inside = [(x, y) for ts, x, y in raw if policy.start(level, ts) >= since]
            if not inside:
                assert got is None
                continue
            assert got is not None
            x_all = np.concatenate([x for x, _ in inside])
            y_all = np.concatenate([y for _, y in inside])
            rows = got.classes()
            assert got.sample_count == len(y_all)
            for pos, c in enumerate(rows.class_ids.tolist()):
                members = x_all[y_all == c]
                assert int(rows.counts[pos]) == len(members)
                want_sum = members.sum(axis=0)
                want_sq = float((members * members).sum())
                torch.testing.assert_close(
                    rows.sums[pos], torch.from_numpy(want_sum), rtol=1e-9, atol=1e-9
                )
                assert float(rows.sq_norms[pos]) == pytest.approx(want_sq, rel=1e-12)
            assert set(rows.class_ids.tolist()) == {int(c) for c in np.unique(y_all)}


def test_old_store_format_is_refused_with_what_to_do(redis_server: RedisServer) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        models=[{"name": "m", "vocab_size": VOCAB, "dim": DIM}],  # type: ignore[list-item]
    )
    runtime = Runtime(settings)
    client = cast(Any, runtime.store).client
    client.zadd("cm:{m}:buckets:fine", {"1800000000": 1800000000})
    with pytest.raises(LegacyStoreFormat, match="collapse-monitor store migrate"):
        compact_model(runtime.store, "m")
    with pytest.raises(LegacyStoreFormat):
        maintain_model(runtime.store, "m")


def test_migration_keeps_baselines_buckets_and_pending_batches(redis_server: RedisServer) -> None:
    """Data laid out as release 0.1 wrote it is converted, then read as before."""
    from monitor.pipeline.baselines import load_baseline, stats_options_hash
    from monitor.pipeline.migrate import migrate_model

    settings = Settings(
        redis_url=redis_server.url,
        models=[{"name": "m", "vocab_size": VOCAB, "dim": DIM}],  # type: ignore[list-item]
    )
    runtime = Runtime(settings)
    store = runtime.store
    assert isinstance(store, RedisStore)
    client, policy = store.client, store.policy
    rng = np.random.default_rng(5)

    def stats_of(rows: int) -> tuple[CollapseStats, np.ndarray, np.ndarray]:
        y = rng.integers(0, VOCAB, rows)
        x = rng.normal(size=(rows, DIM))
        s = CollapseStats(VOCAB, DIM)
        s.update(x, y)
        return s, x, y

    now = T0
    base, _, _ = stats_of(50)
    client.set("cm:{m}:baseline:ref", base.to_bytes())
    stamp = {
        "model": "m",
        "vocab_size": VOCAB,
        "dim": DIM,
        "settings_hash": stats_options_hash(runtime.registry.shape("m")),
    }
    client.hset("cm:{m}:baselines", "ref", json.dumps(stamp))
    bucket, bx, by = stats_of(30)
    for level in ("fine", "coarse"):
        start = policy.start(level, now)
        client.set(f"cm:{{m}}:bucket:{level}:{start}", bucket.to_bytes())
        client.zadd(f"cm:{{m}}:buckets:{level}", {str(start): start})
    partial, px, py = stats_of(20)
    client.set("cm:{m}:partial:p1", partial.to_bytes(), ex=3600)
    client.zadd("cm:{m}:pending", {"p1": now})
    with pytest.raises(LegacyStoreFormat):
        compact_model(store, "m")

    result = migrate_model(store, "m")
    assert (result.baselines, result.buckets, result.partials) == (1, 2, 1)
    assert migrate_model(store, "m").buckets == 0  # a second run finds nothing left to do
    compact_model(store, "m")
    current = window_stats(store, "m", "15m", 900, now=now + 1).stats
    assert current is not None
    want = CollapseStats(VOCAB, DIM)
    want.update(np.concatenate([bx, px]), np.concatenate([by, py]))
    assert current.sample_count == want.sample_count == 50
    torch.testing.assert_close(current.classes().sums, want.classes().sums, rtol=1e-12, atol=0)
    pinned, meta = load_baseline(store, runtime.registry, "m", "ref")
    assert meta["store_format"] == 2
    assert pinned.sample_count == base.sample_count
    torch.testing.assert_close(pinned.classes().sums, base.classes().sums, rtol=0, atol=0)


FAST = BucketPolicy(
    fine_seconds=10,
    coarse_seconds=100,
    fine_retention=1000,
    coarse_retention=1000,
    windows=(("15m", 900),),
    lock_seconds=1.0,
)


def _maintain_in_child(url: str, now: float) -> None:
    store = RedisStore(redis.Redis.from_url(url), FAST, prefix="k")
    store.maintain("m", ALGEBRA, now)


@pytest.mark.slow
def test_sigkill_during_a_slide_leaves_a_window_that_is_rebuilt(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.client(), FAST, prefix="k")
    rng = np.random.default_rng(9)
    vocab, dim, buckets = 3000, 64, 60
    parts = []
    for b in range(buckets):
        s = CollapseStats(vocab, dim)
        y = rng.choice(vocab, 600, replace=False)
        s.update(rng.normal(size=(600, dim)), y)
        ts = T0 + FAST.fine_seconds * b
        store.put_partial("m", f"p{b}", to_fields(s), ts, s.sample_count)
        parts.append((ts, s))
    store.maintain("m", ALGEBRA, T0)
    while store.compact("m", ALGEBRA).buckets:
        pass
    store.maintain("m", ALGEBRA, T0 + 600)  # the window holds all 60 buckets
    later = T0 + 900 + 590  # now 59 of them must be subtracted
    child = multiprocessing.get_context("spawn").Process(
        target=_maintain_in_child, args=(redis_server.url, later)
    )
    child.start()
    try:
        wait_for(lambda: store.windows("m")["15m"].dirty, 60, "the slide started", interval=0.001)
        os.kill(child.pid or 0, signal.SIGKILL)
    finally:
        child.join(timeout=10)
    assert store.windows("m")["15m"].dirty, "the slide finished before the kill: make it longer"
    result = store.maintain("m", ALGEBRA, later)  # waits for the dead holder's lock to expire
    assert result.rebuilt == 1
    got = read_state(store, "m", window_state("15m"))
    since = FAST.window_since(900, later)
    kept = [s for ts, s in parts if FAST.start("fine", ts) >= since]
    assert got is not None
    want = CollapseStats.merged(kept)
    assert got.sample_count == want.sample_count
    a, b = got.classes(), want.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-12)
