"""Standard errors from traffic against a real redis-server: the window is the sum of its
buckets, an evaluation writes `*_traffic_stderr` and `drift_*_ratio_stderr`, the exporter shows
them, and they are absent (not 0) when turned off or when the window has one bucket."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import RedisServer

from monitor.config import Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.exporter.collector import CollapseCollector
from monitor.metrics.drift import RATIO_KEYS, RATIO_SOURCE
from monitor.metrics.engine import ClassPairs
from monitor.metrics.replicates import PAIR_KEYS, REPLICATE_KEYS
from monitor.metrics.report import ALERT_STDERR_KEYS
from monitor.pipeline.baselines import TRAFFIC_STDERR_META, pin_window
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import (
    BucketChanged,
    BucketGroup,
    changed_buckets,
    compact_model,
    group_parts,
    maintain_model,
    read_state,
    window_stats,
)
from monitor.snapshot import Snapshot
from monitor.stats import CollapseStats
from monitor.stats.fields import Globals

VOCAB, DIM = 40, 8
TRAFFIC = [f"{k}_traffic_stderr" for k in ALERT_STDERR_KEYS]
RATIO_STDERR = [f"drift_{k}_ratio_stderr" for k in RATIO_KEYS]
MEANS = np.random.default_rng(0).normal(size=(VOCAB, DIM)) * 3


def make_runtime(server: RedisServer, tmp_path: Path, **extra: Any) -> Runtime:
    head = tmp_path / "head.npy"
    np.save(head, MEANS + np.random.default_rng(1).normal(size=(VOCAB, DIM)))
    model = {
        "name": "m",
        "vocab_size": VOCAB,
        "dim": DIM,
        "second_moment": True,
        "classifier_path": str(head),
    }
    return Runtime(Settings(redis_url=server.url, models=[model], **extra))  # type: ignore[arg-type]


def feed(runtime: Runtime, ages: list[float], prefix: str, now: float, rows: int = 200) -> None:
    """One batch per age (seconds before `now`), with NC4 counts, compacted."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    for i, age in enumerate(ages):
        y = rng.integers(0, VOCAB, rows)
        x = (MEANS[y] + rng.normal(size=(rows, DIM))).astype(np.float32)
        hits = int(rng.binomial(rows, 0.9))
        payload = encode_batch("m", x, y, batch_id=f"{prefix}{i}", ts=now - age, nc4=(hits, rows))
        runtime.ingestor.ingest(payload)
    compact_model(runtime.store, "m")


def gauges(runtime: Runtime) -> dict[tuple[str, str], float]:
    """(metric name, window) -> value of model m's gauges on a scrape."""
    registry = CollectorRegistry()
    registry.register(CollapseCollector.for_settings(runtime.store, runtime.settings))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.labels.get("model") == "m" and "window" in sample.labels:
                out[(sample.name, sample.labels["window"])] = sample.value
    return out


def by_window(snapshots: list[Snapshot]) -> dict[str, Snapshot]:
    return {s.window: s for s in snapshots}


