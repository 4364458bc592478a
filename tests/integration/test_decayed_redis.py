"""Decayed windows on a real redis-server: exactly once under redelivery, racing compactors, a
restart from the AOF, memory per model, and switching window_mode on a live store.

The windows are compared with `decayed_reference` (float64, from the raw samples with explicit
weights); exact mode, on the same server and traffic, is the control for memory and switching.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import torch
from decayed_reference import Feed, Part, assert_presents, part_fields
from servers import RedisServer

from monitor.pipeline.windows import ALGEBRA, compact_model, maintain_model, window_stats
from monitor.stats import CollapseStats, RFFConfig
from monitor.stats.fields import from_fields
from monitor.store.base import BucketPolicy, bucket_state
from monitor.store.redis_store import RedisStore

VOCAB, DIM = 400, 32
RFF = RFFConfig(dim=DIM, features=32, bandwidths=(20.0,), seed=5)
T0 = 1_800_000_000
WINDOWS = (("10m", 600), ("1h", 3600), ("3h", 10800))
POLICY = BucketPolicy(
    fine_seconds=60,
    coarse_seconds=600,
    fine_retention=3600,
    coarse_retention=3 * 3600,
    windows=WINDOWS,
    window_mode="decayed",
)
EXACT = replace(POLICY, window_mode="exact")
MEANS = np.random.default_rng(0).normal(size=(VOCAB, DIM))
MEANS *= (
    np.random.default_rng(1).uniform(10, 50, (VOCAB, 1)) / np.linalg.norm(MEANS, axis=1)[:, None]
)


def part(rng: np.random.Generator, ts: float, rows: int, uniform: bool = False) -> Part:
    """Zipf-ish labels (or every class in turn), class means of norm 10-50, unit noise."""
    if uniform:
        y = rng.permutation(np.arange(rows) % VOCAB)
    else:
        p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
        y = rng.choice(VOCAB, size=rows, p=p / p.sum())
    x = MEANS[y] + rng.normal(size=(rows, DIM))
    hits = int(rng.binomial(rows, 0.7))
    return Part(x, y, POLICY.start("fine", ts), hits, rows)


def traffic(seed: int, minutes: int, per_minute: int = 2) -> list[tuple[str, float, Part]]:
    """(batch id, time, part) over `minutes` minutes from T0, some a few buckets late."""
    rng = np.random.default_rng(seed)
    out = []
    for minute in range(minutes):
        for j in range(per_minute):
            lag = float(rng.choice([0, 0, 0, 120]))
            ts = max(T0 + 60.0 * minute + rng.uniform(0, 59) - lag, float(T0))
            out.append((f"s{seed}.{minute}.{j}", ts, part(rng, ts, int(rng.integers(20, 50)))))
    return out


def put(store: RedisStore, p: Part, ts: float, batch_id: str, second: bool = True) -> bool:
    fields = part_fields(p, VOCAB, second=second, rff=RFF)
    return store.put_partial("m", batch_id, fields, ts, len(p.labels))


def feed_for(store: RedisStore) -> Feed:
    feed = Feed(store, vocab=VOCAB, rff=RFF)
    feed.maintain(T0)  # the windows exist before the data
    return feed


def check_windows(feed: Feed, now: float) -> None:
    for label, _ in WINDOWS:
        read = feed.read(label, now)
        assert read.cut == ()
        assert_presents(read.stats, feed.reference(label, now))


def test_redelivered_batches_count_once(redis_server: RedisServer) -> None:
    feed = feed_for(RedisStore(redis_server.client(), POLICY, prefix="t"))
    batches = traffic(1, 40)
    for i, (batch_id, ts, p) in enumerate(batches):
        assert feed.put(p, ts, batch_id)
        if i % 10 == 0:
            assert not feed.put(p, ts, batch_id)  # delivered again while still pending
        if i % 5 == 4:
            feed.compact()
            assert not feed.put(p, ts, batch_id)  # delivered again right after compaction
    feed.compact()
    for batch_id, ts, p in batches:  # and every task once more at the end
        assert not feed.put(p, ts, batch_id)
    assert feed.store.pending_count("m") == 0
    assert feed.store.counters("m")["batches_duplicate"] == len(batches) + 16 + 8
    check_windows(feed, T0 + 40 * 60 + 7.0)


def test_racing_compactors_merge_each_partial_once(redis_server: RedisServer) -> None:
    feed = feed_for(RedisStore(redis_server.client(), POLICY, prefix="t"))
    batches = traffic(2, 30, per_minute=4)
    for batch_id, ts, p in batches:
        feed.put(p, ts, batch_id)
    stores = [RedisStore(redis_server.client(), POLICY, prefix="t") for _ in range(2)]
    start = threading.Barrier(2)
    merged = [0, 0]

    def race(i: int) -> None:
        start.wait()
        while True:  # small steps, so that the two interleave over every group
            result = stores[i].compact("m", ALGEBRA, limit=4)
            merged[i] += result.partials
            if result.buckets == 0 and not result.deferred:
                return

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(merged) == len(batches)  # each partial merged by exactly one of the two
    assert min(merged) > 0  # both took part
    feed.compact()  # nothing left: only accounts for what the racers merged
    check_windows(feed, T0 + 30 * 60 + 11.0)


def test_windows_survive_a_redis_restart_from_the_aof(redis_server: RedisServer) -> None:
    feed = feed_for(RedisStore(redis_server.client(), POLICY, prefix="t"))
    batches = traffic(3, 50)
    for batch_id, ts, p in batches[:80]:
        feed.put(p, ts, batch_id)
    feed.compact()
    feed.maintain(T0 + 40 * 60.0)  # a prune pass too, before the crash
    for batch_id, ts, p in batches[80:]:
        feed.put(p, ts, batch_id)  # left pending: must survive as well
    redis_server.kill()
    redis_server.start()
    feed.store = RedisStore(redis_server.client(), POLICY, prefix="t")
    assert feed.store.pending_count("m") == len(batches) - 80
    feed.compact()
    check_windows(feed, T0 + 50 * 60 + 23.0)


def test_memory_is_windows_times_classes_times_row_far_below_exact(
    redis_server: RedisServer,
) -> None:
    """Every class in each of 30 fine buckets: exact mode keeps a row per class per bucket
    (fine and coarse) and per window; decayed mode keeps rows in its windows only."""
    rng = np.random.default_rng(4)
    minutes = 30
    batches = [(f"u{m}", T0 + 60.0 * m + 5, part(rng, T0 + 60.0 * m + 5, 2 * VOCAB, uniform=True))
               for m in range(minutes)]  # fmt: skip
    measured = {}
    for mode, policy in (("decayed", POLICY), ("exact", EXACT)):
        store = RedisStore(redis_server.client(), policy, prefix=mode)  # keys apart
        maintain_model(store, "m", T0)
        for batch_id, ts, p in batches:
            put(store, p, ts, batch_id, second=False)
        compact_model(store, "m")
        now = T0 + 60.0 * minutes + 1
        for label, seconds in WINDOWS:
            assert window_stats(store, "m", label, seconds, now=now).stats is not None
        if mode == "decayed":
            for level in ("fine", "coarse"):
                for start in store.bucket_starts("m", level):
                    assert store.state_size("m", bucket_state(level, start)) == 1  # g only
        measured[mode] = store.memory_bytes("m")
    row = 32 + 8 * DIM
    floor = len(WINDOWS) * VOCAB * row  # the rows alone, no Redis overhead
    # Redis's hash-table entries, allocator rounding and the buckets' g fields: within 2x.
    print(f"memory_bytes {measured}, windows x K x row = {floor}")
    assert floor <= measured["decayed"] <= 2 * floor, (measured, floor)
    assert measured["exact"] >= 5 * measured["decayed"], measured


def test_switching_window_mode_restarts_the_windows_both_ways(redis_server: RedisServer) -> None:
    client = redis_server.client()
    exact = RedisStore(client, EXACT, prefix="t")
    maintain_model(exact, "m", T0)
    first = traffic(5, 20)
    for batch_id, ts, p in first:
        put(exact, p, ts, batch_id)
    compact_model(exact, "m")
    now = T0 + 20 * 60.0 + 3
    assert window_stats(exact, "m", "1h", 3600, now=now).stats is not None
    baseline = part_fields(first[0][2], VOCAB, second=True, rff=RFF)
    exact.pin_baseline("m", "ref", [baseline], {"source": "test"}, replace=False)

    # exact -> decayed: the windows restart empty (no error), the baseline is kept.
    feed = Feed(RedisStore(client, POLICY, prefix="t"), vocab=VOCAB, rff=RFF)
    feed.maintain(now)
    for label, _ in WINDOWS:
        assert feed.read(label, now).stats is None
    assert feed.store.bucket_starts("m", "fine") == []  # exact mode's buckets are gone
    for i, (_, ts, p) in enumerate(traffic(6, 20)):
        moved = ts + 1200  # the same traffic, 20 minutes on
        feed.put(replace(p, bucket=POLICY.start("fine", moved)), moved, f"d{i}")
    feed.compact()
    check_windows(feed, now + 1200)

    # decayed -> exact: the windows restart empty again; then they hold exactly the new data.
    exact = RedisStore(client, EXACT, prefix="t")
    later = now + 2400
    maintain_model(exact, "m", later)
    for label, seconds in WINDOWS:
        assert window_stats(exact, "m", label, seconds, now=later).stats is None
    third = [(f"e{i}", ts + 2400, p) for i, (_, ts, p) in enumerate(traffic(7, 5))]
    want = CollapseStats(VOCAB, DIM, second_moment=True, rff=RFF)
    for batch_id, ts, p in third:
        put(exact, p, ts, batch_id)
        want.update(p.features, p.labels)
    compact_model(exact, "m")
    got = window_stats(exact, "m", "1h", 3600, now=later + 400).stats
    assert got is not None
    assert got.classes().counts.tolist() == want.classes().counts.tolist()
    torch.testing.assert_close(got.classes().sums, want.classes().sums, rtol=1e-9, atol=1e-9)
    found = exact.baseline("m", "ref")
    assert found is not None  # kept through both switches
    with exact.locked("m"):
        fields = {f: v for chunk in exact.scan_state("m", found.state) for f, v in chunk}
    assert from_fields(fields).sample_count == len(first[0][2].labels)
