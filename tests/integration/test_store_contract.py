"""One behaviour, two stores: MemoryStore (embedded mode) must act like RedisStore."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from servers import RedisServer

from monitor.store.base import BaselineExists, BucketPolicy, Store, bucket_state, window_state
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

POLICY = BucketPolicy(
    fine_seconds=60,
    coarse_seconds=600,
    fine_retention=600,
    coarse_retention=3600,
    windows=(("5m", 300), ("10m", 600), ("1h", 3600)),
)
T0 = 1_800_000_000.0  # a fixed clock: the same bucket arithmetic in both stores


class IntAlgebra:
    """A toy field algebra: values are decimal integers that add; 0 deletes the field.

    It makes the store's bookkeeping visible without the statistics format: a state's fields
    must equal the sums of exactly the records it should hold.
    """

    def combine(
        self,
        fields: Sequence[bytes],
        current: Sequence[bytes | None],
        delta: Sequence[bytes],
        sign: int,
    ) -> list[bytes | None]:
        out: list[bytes | None] = []
        for cur, add in zip(current, delta, strict=True):
            value = int(cur or b"0") + sign * int(add)
            assert value >= 0, "subtracted more than was added"
            out.append(str(value).encode() if value else None)
        return out

    def merge_all(self, parts: Iterable[Mapping[bytes, bytes]]) -> dict[bytes, bytes]:
        total: dict[bytes, bytes] = {}
        for part in parts:
            for name, value in part.items():
                total[name] = str(int(total.get(name, b"0")) + int(value)).encode()
        return total


ALGEBRA = IntAlgebra()


def read(store: Store, model: str, state: str) -> dict[bytes, bytes]:
    with store.locked(model):
        return {f: v for chunk in store.scan_state(model, state, max_bytes=8) for f, v in chunk}


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
    assert store.put_partial("m", "a", {b"1": b"1"}, T0, 1)
    assert not store.put_partial("m", "a", {b"1": b"2"}, T0, 1)
    assert store.pending_count("m") == 1
    assert store.oldest_pending("m") == T0
    assert store.models() == ["m"]
    assert store.counters("m") == {
        "batches_ingested": 1,
        "samples_ingested": 1,
        "batches_duplicate": 1,
    }


def test_compaction_fills_buckets_and_windows(store: Store) -> None:
    store.maintain("m", ALGEBRA, T0)  # windows exist before the data arrives
    store.put_partial("m", "a", {b"1": b"1", b"2": b"5"}, T0, 1)
    store.put_partial("m", "b", {b"1": b"2"}, T0 + 61, 1)  # next fine bucket, same coarse
    store.put_partial("m", "c", {b"3": b"7"}, T0 - 700, 1)  # an older coarse bucket
    total = 0
    while (result := store.compact("m", ALGEBRA, limit=2)).buckets:
        total += result.partials
    assert total == 3
    assert store.pending_count("m") == 0
    fine = store.bucket_starts("m", "fine")
    assert fine == sorted({POLICY.start("fine", t) for t in (T0, T0 + 61, T0 - 700)})
    assert read(store, "m", bucket_state("fine", POLICY.start("fine", T0))) == {
        b"1": b"1",
        b"2": b"5",
    }
    coarse = POLICY.start("coarse", T0)
    assert read(store, "m", bucket_state("coarse", coarse)) == {b"1": b"3", b"2": b"5"}
    # The 1 h window holds everything; the 10 m window only what starts after T0 - 600.
    assert read(store, "m", window_state("1h")) == {b"1": b"3", b"2": b"5", b"3": b"7"}
    assert read(store, "m", window_state("10m")) == {b"1": b"3", b"2": b"5"}
    assert store.memory_bytes("m") > 0
    # A redelivery after compaction still counts once.
    assert not store.put_partial("m", "a", {b"1": b"1"}, T0, 1)


def test_late_partial_merges_into_existing_bucket(store: Store) -> None:
    store.put_partial("m", "a", {b"1": b"1"}, T0, 1)
    store.compact("m", ALGEBRA)
    store.put_partial("m", "b", {b"1": b"4"}, T0 + 1, 1)
    store.compact("m", ALGEBRA)
    assert read(store, "m", bucket_state("fine", POLICY.start("fine", T0))) == {b"1": b"5"}


def test_maintenance_drops_only_old_buckets(store: Store) -> None:
    store.put_partial("m", "old", {b"1": b"1"}, T0 - 2 * 3600, 1)
    store.put_partial("m", "new", {b"2": b"1"}, T0, 1)
    store.compact("m", ALGEBRA)
    result = store.maintain("m", ALGEBRA, T0)
    assert result.dropped == 2  # the old fine and the old coarse bucket
    assert store.bucket_starts("m", "fine") == [POLICY.start("fine", T0)]
    assert store.bucket_starts("m", "coarse") == [POLICY.start("coarse", T0)]
    assert read(store, "m", window_state("1h")) == {b"2": b"1"}


def test_windows_slide_exactly_over_time(store: Store) -> None:
    """At every step each window holds exactly the records of its buckets since its start."""
    rng = random.Random(7)
    records: list[tuple[float, bytes, int]] = []
    now = T0
    for step in range(40):
        now += rng.choice([13.0, 29.0, 61.0, 150.0])
        for i in range(rng.randint(0, 3)):
            ts = now - rng.choice([0.0, 0.0, 5.0, 200.0, 700.0])  # some arrive late
            field, value = str(rng.randint(0, 4)).encode(), rng.randint(1, 9)
            store.put_partial("m", f"p{step}.{i}", {field: str(value).encode()}, ts, 1)
            records.append((ts, field, value))
        if rng.random() < 0.7:
            store.compact("m", ALGEBRA)
        store.maintain("m", ALGEBRA, now)
        pending = store.pending_count("m")
        for label, seconds in POLICY.windows:
            if pending:
                continue  # uncompacted records are not in any window yet
            level = POLICY.level_for(seconds)
            since = POLICY.window_since(seconds, now)
            kept = POLICY.expired_before(level, now)
            want: dict[bytes, int] = {}
            for ts, field, value in records:
                start = POLICY.start(level, ts)
                if start >= since and start >= kept:
                    want[field] = want.get(field, 0) + value
            got = {f: int(v) for f, v in read(store, "m", window_state(label)).items()}
            assert got == want, (step, label)


def test_interrupted_slide_is_rebuilt(store: Store) -> None:
    store.maintain("m", ALGEBRA, T0)
    store.put_partial("m", "a", {b"1": b"2"}, T0, 1)
    store.compact("m", ALGEBRA)
    # A maintainer that died mid-slide: the window is marked dirty and half-changed.
    state = store.windows("m")["5m"]
    if isinstance(store, RedisStore):
        k = store.keys("m")
        store.client.hset(k.windows, "5m", json.dumps({**state.__dict__, "dirty": True}))
        store.client.hset(k.state(window_state("5m")), b"1", b"99")
    else:
        store._models["m"].windows["5m"] = replace(state, dirty=True)
        store._models["m"].states[window_state("5m")][b"1"] = b"99"
    store.put_partial("m", "b", {b"1": b"1"}, T0 + 1, 1)
    store.compact("m", ALGEBRA)  # not added to the dirty window
    result = store.maintain("m", ALGEBRA, T0 + 2)
    assert result.rebuilt == 1
    assert read(store, "m", window_state("5m")) == {b"1": b"3"}
    assert not store.windows("m")["5m"].dirty


def test_states_are_written_whole_and_read_in_chunks(store: Store) -> None:
    fields = {str(i).encode(): str(i + 1).encode() for i in range(100)}
    store.write_state(
        "m", "reference", [dict(list(fields.items())[:50]), dict(list(fields.items())[50:])]
    )
    with store.locked("m"):
        chunks = list(store.scan_state("m", "reference", max_bytes=64))
    assert len(chunks) > 1
    assert {f: v for chunk in chunks for f, v in chunk} == fields
    assert store.state_size("m", "reference") == 100
    assert store.state_field("m", "reference", b"7") == b"8"
    store.write_state("m", "reference", [{b"x": b"1"}])
    assert read(store, "m", "reference") == {b"x": b"1"}
    assert store.claim("m", "evaluate:1", 60)
    assert not store.claim("m", "evaluate:1", 60)


def test_baselines_snapshots_and_counters(store: Store) -> None:
    store.pin_baseline("m", "ref", [{b"1": b"1"}], {"dim": 8}, replace=False)
    with pytest.raises(BaselineExists):
        store.pin_baseline("m", "ref", [{b"1": b"2"}], {"dim": 9}, replace=False)
    store.pin_baseline("m", "ref", [{b"1": b"3"}, {b"2": b"4"}], {"dim": 9}, replace=True)
    found = store.baseline("m", "ref")
    assert found is not None
    assert found.meta == {"dim": 9}
    assert read(store, "m", found.state) == {b"1": b"3", b"2": b"4"}
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


def test_compaction_defers_while_the_state_lock_is_held(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        reader = RedisStore(server.client(), POLICY, prefix="t")
        writer = RedisStore(server.client(), POLICY, prefix="t")
        writer.put_partial("m", "a", {b"1": b"1"}, T0, 1)
        with reader.locked("m"):
            result = writer.compact("m", ALGEBRA)
            assert result.deferred
            assert writer.pending_count("m") == 1
        assert writer.compact("m", ALGEBRA).partials == 1
    finally:
        server.stop()
