"""The optional cap on tracked classes (`max_tracked_classes`) on MemoryStore.

The window of a capped model must equal a float64 brute force over the raw samples of the
tracked classes only; the tracked set at each batch is computed here independently from the
labels sent so far (top M by count, no decay within the test), not read from the code.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brute_force import METRIC_KEYS, assert_matches, brute_force_metrics

from monitor.config import Settings
from monitor.metrics import compute_metrics
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.tracking import TrackedClasses
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats
from monitor.stats.fields import to_fields
from monitor.store.base import FREQUENCY_DECAYED_FIELD, BucketPolicy, window_state
from monitor.store.memory import MemoryStore

VOCAB, DIM, CAP = 40, 6, 8
REFRESH = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Capped:
    """An embedded runtime whose model has `cap` (None: off), fed through the ingestor, with
    the refresh of the tracked set on a clock the test advances."""

    def __init__(self, tmp_path: Path, cap: int | None, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.head = rng.normal(size=(VOCAB, DIM))
        np.save(tmp_path / "head.npy", self.head)
        head = str(tmp_path / "head.npy")
        model: dict[str, Any] = {"name": "m", "vocab_size": VOCAB, "dim": DIM,
                                 "second_moment": True, "classifier_path": head}  # fmt: skip
        if cap is not None:
            model["max_tracked_classes"] = cap
        settings = Settings(models=[model], windows={"1h": 3600}, stderr_interval=0)
        self.runtime = Runtime(settings)
        self.store = self.runtime.store
        self.clock = Clock()
        self.runtime.ingestor.tracked = TrackedClasses(self.store, REFRESH, clock=self.clock)
        self.means = 3.0 * rng.normal(size=(VOCAB, DIM))
        self.rng = rng
        self.now = time.time()
        self.sent = 0

    def batch(self, labels: np.ndarray) -> np.ndarray:
        return (self.means[labels] + self.rng.normal(size=(len(labels), DIM))).astype(np.float32)

    def ingest(
        self, x: np.ndarray, y: np.ndarray, nc4: tuple[int, int] | None = None, bid: str = ""
    ) -> bool:
        self.sent += 1
        payload = encode_batch("m", x, y, batch_id=bid or f"b{self.sent}",
                               ts=self.now - 600 + self.sent, nc4=nc4)  # fmt: skip
        return self.runtime.ingestor.ingest(payload, now=self.now).stored

    def refresh(self) -> None:
        self.clock.now += REFRESH

    def window(self) -> CollapseStats:
        compact_model(self.store, "m")
        stats = window_stats(self.store, "m", "1h", 3600, now=self.now).stats
        assert stats is not None
        return stats

    def frequencies(self) -> dict[int, float]:
        assert isinstance(self.store, MemoryStore)
        return dict(self.store._models["m"].frequencies)


def zipf_labels(rng: np.random.Generator, n: int, exponent: float = 1.3) -> np.ndarray:
    p = 1.0 / np.arange(1, VOCAB + 1) ** exponent
    return rng.choice(VOCAB, size=n, p=p / p.sum())


def expected_tracked(seen: Counter[int], cap: int) -> set[int]:
    """Top `cap` classes by count over everything sent so far (no tie at the boundary)."""
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    if len(ranked) > cap:
        assert ranked[cap - 1][1] > ranked[cap][1], "tie at the cap: pick another seed"
    return {c for c, _ in ranked[:cap]}


def test_window_equals_brute_force_over_the_tracked_samples(tmp_path: Path) -> None:
    sim = Capped(tmp_path, CAP)
    seen: Counter[int] = Counter()
    kept_x, kept_y, dropped, nc4_total = [], [], 0, 0
    # First batch: no frequencies yet, so the 8 most frequent classes of the batch are admitted.
    y0 = np.concatenate([np.repeat(np.arange(8), 30), np.repeat(np.arange(8, VOCAB), 2)])
    batches = [(y0, set(range(8)))]
    for _ in range(6):
        batches.append((zipf_labels(sim.rng, 300), set()))
    for i, (y, tracked) in enumerate(batches):
        if i:
            sim.refresh()
            tracked = expected_tracked(seen, CAP)
        x = sim.batch(y)
        keep = np.isin(y, sorted(tracked))
        assert sim.ingest(x, y, nc4=(5, len(y)))
        kept_x.append(x[keep].astype(np.float64))
        kept_y.append(y[keep])
        dropped += int((~keep).sum())
        nc4_total += len(y)
        seen.update(int(c) for c in y)
    assert dropped > 0
    # A batch of untracked classes only: no rows, but its NC4 counts, id and counters land.
    sim.refresh()
    outside = sorted(set(range(VOCAB)) - expected_tracked(seen, CAP))[:3]
    y_out = np.repeat(np.array(outside), 4)
    assert sim.ingest(sim.batch(y_out), y_out, nc4=(2, len(y_out)))
    dropped += len(y_out)
    nc4_total += len(y_out)

    stats = sim.window()
    X, Y = np.concatenate(kept_x), np.concatenate(kept_y)
    assert stats.sample_count == len(Y)
    assert sorted(stats.class_ids.tolist()) == sorted(set(Y.tolist()))
    assert stats.nc4_total == nc4_total  # NC4 covers all traffic
    assert stats.nc4_hits == 5 * len(batches) + 2
    counters = sim.store.counters("m")
    assert counters["untracked_samples"] == dropped
    assert counters["samples_ingested"] == len(Y)
    assert "rejected:untracked" not in str(counters)
    got = compute_metrics(stats, sim.head, min_count=2).as_dict()
    want = brute_force_metrics(X, Y, classifier=sim.head, min_count=2)
    assert_matches(got, want, tuple(k for k in METRIC_KEYS if k != "nc4_ncc_agreement"), 1e-7)
    # The frequencies hold every label sent, tracked or not.
    assert sim.frequencies() == {c: float(n) for c, n in (seen + Counter(y_out.tolist())).items()}


def test_the_tracked_set_follows_the_frequencies_after_a_refresh(tmp_path: Path) -> None:
    sim = Capped(tmp_path, 3)
    first = np.repeat(np.array([0, 1, 2, 9]), [10, 9, 8, 1])
    assert sim.ingest(sim.batch(first), first)
    assert sim.store.counters("m")["untracked_samples"] == 1  # class 9: the cap is full
    shifted = np.repeat(np.array([5, 6, 7, 0]), [30, 30, 30, 1])
    sim.ingest(sim.batch(shifted), shifted)  # before the refresh: 0 kept, 5-7 dropped
    assert sim.store.counters("m")["untracked_samples"] == 1 + 90
    assert sim.window().sample_count == 27 + 1
    sim.refresh()
    sim.ingest(sim.batch(shifted), shifted)  # now 5, 6, 7 are the top three; 0 is dropped
    assert sim.store.counters("m")["untracked_samples"] == 1 + 90 + 1
    stats = sim.window()
    assert stats.sample_count == 28 + 90
    # Churn: the classes that left keep their rows until they slide out of the window.
    assert sorted(stats.class_ids.tolist()) == [0, 1, 2, 5, 6, 7]
    counts = dict(zip(stats.class_ids.tolist(), stats.counts.tolist(), strict=True))
    assert counts == {0: 11, 1: 9, 2: 8, 5: 30, 6: 30, 7: 30}


def test_a_redelivery_counts_nothing_twice(tmp_path: Path) -> None:
    sim = Capped(tmp_path, 2)
    y = np.repeat(np.array([3, 4, 5]), [6, 5, 4])
    x = sim.batch(y)
    assert sim.ingest(x, y, bid="same")
    before, counters = sim.frequencies(), sim.store.counters("m")
    assert before == {3: 6.0, 4: 5.0, 5: 4.0}
    assert counters["untracked_samples"] == 4
    sim.refresh()  # even under another tracked set, the repeat adds nothing
    assert not sim.ingest(x, y, bid="same")
    assert sim.frequencies() == before
    after = sim.store.counters("m")
    assert after["untracked_samples"] == 4
    assert after["samples_ingested"] == 11
    assert after["batches_duplicate"] == 1


def _stored(sim: Capped) -> dict[str, dict[bytes, bytes]]:
    assert isinstance(sim.store, MemoryStore)
    compact_model(sim.store, "m")
    window_stats(sim.store, "m", "1h", 3600, now=sim.now)
    return {k: dict(v) for k, v in sim.store._models["m"].states.items()}


def test_cap_off_stores_what_the_batches_sum_to_and_no_tracking_data(tmp_path: Path) -> None:
    off, wide = Capped(tmp_path, None, seed=3), Capped(tmp_path, VOCAB, seed=3)
    ys = [zipf_labels(off.rng, 200) for _ in range(4)]
    wide.rng = np.random.default_rng(99)
    off.rng = np.random.default_rng(99)
    xs = []
    for y in ys:
        xs.append(off.batch(y))
        assert np.array_equal(xs[-1], wide.batch(y))
        off.ingest(xs[-1], y)
        wide.ingest(xs[-1], y)
    # Made after the first batch agreed the RFF bandwidth, so it uses the same features.
    reference = off.runtime.registry.new_stats("m", off.store, xs[0])
    for x, y in zip(xs, ys, strict=True):
        reference.update(x, y)
    stored = _stored(off)
    # Nothing of the cap is written without it.
    assert isinstance(off.store, MemoryStore)
    assert off.store._models["m"].frequencies == {}
    assert "untracked_samples" not in off.store.counters("m")
    assert FREQUENCY_DECAYED_FIELD not in off.store.meta("m")
    # A cap that drops nothing stores the very same statistics as no cap.
    assert stored == _stored(wide)
    window = stored[window_state("1h")]
    assert window.keys() == to_fields(reference).keys()
    stats = off.window()
    assert stats.sample_count == reference.sample_count
    got, want = stats.classes(), reference.classes()
    assert got.class_ids.tolist() == want.class_ids.tolist()
    assert got.counts.tolist() == want.counts.tolist()
    assert np.allclose(got.sums.numpy(), want.sums.numpy(), rtol=1e-12)


def test_decay_halves_once_per_half_life_and_drops_the_small(tmp_path: Path) -> None:
    store = MemoryStore(BucketPolicy(tracked_half_life=100.0))
    assert store.decay_frequencies("m", 0.0) == 0  # nothing to decay: no stamp written
    assert FREQUENCY_DECAYED_FIELD not in store.meta("m")
    store.add_frequencies("m", {1: 8.0, 2: 3.0, 3: 1.0})
    assert store.decay_frequencies("m", 1000.0) == 0  # the first call only stamps
    assert store.decay_frequencies("m", 1099.0) == 0
    assert store.decay_frequencies("m", 1250.0) == 2
    assert store._models["m"].frequencies == {1: 2.0, 2: 0.75}  # 0.25 < 0.5: deleted
    assert float(store.meta("m")[FREQUENCY_DECAYED_FIELD]) == 1200.0
    assert store.decay_frequencies("m", 1299.0) == 0  # the step counts from 1200, not 1250
    assert store.top_classes("m", 5) == [1, 2]
    assert store.maintain("m", _NoAlgebra(), 1300.0).subtracted == 0
    assert store._models["m"].frequencies == {1: 1.0}


def test_top_classes_and_memory(tmp_path: Path) -> None:
    store = MemoryStore()
    before = store.memory_bytes("m")
    store.add_frequencies("m", {7: 2.0, 10: 2.0, 3: 5.0, 9: 1.0})
    # Ties as Redis orders them: the class id as text, descending ("9" > "7" > "10").
    assert store.top_classes("m", 10) == [3, 7, 10, 9]
    assert store.top_classes("m", 2) == [3, 7]
    assert store.memory_bytes("m") > before


class _NoAlgebra:
    """maintain() with no windows configured never combines fields."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected algebra call {name}")


@pytest.mark.parametrize("cap", [1, 5])
def test_tracked_classes_admit_up_to_the_cap_while_filling(cap: int) -> None:
    store = MemoryStore()
    tracked = TrackedClasses(store, REFRESH, clock=lambda: 0.0)
    y = np.repeat(np.arange(10), np.arange(10, 0, -1))  # class 0 most frequent
    keep = tracked.keep("m", cap, y)
    assert set(y[keep].tolist()) == set(range(cap))
    again = tracked.keep("m", cap, np.arange(10))  # full: no new class admitted
    assert set(np.arange(10)[again].tolist()) == set(range(cap))
