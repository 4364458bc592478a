"""The cap on tracked classes (`max_tracked_classes`) on a real redis-server: the frequency zset
written exactly once with the batch, its decay, its place in memory_bytes, the exported counter,
and a run that never holds more than the cap's class rows in any state.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import RedisClusterServers, RedisServer

from monitor.config import Settings
from monitor.exporter.collector import CollapseCollector
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, maintain_model
from monitor.store.base import FREQUENCY_DECAYED_FIELD, BucketPolicy
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

VOCAB, DIM, CAP = 400, 8, 12
MEANS = 5.0 * np.random.default_rng(0).normal(size=(VOCAB, DIM))


def runtime_for(server: RedisServer, cap: int | None = CAP, **extra: Any) -> Runtime:
    model: dict[str, Any] = {"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True}
    if cap is not None:
        model["max_tracked_classes"] = cap
    windows = {"15m": 900, "1h": 3600}
    return Runtime(Settings(redis_url=server.url, models=[model], windows=windows, **extra))


def payload(rng: np.random.Generator, y: np.ndarray, bid: str, ts: float) -> dict[str, Any]:
    x = (MEANS[y] + rng.normal(size=(len(y), DIM))).astype(np.float32)
    return encode_batch("m", x, y, batch_id=bid, ts=ts, nc4=(1, len(y)))


def frequencies(server: RedisServer) -> dict[int, float]:
    raw = server.client().zrange("cm:{m}:freq", 0, -1, withscores=True)
    return {int(c): float(s) for c, s in raw}


def test_frequencies_are_written_once_with_the_batch(redis_server: RedisServer) -> None:
    runtime = runtime_for(redis_server)
    rng = np.random.default_rng(1)
    now, sent = time.time(), Counter[int]()
    batches = [rng.integers(0, 40, size=100) for _ in range(3)]
    for i, y in enumerate(batches):
        assert runtime.ingestor.ingest(payload(rng, y, f"b{i}", now - 60), now=now).stored
        sent.update(int(c) for c in y)
    assert frequencies(redis_server) == {c: float(n) for c, n in sent.items()}
    counters = runtime.store.counters("m")
    untracked = counters["untracked_samples"]
    assert untracked > 0
    assert counters["samples_ingested"] + untracked == 300
    # A redelivery (a new process: its own tracked set) adds nothing anywhere.
    again = runtime_for(redis_server)
    assert not again.ingestor.ingest(payload(rng, batches[0], "b0", now - 60), now=now).stored
    assert frequencies(redis_server) == {c: float(n) for c, n in sent.items()}
    assert again.store.counters("m")["untracked_samples"] == untracked
    assert again.store.counters("m")["batches_duplicate"] == 1
    # The exporter shows the counter like the other pipeline counters.
    collector = CollapseCollector(runtime.store, models=["m"], windows=["15m"])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("model") == "m"
    }
    assert samples["collapse_untracked_samples_total"] == float(untracked)


def test_decay_matches_memory_store_and_is_stamped_once(redis_server: RedisServer) -> None:
    policy = BucketPolicy(tracked_half_life=100.0)
    redis_store = RedisStore(redis_server.client(), policy)
    memory = MemoryStore(policy)
    counts = {1: 8.0, 2: 3.0, 3: 1.0, 10: 3.0, 9: 3.0}
    for store in (redis_store, memory):
        assert store.decay_frequencies("m", 0.0) == 0  # no frequencies: nothing, no stamp
        assert FREQUENCY_DECAYED_FIELD not in store.meta("m")
        store.add_frequencies("m", counts)
        assert store.top_classes("m", 3) == [1, 9, 2]  # ties: the id as text, descending
        assert store.decay_frequencies("m", 1000.0) == 0
        assert store.decay_frequencies("m", 1250.0) == 2
        assert store.decay_frequencies("m", 1299.0) == 0
        assert float(store.meta("m")[FREQUENCY_DECAYED_FIELD]) == 1200.0
    assert frequencies(redis_server) == {1: 2.0, 2: 0.75, 10: 0.75, 9: 0.75}
    assert frequencies(redis_server) == memory._models["m"].frequencies
    assert redis_store.top_classes("m", 10) == memory.top_classes("m", 10) == [1, 9, 2, 10]
    # Maintenance decays too (one more step at 1300: 0.375 falls under the floor).
    maintain_model(redis_store, "m", 1300.0)
    assert frequencies(redis_server) == {1: 1.0}


def test_memory_bytes_counts_the_frequencies(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.client())
    before = store.memory_bytes("m")
    store.add_frequencies("m", {c: float(c + 1) for c in range(5000)})
    usage = redis_server.client().memory_usage("cm:{m}:freq", samples=0)
    assert usage
    assert usage > 5000 * 8
    assert store.memory_bytes("m") == before + usage


def _row_counts(server: RedisServer) -> dict[str, int]:
    """Class rows (fields named by a class id) of every statistics hash of model m."""
    client = server.client()
    out = {}
    for key in client.scan_iter(match="cm:{m}:rows:*"):
        if b":partial:" in key:
            continue
        out[key.decode()] = sum(1 for f in client.hkeys(key) if f.isdigit())
    return out


def test_a_capped_run_holds_at_most_the_cap_rows_per_state(redis_server: RedisServer) -> None:
    # Refreshing before every batch: the tracked set always follows the stored frequencies.
    runtime = runtime_for(redis_server, tracked_refresh_seconds=0)
    rng = np.random.default_rng(2)
    # The top CAP classes carry 70% of the traffic, 388 others share the rest: every 5-minute
    # bucket touches far more than CAP classes.
    p = np.full(VOCAB, 0.3 / (VOCAB - CAP))
    p[:CAP] = 0.7 / CAP
    now = time.time()
    start = now - 3000
    touched: set[int] = set()
    for i in range(40):
        y = rng.choice(VOCAB, size=200, p=p)
        touched.update(int(c) for c in y)
        runtime.ingestor.ingest(payload(rng, y, f"r{i}", start + 70 * i), now=now)
    compact_model(runtime.store, "m")
    maintain_model(runtime.store, "m", now)
    rows = _row_counts(redis_server)
    assert any(k.endswith(":rows:window:1h") for k in rows)
    assert len(touched) > 10 * CAP
    assert rows
    assert max(rows.values()) <= CAP, rows
    assert runtime.store.counters("m")["untracked_samples"] > 0
    # The control: the same traffic without the cap holds many more rows.
    redis_server.client().flushall()
    off = runtime_for(redis_server, cap=None)
    rng = np.random.default_rng(2)
    for i in range(40):
        y = rng.choice(VOCAB, size=200, p=p)
        off.ingestor.ingest(payload(rng, y, f"r{i}", start + 70 * i), now=now)
    compact_model(off.store, "m")
    assert max(_row_counts(redis_server).values()) > 3 * CAP
    assert not redis_server.client().exists("cm:{m}:freq")
    assert "untracked_samples" not in off.store.counters("m")


def test_capped_ingestion_and_decay_on_a_redis_cluster(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The partial script with the frequency key and the decay script name keys of one slot."""
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    try:
        model = {"name": "m", "vocab_size": VOCAB, "dim": DIM, "max_tracked_classes": 3}
        settings = Settings(redis_url=cluster.url, redis_cluster=True, broker_url=redis_server.url,
                            models=[model], windows={"1h": 3600},
                            tracked_half_life_seconds=60)  # fmt: skip
        runtime = Runtime(settings)
        rng, now = np.random.default_rng(3), time.time()
        y = np.repeat(np.arange(6), [9, 8, 7, 3, 2, 1])
        assert runtime.ingestor.ingest(payload(rng, y, "c0", now - 30), now=now).stored
        assert not runtime.ingestor.ingest(payload(rng, y, "c0", now - 30), now=now).stored
        store = runtime.store
        assert store.top_classes("m", 10) == [0, 1, 2, 3, 4, 5]
        assert store.counters("m")["untracked_samples"] == 6
        compact_model(store, "m")
        maintain_model(store, "m", now)  # stamps
        maintain_model(store, "m", now + 125)  # two half-lives: 2/4 = 0.5 stays, 1/4 goes
        assert store.top_classes("m", 10) == [0, 1, 2, 3, 4]
        assert store.memory_bytes("m") > 0
    finally:
        cluster.stop()