def test_window_is_the_sum_of_its_buckets_and_late_data_is_noticed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    runtime = make_runtime(redis_server, tmp_path)
    store, now = runtime.store, time.time()
    feed(runtime, [60.0 * a for a in (2, 7, 12, 17, 22, 40)], "w", now, rows=60)
    later = now + 600  # the 15m window slides: its oldest buckets are subtracted
    maintain_model(store, "m", later)
    for window, seconds in (("15m", 900), ("1h", 3600)):
        read = window_stats(store, "m", window, seconds, now=later)
        assert read.stats is not None
        assert read.cut, window
        parts = [read_state(store, "m", cut.state) for cut in read.cut]
        assert [p.sample_count if p else 0 for p in parts] == [c.sample_count for c in read.cut]
        total = CollapseStats.merged([p for p in parts if p is not None])
        got, want = read.stats.classes(), total.classes()
        assert read.stats.sample_count == total.sample_count
        assert (read.stats.nc4_hits, read.stats.nc4_total) == (total.nc4_hits, total.nc4_total)
        assert torch.equal(got.class_ids, want.class_ids)
        assert torch.equal(got.counts, want.counts)
        torch.testing.assert_close(got.sums, want.sums, rtol=1e-9, atol=1e-9)
        assert read.stats.second is not None
        assert total.second is not None
        torch.testing.assert_close(read.stats.second, total.second, rtol=1e-9, atol=1e-9)
        assert read.stats.rff_sum is not None
        assert total.rff_sum is not None
        torch.testing.assert_close(read.stats.rff_sum, total.rff_sum, rtol=1e-9, atol=1e-9)
    short = window_stats(store, "m", "15m", 900, now=later)
    assert len(short.cut) < len(window_stats(store, "m", "1h", 3600, now=later).cut)

    # Late data into a bucket the window holds: its stamp no longer matches.
    hour = window_stats(store, "m", "1h", 3600, now=now)
    oldest = hour.cut[0]
    assert changed_buckets(store, "m", hour.cut) == set()
    feed(runtime, [now - oldest.start - 1.0], "late", now, rows=5)
    assert changed_buckets(store, "m", hour.cut) == {oldest.state}
    with pytest.raises(BucketChanged):
        list(group_parts(store, "m", [oldest]))
    assert len(list(group_parts(store, "m", hour.cut[1:2]))) >= 3  # globals, rows, blocks

    # A jackknife group leaves a changed bucket out at its first read, then insists on the rest.
    group = BucketGroup(store, "m", hour.cut[:2])
    first = [p.sample_count for p in group() if isinstance(p, Globals)]
    assert first == [hour.cut[1].sample_count]
    assert [p.sample_count for p in group() if isinstance(p, Globals)] == first
    feed(runtime, [now - hour.cut[1].start - 1.0], "later", now, rows=5)
    with pytest.raises(BucketChanged):
        list(group())


