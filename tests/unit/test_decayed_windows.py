"""Decayed windows (window_mode = "decayed") on MemoryStore against the float64 reference.

Each test feeds partials as ingestion writes them, moves a simulated clock, and compares what
the store presents with `decayed_reference`, computed from the raw samples with one explicit
weight per sample. The reference itself is checked first (equal weights, tau -> infinity).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from brute_force import brute_force_metrics
from decayed_reference import (
    Feed,
    Part,
    Reference,
    assert_presents,
    decayed_reference,
    presented_metrics,
    weights,
)

from monitor.metrics import compute_metrics
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, maintain_model, window_stats
from monitor.stats import CollapseStats, RFFConfig
from monitor.stats.fields import to_fields
from monitor.store.base import BucketPolicy, bucket_state, window_state
from monitor.store.memory import MemoryStore

VOCAB, DIM = 200, 16
RFF = RFFConfig(dim=DIM, features=32, bandwidths=(20.0,), seed=3)
T0 = 1_800_000_000  # a multiple of every bucket length below
POLICY = BucketPolicy(
    fine_seconds=60,
    coarse_seconds=600,
    fine_retention=3600,
    coarse_retention=3 * 3600,
    windows=(("10m", 600), ("1h", 3600)),
    window_mode="decayed",
)
EXACT = replace(POLICY, window_mode="exact")


class Traffic:
    """Zipf-ish labels; class means of norm 10-50 that drift over time; unit noise."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        base = self.rng.normal(size=(VOCAB, DIM))
        norms = self.rng.uniform(10.0, 50.0, size=(VOCAB, 1))
        self.means = base / np.linalg.norm(base, axis=1, keepdims=True) * norms
        self.drift = self.rng.normal(scale=0.5, size=(VOCAB, DIM))  # per hour
        p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
        self.p = p / p.sum()

    def part(self, ts: float, rows: int, labels: np.ndarray | None = None) -> Part:
        y = self.rng.choice(VOCAB, size=rows, p=self.p) if labels is None else labels
        hours = (ts - T0) / 3600.0
        x = self.means[y] + hours * self.drift[y] + self.rng.normal(size=(len(y), DIM))
        hits = int(self.rng.binomial(len(y), 0.8))
        return Part(x, y, POLICY.start("fine", ts), hits, len(y))


class Sim(Feed):
    """A MemoryStore on a simulated clock, its windows made at T0 before any data."""

    def __init__(self, policy: BucketPolicy = POLICY, second: bool = True) -> None:
        self.now = float(T0)
        super().__init__(MemoryStore(policy, clock=lambda: self.now), vocab=VOCAB, rff=RFF,
                         second=second)  # fmt: skip
        self.maintain(self.now)

    def stats(self, label: str) -> CollapseStats | None:
        self.compact()  # pending partials are in no window yet
        stats: CollapseStats | None = self.read(label, self.now).stats
        return stats

    def ref(self, label: str) -> Reference:
        return self.reference(label, self.now)


