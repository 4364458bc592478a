"""One behaviour, two stores: MemoryStore (embedded mode) must act like RedisStore."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import RedisServer

from monitor.store.base import BaselineExists, BucketPolicy, Store
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

POLICY = BucketPolicy(
    fine_seconds=60, coarse_seconds=600, fine_retention=600, coarse_retention=3600
)
T0 = 1_800_000_000.0  # a fixed clock: the same bucket arithmetic in both stores


def concat(blobs: list[bytes] | tuple[bytes, ...]) -> bytes:
    """A merge function that keeps the order visible: sorted, comma-joined parts."""
    parts = sorted(p for blob in blobs for p in blob.decode().split(",") if p)
    return ",".join(parts).encode()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore(POLICY, clock=lambda: T0)
        return
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield RedisStore(server.client(), POLICY, prefix="t")
    finally:
        server.stop()


def test_partials_are_written_once(store: Store) -> None:
    assert store.put_partial("m", "a", b"x1", T0, 1)
    assert not store.put_partial("m", "a", b"x2", T0, 1)
    assert store.pending_count("m") == 1
    assert store.oldest_pending("m") == T0
    assert store.models() == ["m"]
    assert store.counters("m") == {
        "batches_ingested": 1,
        "samples_ingested": 1,
        "batches_duplicate": 1,
    }


def test_compaction_fills_fine_and_coarse_buckets(store: Store) -> None:
    store.put_partial("m", "a", b"a", T0, 1)
    store.put_partial("m", "b", b"b", T0 + 61, 1)  # next fine bucket, same coarse bucket
    store.put_partial("m", "c", b"c", T0 - 700, 1)  # an older coarse bucket
    total = 0
    while (result := store.compact("m", concat, limit=2)).buckets:
        total += result.partials
    assert total == 3
    assert store.pending_count("m") == 0
    fine = store.bucket_starts("m", "fine")
    assert fine == sorted({POLICY.start("fine", t) for t in (T0, T0 + 61, T0 - 700)})
    assert store.window_blobs("m", "fine", POLICY.start("fine", T0)) == [b"a", b"b"]
    coarse = store.window_blobs("m", "coarse", 0)
    assert sorted(",".join(b.decode() for b in coarse).split(",")) == ["a", "b", "c"]
    # A redelivery after compaction still counts once.
    assert not store.put_partial("m", "a", b"a", T0, 1)


def test_late_partial_merges_into_existing_bucket(store: Store) -> None:
    store.put_partial("m", "a", b"a", T0, 1)
    store.compact("m", concat)
    store.put_partial("m", "b", b"b", T0 + 1, 1)
    store.compact("m", concat)
    assert store.window_blobs("m", "fine", 0) == [b"a,b"]


def test_expiry_drops_only_old_buckets(store: Store) -> None:
    store.put_partial("m", "old", b"o", T0 - 2 * 3600, 1)
    store.put_partial("m", "new", b"n", T0, 1)
    store.compact("m", concat)
    dropped = store.expire_buckets("m", T0)
    assert dropped == 2  # the old fine and the old coarse bucket
    assert store.window_blobs("m", "fine", 0) == [b"n"]
    assert store.window_blobs("m", "coarse", 0) == [b"n"]


def test_baselines_snapshots_and_counters(store: Store) -> None:
    store.pin_baseline("m", "ref", b"blob", {"dim": 8}, replace=False)
    with pytest.raises(BaselineExists):
        store.pin_baseline("m", "ref", b"other", {"dim": 9}, replace=False)
    store.pin_baseline("m", "ref", b"newer", {"dim": 9}, replace=True)
    found = store.baseline("m", "ref")
    assert found is not None
    assert (found.blob, found.meta) == (b"newer", {"dim": 9})
    assert store.baselines("m") == {"ref": {"dim": 9}}
    assert store.unpin_baseline("m", "ref")
    assert not store.unpin_baseline("m", "ref")
    assert store.baseline("m", "ref") is None

    for i in range(5):
        store.put_snapshot("m", "1h", json.dumps({"i": i}), history=3)
    assert store.snapshot("m", "1h") == json.dumps({"i": 4})
    assert [json.loads(d)["i"] for d in store.history("m", "1h", 10)] == [4, 3, 2]
    assert store.snapshot("m", "24h") is None

    store.add_counters("m", {"x": 2, "y": 1})
    store.add_counters("m", {"x": 3})
    assert store.counters("m") == {"x": 5, "y": 1}