def test_late_data_during_the_jackknife_drops_its_stderrs_not_the_snapshot(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(redis_server, tmp_path, windows={"1h": 3600})
    now = time.time()
    feed(runtime, [300.0 * i + 400.0 for i in range(10)], "a", now)
    oldest = window_stats(runtime.store, "m", "1h", 3600, now=now).cut[0]
    replicate = Evaluator._replicate_metrics
    calls: list[int] = []

    def late(self: Evaluator, stats: CollapseStats, *args: Any) -> Any:
        if not calls:  # while the oldest group is out of the window: data lands in it
            feed(runtime, [now - oldest.start - 1.0], "late", now, rows=5)
        calls.append(1)
        return replicate(self, stats, *args)

    monkeypatch.setattr(Evaluator, "_replicate_metrics", late)
    evaluator = Evaluator(runtime)
    snap = evaluator.evaluate_model("m", now=now)[0]
    assert calls == [1]  # abandoned when the group was added back
    assert snap.ok
    assert snap.metrics["nc1_cdnv_unbiased"] is not None
    assert not [k for k in snap.metrics if k.endswith("_traffic_stderr")]
    stored = runtime.store.snapshot("m", "1h")
    assert stored is not None
    assert Snapshot.from_json(stored) == snap
    again = evaluator.evaluate_model("m", now=now)[0]  # the next evaluation has them again
    assert again.metrics.get("nc1_cdnv_unbiased_traffic_stderr") is not None


def test_evaluation_writes_traffic_and_ratio_stderrs_that_the_exporter_shows(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    runtime = make_runtime(redis_server, tmp_path)
    now = time.time()
    # Ten fine buckets of the 1h window, all settled (ended minutes ago).
    feed(runtime, [300.0 * i + 400.0 for i in range(10)], "a", now)
    evaluator = Evaluator(runtime)
    first = by_window(evaluator.evaluate_model("m", now=time.time()))["1h"]
    assert first.ok
    for key in TRAFFIC:
        value = first.metrics.get(key)
        assert value is not None, key
        assert 0 < value < math.inf, key
    # Two stderrs per metric from one window's buckets: about the size of a value's spread.
    rel = first.metrics["nc1_cdnv_unbiased_traffic_stderr"] / first.metrics["nc1_cdnv_unbiased"]  # type: ignore[operator]
    assert 1e-4 < rel < 0.5

    meta = pin_window(runtime.store, runtime.registry, "m", "ref", "1h", 3600)
    pinned = meta[TRAFFIC_STDERR_META]
    assert isinstance(pinned, dict)
    assert pinned["nc1_cdnv_unbiased"] == pytest.approx(
        first.metrics["nc1_cdnv_unbiased_traffic_stderr"]
    )
    second = by_window(evaluator.evaluate_model("m", now=time.time()))["1h"]
    assert second.baseline is not None
    assert second.baseline["name"] == "ref"
    written = 0
    for key in RATIO_KEYS:
        ratio, stderr = (
            second.metrics.get(f"drift_{key}_ratio"),
            second.metrics.get(f"drift_{key}_ratio_stderr"),
        )
        if ratio is None:  # a guarded ratio: no stderr either
            assert stderr is None, key
            continue
        src = RATIO_SOURCE[key]
        w, se_w = second.metrics[src], second.metrics[f"{src}_traffic_stderr"]
        assert w is not None
        assert se_w is not None
        b, se_b = w, pinned[src]  # the window is its own baseline
        expected = abs(ratio) * math.hypot(se_w / w, se_b / b)
        assert stderr == pytest.approx(expected, rel=1e-6), key
        written += 1
    assert written >= 2  # nc1_cdnv (never guarded) and at least one more

    stored = runtime.store.snapshot("m", "1h")
    assert stored is not None
    assert Snapshot.from_json(stored).metrics == second.metrics
    shown = gauges(runtime)
    for key in TRAFFIC + [k for k in RATIO_STDERR if second.metrics.get(k) is not None]:
        assert shown[(f"collapse_{key}", "1h")] == pytest.approx(second.metrics[key]), key


def test_stderr_groups_0_turns_them_off(redis_server: RedisServer, tmp_path: Path) -> None:
    runtime = make_runtime(redis_server, tmp_path, stderr_groups=0)
    feed(runtime, [300.0 * i + 400.0 for i in range(6)], "off", time.time())
    snap = by_window(Evaluator(runtime).evaluate_model("m"))["1h"]
    assert snap.ok
    assert snap.metrics["nc1_cdnv_unbiased"] is not None
    assert not [k for k in snap.metrics if k.endswith("_traffic_stderr")]
    assert not [k for k in gauges(runtime) if k[0].endswith("_traffic_stderr")]


def test_a_window_of_one_bucket_has_no_stderrs(redis_server: RedisServer, tmp_path: Path) -> None:
    """Nothing to delete a group from: the keys are absent, not 0."""
    runtime = make_runtime(redis_server, tmp_path)
    now = time.time()
    start = int(now - 900) // 300 * 300  # one settled fine bucket, three batches in it
    feed(runtime, [now - (start + s) for s in (10.0, 20.0, 30.0)], "one", now)
    snaps = by_window(Evaluator(runtime).evaluate_model("m"))
    assert snaps["1h"].ok
    assert snaps["1h"].metrics["nc1_cdnv_unbiased"] is not None
    for snap in snaps.values():
        assert not [k for k in snap.metrics if k.endswith("_traffic_stderr")], snap.window
        assert not [k for k in snap.metrics if k.startswith("drift_") and k.endswith("_stderr")]
    assert not [k for k in gauges(runtime) if "traffic_stderr" in k[0]]


def count_replicates(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[ClassPairs | None, tuple[str, ...]]]:
    """Every `_replicate_metrics` call's (pairs, keys), in order."""
    calls: list[tuple[ClassPairs | None, tuple[str, ...]]] = []
    compute = Evaluator._replicate_metrics

    def counted(self: Evaluator, stats: CollapseStats, pairs: Any, keys: Any) -> Any:
        calls.append((pairs, tuple(keys)))
        return compute(self, stats, pairs, keys)

    monkeypatch.setattr(Evaluator, "_replicate_metrics", counted)
    return calls


def test_stderrs_are_carried_between_jackknifes_scaled_by_volume(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within stderr_interval the last jackknife's relative errors are carried, scaled by
    sqrt(N_then / N_now); after it, a new jackknife."""
    runtime = make_runtime(redis_server, tmp_path, windows={"1h": 3600}, stderr_interval=600)
    calls = count_replicates(monkeypatch)
    now = time.time() - 1200
    feed(runtime, [300.0 * i + 400.0 for i in range(6)], "a", now)
    evaluator = Evaluator(runtime)
    first = evaluator.evaluate_model("m", now=now)[0]
    assert len(calls) == 6  # a jackknife: 6 settled buckets, one replicate each
    feed(runtime, [10.0, 20.0], "b", now + 60)  # more samples, in the open bucket
    second = evaluator.evaluate_model("m", now=now + 60)[0]
    assert len(calls) == 6  # carried: no replicate computed
    n_then, n_now = first.sample_count, second.sample_count
    assert n_now > n_then
    for key in ALERT_STDERR_KEYS:
        then, value = first.metrics[key], second.metrics[key]
        se_then = first.metrics[f"{key}_traffic_stderr"]
        assert isinstance(then, float)
        assert isinstance(value, float)
        assert se_then is not None
        size = (n_then, n_now)
        if key == "nc4_ncc_agreement":
            size = (6 * 200, 8 * 200)  # the NC4 totals: every batch counted all its rows
        want = se_then / abs(then) * abs(value) * math.sqrt(size[0] / size[1])
        assert second.metrics[f"{key}_traffic_stderr"] == pytest.approx(want, rel=1e-9), key
    third = evaluator.evaluate_model("m", now=now + 601)[0]
    # The interval has passed: a jackknife, with b's bucket settled (7 groups, or 8 when the
    # wall clock puts a bucket boundary between b's two batches).
    groups = len(calls) - 6
    assert groups in (7, 8)
    assert third.metrics["effective_rank_traffic_stderr"] is not None
    # stderr_interval = 0: a jackknife at every evaluation.
    every = Evaluator(make_runtime(redis_server, tmp_path, windows={"1h": 3600}, stderr_interval=0))
    every.evaluate_model("m", now=now + 602)
    every.evaluate_model("m", now=now + 603)
    assert len(calls) == 6 + 3 * groups


def test_replicates_of_a_sampled_window_share_one_draw_of_pairs(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window whose pairs are sampled (K above max_exact_classes): one draw of
    stderr_pair_samples pairs, by class id, serves the window's reference value and every
    replicate. An exact window's replicates walk every pair."""
    runtime = make_runtime(redis_server, tmp_path, windows={"1h": 3600})
    calls = count_replicates(monkeypatch)
    now = time.time()
    feed(runtime, [300.0 * i + 400.0 for i in range(5)], "a", now)
    exact = Evaluator(runtime).evaluate_model("m", now=now)[0]
    assert calls == [(None, REPLICATE_KEYS)] * 5
    calls.clear()
    sampled = make_runtime(
        redis_server,
        tmp_path,
        windows={"1h": 3600},
        max_exact_classes=10,
        pair_samples=5_000,
        stderr_pair_samples=100,
    )
    shared = Evaluator(sampled).evaluate_model("m", now=now)[0]
    assert shared.metrics["nc1_cdnv_unbiased_stderr"] is not None  # the window's pairs: sampled
    assert len(calls) == 6  # the window's value on the shared pairs, then 5 replicates
    pairs, keys = calls[0]
    assert isinstance(pairs, ClassPairs)
    assert len(pairs) == 100
    assert keys == PAIR_KEYS
    assert all(p is pairs and k == REPLICATE_KEYS for p, k in calls[1:])
    for key in ALERT_STDERR_KEYS:
        se = shared.metrics[f"{key}_traffic_stderr"]
        assert se is not None, key
        assert 0 < se < math.inf, key
        if key not in PAIR_KEYS:  # computed the same way: the same jackknife
            assert se == pytest.approx(exact.metrics[f"{key}_traffic_stderr"], rel=1e-9), key