def assert_metrics(stats: CollapseStats, ref: Reference, classifier: np.ndarray) -> None:
    got = compute_metrics(stats, classifier).as_dict()
    want = presented_metrics(ref, classifier)
    assert {"nc1_cdnv", "nc1_cdnv_unbiased"} <= set(want)
    bad = []
    for key, w in want.items():
        g = got[key]
        # The spectral keys go through an eigendecomposition / pseudo-inverse: 1e-7.
        rel = 1e-7 if key in ("effective_rank", "nc1_trace_ratio") else 1e-9
        if (w is None) != (g is None) or (
            w is not None
            and g is not None
            and not math.isclose(float(g), float(w), rel_tol=rel, abs_tol=1e-12)
        ):
            bad.append(f"{key}: got {g!r}, reference {w!r}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ the reference itself
def test_reference_with_equal_weights_is_the_plain_statistics() -> None:
    traffic = Traffic(0)
    parts = [traffic.part(T0 + 5.0 * i, 80) for i in range(6)]  # one fine bucket
    ref = decayed_reference(parts, T0 + 50.0, 300.0)
    x = np.concatenate([p.features for p in parts])
    y = np.concatenate([p.labels for p in parts])
    ids, counts = np.unique(y, return_counts=True)
    assert ref.ids.tolist() == ids.tolist()
    assert ref.counts.tolist() == counts.tolist()
    assert ref.sample_count == len(y)
    for k, c in enumerate(ids):
        rows = x[y == c]
        np.testing.assert_allclose(ref.sums[k], rows.sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ref.sq_norms[k], np.sum(rows**2), rtol=1e-12)
        var = np.mean(np.sum((rows - rows.mean(0)) ** 2, axis=1))
        np.testing.assert_allclose(ref.variances[k], var, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ref.second, x.T @ x, rtol=1e-12)
    assert ref.unit_count == len(y)
    assert ref.nc4_total == sum(p.nc4_total for p in parts)
    assert ref.nc4_hits == sum(p.nc4_hits for p in parts)
    # The oracle's metrics of the raw samples are the presented metrics (every sample, all
    # classes members: anisotropy, effective rank and trace ratio included).
    oracle = brute_force_metrics(x, y)
    for key, value in presented_metrics(ref).items():
        if key in oracle and key != "nc4_ncc_agreement":
            assert value == pytest.approx(oracle[key], rel=1e-8, abs=1e-12), key


def test_reference_as_tau_grows_tends_to_the_plain_statistics() -> None:
    traffic = Traffic(1)
    parts = [traffic.part(T0 + 60.0 * i, 60) for i in range(30)]
    x = np.concatenate([p.features for p in parts])
    y = np.concatenate([p.labels for p in parts])
    t = T0 + 1800.0
    near = decayed_reference(parts, t, 1e12)
    ids, counts = np.unique(y, return_counts=True)
    assert near.counts.tolist() == counts.tolist()
    plain = np.array([x[y == c].mean(axis=0) for c in ids])
    np.testing.assert_allclose(near.means, plain, rtol=0, atol=1e-8 * float(np.abs(plain).max()))
    # A short tau weighs recent data more, and has fewer effective samples (Kish).
    short = decayed_reference(parts, t, 300.0)
    w = weights(np.concatenate([np.full(60, p.bucket) for p in parts]), t, 300.0)
    c = int(ids[np.argmax(counts)])
    mine = y == c
    want = (w[mine, None] * x[mine]).sum(0) / w[mine].sum()
    np.testing.assert_allclose(short.means[list(short.ids).index(c)], want, rtol=1e-12)
    assert short.sample_count < near.sample_count


# ------------------------------------------------------------------ the store vs the reference
def test_presented_windows_follow_the_reference_over_three_hours() -> None:
    sim, traffic = Sim(), Traffic(2)
    classifier = np.random.default_rng(9).normal(size=(VOCAB, DIM))
    rng = np.random.default_rng(3)
    checks = 0
    for step in range(1, 181):  # 3 h of one-minute steps: three lengths of the longest window
        sim.now = T0 + 60.0 * step + 37.0
        for _ in range(int(rng.integers(1, 3))):
            lag = float(rng.choice([0, 0, 0, 60, 180]))  # some arrive a few buckets late
            ts = max(sim.now - lag - rng.uniform(0.0, 30.0), float(T0))
            sim.put(traffic.part(ts, int(rng.integers(20, 60))), ts)
        if step % 3 == 0:
            sim.compact()
        if step % 4 == 0:
            sim.maintain(sim.now)  # beat's maintenance in between
        if step % 25 == 0:
            for label in ("10m", "1h"):
                stats = sim.stats(label)
                ref = sim.ref(label)
                assert sim.read(label, sim.now).cut == ()  # no buckets with rows: no jackknife
                assert stats is not None
                assert_presents(stats, ref)
                assert_metrics(stats, ref, classifier)
                checks += 1
            seen = np.unique(np.concatenate([p.labels for p in sim.parts]))
            assert len(sim.ref("10m").ids) < len(seen)  # membership is exercised
    assert checks == 14
    assert sim.pruned > 0  # and so is maintenance's deletion of rows


def test_equal_weights_present_exactly_the_exact_window() -> None:
    decayed, exact = Sim(), Sim(EXACT)
    traffic = Traffic(4)
    for i in range(8):  # all in the fine bucket [T0, T0 + 60)
        part = traffic.part(T0 + 7.0 * i, 90)
        decayed.put(part, T0 + 7.0 * i)
        exact.put(part, T0 + 7.0 * i)
    decayed.now = exact.now = T0 + 59.0
    classifier = np.random.default_rng(5).normal(size=(VOCAB, DIM))
    for label in ("10m", "1h"):
        a, b = decayed.stats(label), exact.stats(label)
        assert a is not None
        assert b is not None
        ca, cb = a.classes(), b.classes()
        assert ca.class_ids.tolist() == cb.class_ids.tolist()
        assert ca.counts.tolist() == cb.counts.tolist()
        assert (a.sample_count, a.unit_count, a.nc4_hits, a.nc4_total) == (
            b.sample_count, b.unit_count, b.nc4_hits, b.nc4_total)  # fmt: skip
        pairs = [(ca.sums, cb.sums), (ca.sq_norms, cb.sq_norms), (a.unit_sum, b.unit_sum),
                 (a.second, b.second), (a.rff_sum, b.rff_sum)]  # fmt: skip
        for got, want in pairs:
            assert got is not None
            assert want is not None
            scale = float(want.abs().max())
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-9 * scale)
        assert a.rff_sq == pytest.approx(b.rff_sq, rel=1e-9)
        ma, mb = compute_metrics(a, classifier).as_dict(), compute_metrics(b, classifier).as_dict()
        assert ma.keys() == mb.keys()
        for key, value in mb.items():
            if value is None:
                assert ma[key] is None, key
            else:
                assert ma[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_class_seen_once_leaves_after_about_s_and_maintenance_deletes_its_row() -> None:
    sim, traffic = Sim(replace(POLICY, windows=(("1h", 3600),)), second=False), Traffic(6)
    rare, frequent = 150, 3
    state, row = window_state("1h"), str(rare).encode()
    sim.put(traffic.part(T0 + 5.0, 1, np.array([rare])), T0 + 5.0)  # weight 1 at b = T0
    # The frequent class gets data every minute. No maintenance runs until t1, more than
    # tau/2 after the window was made, so a prune pass is due exactly at t1.
    for minute in range(60):
        ts = T0 + 60.0 * minute + 11.0
        sim.put(traffic.part(ts, 4, np.full(4, frequent)), ts)
    sim.now = t1 = T0 + 3600.0 - 10.0  # the rare sample weighs exp(-3590/1800) > eps
    stats = sim.stats("1h")
    size = sim.store.state_size("m", state)
    assert stats is not None
    assert stats.count_of(rare) == 1
    assert_presents(stats, sim.ref("1h"))
    # 30 s later it weighs exp(-3620/1800) < eps: out of the read, although no prune pass
    # ran since t1 (tau/2 = 900 s) and its row is still stored.
    sim.now = t1 + 30.0
    stats = sim.stats("1h")
    assert stats is not None
    assert stats.count_of(rare) == 0
    assert stats.count_of(frequent) > 0
    assert_presents(stats, sim.ref("1h"))
    assert sim.store.state_field("m", state, row) is not None
    assert sim.store.state_size("m", state) == size
    # Past the next prune pass maintenance deleted the row; the frequent class stays.
    for minute in range(60, 66):
        ts = T0 + 60.0 * minute + 11.0
        sim.put(traffic.part(ts, 4, np.full(4, frequent)), ts)
    sim.compact()
    sim.now = t1 + 960.0
    sim.maintain(sim.now)
    assert sim.store.state_field("m", state, row) is None
    assert sim.store.state_size("m", state) == size - 1
    stats = sim.stats("1h")
    assert stats is not None
    assert stats.count_of(frequent) > 0
    assert_presents(stats, sim.ref("1h"))


def test_late_data_is_weighted_by_its_bucket_whatever_the_compaction_order() -> None:
    traffic = Traffic(7)
    labels = np.arange(0, 40).repeat(3)  # the same classes in every part
    times = [T0 + 903.0, T0 + 129.0, T0 + 601.0, T0 + 1502.0, T0 + 64.0]
    parts = [traffic.part(ts, len(labels), labels) for ts in times]
    orders = [[0, 1, 2, 3, 4], [3, 0, 2, 1, 4], [4, 1, 2, 0, 3], []]  # [] = one compaction
    presented: list[CollapseStats] = []
    for order in orders:
        sim = Sim()
        for i in order:  # one compaction per part: a late part meets rows anchored later
            sim.now = max(sim.now, times[i])
            sim.put(parts[i], times[i], batch_id=f"p{i}")
            sim.compact()
        for i in [] if order else range(len(parts)):
            sim.put(parts[i], times[i], batch_id=f"p{i}")
        sim.now = T0 + 1817.0
        for label in ("10m", "1h"):
            stats = sim.stats(label)
            assert stats is not None
            assert_presents(stats, sim.ref(label))
            presented.append(stats)
    for a, b in zip(presented[2:], presented, strict=False):  # the same window, other orders
        assert a.classes().counts.tolist() == b.classes().counts.tolist()
        np.testing.assert_allclose(a.classes().sums.numpy(), b.classes().sums.numpy(), rtol=1e-9)


def test_stored_rows_are_anchored_and_buckets_keep_only_g() -> None:
    from monitor.stats.decayed import DECAYED_FORMAT, time_constant
    from monitor.stats.fields import GLOBAL_FIELD, Globals

    assert time_constant(3600) == 1800.0
    sim, traffic = Sim(), Traffic(8)
    for i in range(12):
        sim.now = ts = T0 + 130.0 * i + 3.0
        sim.put(traffic.part(ts, 50), ts)
    sim.now = T0 + 1700.0
    assert sim.stats("1h") is not None
    ref, store, tau = sim.ref("1h"), sim.store, 1800.0
    g = store.state_field("m", window_state("1h"), GLOBAL_FIELD)
    assert g is not None
    assert DECAYED_FORMAT.encode() in g
    dtype = np.dtype([("a", "<f8"), ("w", "<f8"), ("v", "<f8"), ("q", "<f8"), ("s", "<f8", (DIM,))])
    assert dtype.itemsize == 32 + 8 * DIM
    for k, c in enumerate(ref.all_ids):
        value = store.state_field("m", window_state("1h"), str(int(c)).encode())
        assert value is not None
        assert len(value) == dtype.itemsize
        r = np.frombuffer(value, dtype=dtype)[0]
        assert r["a"] == max(p.bucket for p in sim.parts if c in p.labels)  # its newest data
        f = math.exp(-(sim.now - r["a"]) / tau)
        assert r["w"] * f == pytest.approx(ref.class_weight[k], rel=1e-12)
        assert r["v"] * f * f == pytest.approx(ref.class_weight_sq[k], rel=1e-12)
        assert r["q"] * f == pytest.approx(ref.class_sq_w[k], rel=1e-12)
        np.testing.assert_allclose(r["s"] * f, ref.class_sum_w[k], rtol=1e-12)
    # Buckets keep only their ordinary globals (raw sample counts: MMD calibration).
    for level in ("fine", "coarse"):
        starts = store.bucket_starts("m", level)
        assert starts
        total = 0
        for start in starts:
            assert store.state_size("m", bucket_state(level, start)) == 1
            blob = store.state_field("m", bucket_state(level, start), GLOBAL_FIELD)
            assert blob is not None
            total += Globals.decode(blob).sample_count
        assert total == sum(len(p.labels) for p in sim.parts)


def test_the_periodic_rebuild_does_not_reset_a_decayed_window() -> None:
    sim, traffic = Sim(replace(POLICY, rebuild_seconds=600)), Traffic(10)  # exact: every 10 min
    for minute in range(45):
        sim.now = T0 + 60.0 * minute + 20.0
        sim.put(traffic.part(sim.now, 30), sim.now)
        if minute % 5 == 0:
            sim.compact()
            sim.maintain(sim.now)
    sim.now += 30.0
    assert_presents(sim.stats("1h"), sim.ref("1h"))


# ------------------------------------------------------------ evaluator and baselines
AGES = [130.0 + 300.0 * i for i in range(10)]  # ten settled 5-minute buckets within the hour


def runtime_with_traffic(tmp_path: Path, mode: str, now: float) -> tuple[Runtime, list[Part]]:
    """An embedded runtime (default 5-minute buckets) fed one batch per age before `now`
    through the ingestor, compacted; and the parts as the reference sees them (the float32
    features as sent, their 5-minute buckets)."""
    from monitor.config import Settings
    from monitor.pipeline.payload import encode_batch

    head = tmp_path / "head.npy"
    np.save(head, np.random.default_rng(11).normal(size=(VOCAB, DIM)))
    model = {"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True,
             "classifier_path": str(head)}  # fmt: skip
    settings = Settings(models=[model], windows={"15m": 900, "1h": 3600},
                        window_mode=mode, stderr_interval=0)  # fmt: skip
    runtime = Runtime(settings)
    length = runtime.store.policy.fine_seconds
    maintain_model(runtime.store, "m", now - max(AGES) - 1)
    traffic, parts = Traffic(12), []
    for i, age in enumerate(AGES):
        p = traffic.part(now - age, 150)
        x = p.features.astype(np.float32)
        nc4 = (p.nc4_hits, p.nc4_total)
        runtime.ingestor.ingest(encode_batch("m", x, p.labels, batch_id=f"e{i}", ts=now - age,
                                             nc4=nc4), now=now)  # fmt: skip
        bucket = int((now - age) // length) * length
        parts.append(Part(x.astype(np.float64), p.labels, bucket, p.nc4_hits, p.nc4_total))
    compact_model(runtime.store, "m")
    return runtime, parts


@pytest.mark.parametrize("mode", ["decayed", "exact"])
def test_decayed_snapshots_carry_no_traffic_stderrs(tmp_path: Path, mode: str) -> None:
    from monitor.evaluate.evaluator import Evaluator

    now = time.time()
    runtime, _ = runtime_with_traffic(tmp_path, mode, now)
    read = window_stats(runtime.store, "m", "1h", 3600, now=now)
    hour = {s.window: s for s in Evaluator(runtime).evaluate_model("m", now=now)}["1h"]
    assert hour.ok
    stderrs = [k for k in hour.metrics if k.endswith("_traffic_stderr")]
    if mode == "decayed":
        assert read.cut == ()
        assert stderrs == []
    else:  # the control: the same traffic in exact mode gets its jackknife
        assert read.cut
        assert [k for k in stderrs if hour.metrics[k] is not None]


def test_a_baseline_pinned_from_a_decayed_window_is_its_presented_state(tmp_path: Path) -> None:
    from monitor.pipeline.baselines import decode_calibration, load_baseline, pin_window
    from monitor.stats.fields import GLOBAL_FIELD, Globals

    runtime, parts = runtime_with_traffic(tmp_path, "decayed", time.time())
    store = runtime.store
    pin_window(store, runtime.registry, "m", "ref", "1h", 3600)
    window = window_stats(store, "m", "1h", 3600).stats
    base, meta = load_baseline(store, runtime.registry, "m", "ref")
    # The presentation does not depend on when it is read while no class crosses eps (a common
    # factor cancels): the baseline, the window now and the reference now agree.
    ref = decayed_reference(parts, time.time(), 1800.0)
    assert ref.membership_margin() > 1e-3
    assert_presents(base, ref)
    assert_presents(window, ref)
    assert (meta["sample_count"], meta["class_count"]) == (ref.sample_count, len(ref.ids))
    found = store.baseline("m", "ref")  # an ordinary state: exact-format globals and rows
    assert found is not None
    g = Globals.decode(store.state_field("m", found.state, GLOBAL_FIELD) or b"")
    assert g.sample_count == ref.sample_count
    assert store.state_size("m", found.state) == g.non_row_fields() + len(ref.ids)
    # MMD calibration from the buckets' globals as in exact mode: raw counts per bucket.
    per_bucket: dict[int, int] = {}
    for p in parts:
        per_bucket[p.bucket] = per_bucket.get(p.bucket, 0) + len(p.labels)
    counts = [b.count for b in decode_calibration(found.calibration)]
    assert sorted(counts) == sorted(per_bucket.values())


@pytest.mark.parametrize(("before", "after"), [(EXACT, POLICY), (POLICY, EXACT)])
def test_the_first_compaction_after_a_mode_switch_loses_nothing(
    before: BucketPolicy, after: BucketPolicy
) -> None:
    """Compaction adds only to windows of the current mode: right after a switch (no
    maintenance yet) it must restart the windows first, or its data would reach only the
    buckets that the restart then drops."""
    rng = np.random.default_rng(9)

    def batch(n: int) -> dict[bytes, bytes]:
        stats = CollapseStats(VOCAB, DIM)
        stats.update(rng.normal(size=(n, DIM)), rng.integers(0, VOCAB, n))
        return to_fields(stats)

    store = MemoryStore(before, clock=lambda: T0 + 30.0)
    store.put_partial("m", "old", batch(50), T0 + 1.0, 50)
    compact_model(store, "m")
    assert window_stats(store, "m", "10m", 600, now=T0 + 30.0).stats is not None
    store.policy = after  # the workers restarted with the other mode
    store.put_partial("m", "new", batch(40), T0 + 2.0, 40)
    compact_model(store, "m")  # no maintenance in between
    current = window_stats(store, "m", "10m", 600, now=T0 + 30.0).stats
    assert current is not None
    assert current.sample_count == 40  # the new batch, and only it: the windows restarted


@pytest.mark.parametrize("policy", [POLICY, EXACT])
def test_status_summary_names_the_mode_and_counts_effective_samples(policy: BucketPolicy) -> None:
    """`status` reads only globals: a decayed window's samples are Kish's effective count
    (sum w)^2 / sum w^2 over its samples, an exact one's the number of samples; the classes
    are its rows."""
    from monitor.pipeline.windows import window_summary

    rng = np.random.default_rng(3)
    store = MemoryStore(policy, clock=time.time)
    now = time.time()
    sizes = {now - 1.0: 70, now - 241.0: 30}  # two fine buckets, 4 minutes apart
    labels = set()
    for i, (ts, n) in enumerate(sizes.items()):
        stats = CollapseStats(VOCAB, DIM)
        y = rng.integers(0, 12, n)
        labels.update(y.tolist())
        stats.update(rng.normal(size=(n, DIM)), y)
        store.put_partial("m", f"b{i}", to_fields(stats), ts, n)
    compact_model(store, "m")
    summary = window_summary(store, "m", "10m", 600)
    assert summary.mode == policy.window_mode
    assert summary.class_count == len(labels)
    if policy.window_mode == "exact":
        assert summary.sample_count == 100
        return
    newest = max(policy.start("fine", ts) for ts in sizes)
    w = {ts: math.exp(-(newest - policy.start("fine", ts)) / 300.0) for ts in sizes}
    kish = sum(w[t] * n for t, n in sizes.items()) ** 2 / sum(
        w[t] ** 2 * n for t, n in sizes.items()
    )
    assert summary.sample_count == round(kish) < 100
