"""The delete-a-group jackknife behind `*_traffic_stderr`: against a brute force from raw samples,
and its coverage over many simulated windows of one unchanged model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import monitor.metrics.engine as engine
from monitor.errors import IncompatibleStats
from monitor.metrics import compute_metrics
from monitor.metrics.baseline import BaselineSummary
from monitor.metrics.engine import ClassPairs, draw_class_pairs
from monitor.metrics.jackknife import (
    Group,
    JackknifeResult,
    Part,
    SecondBlock,
    apply_part,
    deal_groups,
    group_stderr,
    jackknife,
    ratio_stderrs,
    traffic_stderrs,
)
from monitor.metrics.pairwise import PAIR_METRICS
from monitor.metrics.replicates import PAIR_KEYS, REPLICATE_KEYS, CarriedStderrs, alert_replicates
from monitor.metrics.report import ALERT_STDERR_KEYS, REPORT_KEYS, STDERR_KEYS
from monitor.stats import CollapseStats
from monitor.stats.fields import Globals, Rows, from_fields, to_fields

K, D = 24, 6
NC4 = "nc4_ncc_agreement"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: torch's thread pool costs more than it gives (10-20x on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Model:
    """One fixed model: Gaussian classes, Zipf-like traffic, a head that disagrees with the
    nearest class mean on a fraction of samples (NC4 < 1)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.means = rng.normal(size=(K, D)) * 2.0
        self.sigmas = 0.6 + rng.random(K)
        p = 1.0 / (1.0 + np.arange(K)) ** 0.7
        self.p = p / p.sum()
        self.head = self.means + rng.normal(size=(K, D)) * 0.8
        self.reference = self.means + rng.normal(size=(K, D)) * 0.2

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n samples: features (float64), labels, and per sample whether NCC = head."""
        y = rng.choice(K, size=n, p=self.p)
        x = self.means[y] + self.sigmas[y, None] * rng.normal(size=(n, D))
        ncc = ((x[:, None, :] - self.reference[None]) ** 2).sum(-1).argmin(1)
        hits = ncc == (x @ self.head.T).argmax(1)
        return x, y, hits


def stats_of(x: np.ndarray, y: np.ndarray, hits: np.ndarray) -> CollapseStats:
    stats = CollapseStats(K, D, second_moment=True)
    stats.update(torch.from_numpy(x), torch.from_numpy(y))
    stats.record_nc4(int(hits.sum()), int(hits.size))
    return stats


def parts_of(stats: CollapseStats) -> Iterator[Part]:
    """A bucket as the store streams it: globals, rows in two chunks, the second moment in two
    blocks (through the store's own field format)."""
    fields = to_fields(stats)
    g = Globals.decode(fields[b"g"])
    yield g
    ids, counts, sq, sums = stats.class_ids, stats.counts, stats.sq_norms, stats.sums
    half = max(1, ids.numel() // 2)
    for part in (slice(0, half), slice(half, None)):
        if ids[part].numel():
            yield Rows(
                ids[part].clone(), counts[part].clone(), sq[part].clone(), sums[part].clone()
            )
    assert stats.second is not None
    yield SecondBlock(0, stats.second[:2].clone())
    yield SecondBlock(2, stats.second[2:].clone())


def group_of(buckets: list[CollapseStats]) -> Group:
    parts = [p for b in buckets for p in parts_of(b)]  # the same parts at every read

    def read() -> Iterator[Part]:
        yield from parts

    return Group(read)


def evaluate(stats: CollapseStats) -> dict[str, float | int | None]:
    values = dict(compute_metrics(stats).as_dict())
    values[NC4] = stats.nc4_hits / stats.nc4_total if stats.nc4_total else None
    return values


def window_of(buckets: list[CollapseStats]) -> CollapseStats:
    # Through the field format, as the evaluator gets a window (rows in store order).
    return from_fields(to_fields(CollapseStats.merged(buckets)))


# --------------------------------------------------------------------------- pieces
def test_groups_are_consecutive_runs_balanced_by_samples() -> None:
    sizes = [10, 10, 40, 0, 10, 10, 10, 10]
    groups = deal_groups(sizes, 3)
    assert [i for g in groups for i in g] == [0, 1, 2, 4, 5, 6, 7]  # in order, empty left out
    # Cuts where the running count (10, 20, 60, 70, ...) is nearest 1/3 and 2/3 of 100.
    assert groups == [[0, 1], [2, 4], [5, 6, 7]]
    assert deal_groups([5, 5], 8) == [[0], [1]]  # fewer buckets than groups: one each
    assert deal_groups([0, 0], 4) == []
    assert deal_groups([3, 1, 1, 1, 1, 1], 2) == [[0, 1], [2, 3, 4, 5]]


def test_formula_is_the_textbook_one_for_equal_groups() -> None:
    rng = np.random.default_rng(1)
    full = 0.3
    reps = list(0.3 + 0.01 * rng.normal(size=8))
    mean = sum(reps) / 8
    textbook = math.sqrt(7 / 8 * sum((r - mean) ** 2 for r in reps))
    got = group_stderr(full, reps, [50] * 8, 400)
    assert got == pytest.approx(textbook, rel=1e-12)
    assert group_stderr(full, reps[:1], [50], 400) is None  # one group: no error
    assert group_stderr(full, [*reps[:7], None], [50] * 8, 400) is None
    assert group_stderr(None, reps, [50] * 8, 400) is None


def test_formula_is_unbiased_for_a_mean_with_unequal_groups_and_a_fixed_part() -> None:
    """For a mean, replicate g is the mean without group g; the se must be the between-group
    estimate sum_g m_g (xbar_g - xbar_D)^2 / ((G-1) N), where D is the deletable part."""
    rng = np.random.default_rng(2)
    sizes = [30, 80, 55, 120, 40]
    values = [rng.normal(size=m) for m in sizes]
    fixed = rng.normal(size=200)
    everything = np.concatenate([*values, fixed])
    n = everything.size
    reps = [
        float(np.concatenate([*(v for j, v in enumerate(values) if j != g), fixed]).mean())
        for g in range(len(sizes))
    ]
    deletable = np.concatenate(values).mean()
    between = sum(m * (v.mean() - deletable) ** 2 for m, v in zip(sizes, values, strict=True))
    expected = math.sqrt(between / ((len(sizes) - 1) * n))
    got = group_stderr(float(everything.mean()), reps, sizes, n)
    assert got == pytest.approx(expected, rel=1e-9)


def test_parts_a_window_does_not_hold_are_refused() -> None:
    model, rng = Model(), np.random.default_rng(3)
    window = stats_of(*model.draw(rng, 50))
    stranger = CollapseStats(K, D, second_moment=True)
    missing = next(c for c in range(K) if window.count_of(c) == 0)
    stranger.update(torch.zeros(1, D), torch.tensor([missing]))
    rows = [p for p in parts_of(stranger) if isinstance(p, Rows)]
    with pytest.raises(IncompatibleStats, match="does not"):
        apply_part(window, rows[0], -1)
    bigger = stats_of(*model.draw(rng, 80))
    with pytest.raises(IncompatibleStats, match="more samples"):
        apply_part(window, next(iter(parts_of(bigger))), -1)


def test_a_reader_that_fails_stops_the_jackknife() -> None:
    model, rng = Model(), np.random.default_rng(4)
    buckets = [stats_of(*model.draw(rng, 40)) for _ in range(4)]

    def broken() -> Iterator[Part]:
        yield from parts_of(buckets[0])
        raise RuntimeError("bucket changed")

    groups = [Group(broken), group_of(buckets[1:])]
    window = window_of(buckets)
    with pytest.raises(RuntimeError, match="bucket changed"):
        jackknife(window, groups, evaluate, evaluate(window), ALERT_STDERR_KEYS)


# --------------------------------------------------------------------------- brute force
def test_jackknife_against_brute_force_from_raw_samples() -> None:
    """Replicates equal the metrics of the raw samples without each group (float64), the se
    equals the textbook formula on those, and the window is restored afterwards."""
    model, rng = Model(), np.random.default_rng(5)
    raw = [model.draw(rng, 120) for _ in range(12)]
    buckets = [stats_of(*b) for b in raw]
    window = window_of(buckets)
    before = window_of(buckets)
    full = evaluate(window)
    groups = [group_of(buckets[3 * g : 3 * g + 3]) for g in range(4)]
    result = jackknife(window, groups, evaluate, full, ALERT_STDERR_KEYS)

    brute: list[dict[str, float | int | None]] = []
    for g in range(4):
        kept = [b for i, b in enumerate(raw) if i // 3 != g]
        x, y, hits = (np.concatenate([k[j] for k in kept]) for j in range(3))
        brute.append(evaluate(stats_of(x, y, hits)))
    assert result.groups == 4
    assert set(result.stderrs) == set(ALERT_STDERR_KEYS)
    for key in ALERT_STDERR_KEYS:
        reps = [float(b[key]) for b in brute]  # type: ignore[arg-type]
        assert result.replicates[key] == pytest.approx(reps, rel=1e-8, abs=1e-12), key
        mean = sum(reps) / 4
        textbook = math.sqrt(3 / 4 * sum((r - mean) ** 2 for r in reps))
        assert result.stderrs[key] == pytest.approx(textbook, rel=1e-6), key
        assert result.stderrs[key] > 0

    assert window.sample_count == before.sample_count
    assert (window.nc4_hits, window.nc4_total) == (before.nc4_hits, before.nc4_total)
    a, b = window.classes(), before.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-10)
    assert window.second is not None
    assert before.second is not None
    torch.testing.assert_close(window.second, before.second, rtol=1e-12, atol=1e-9)


def test_fewer_than_two_groups_give_nothing() -> None:
    model, rng = Model(), np.random.default_rng(6)
    buckets = [stats_of(*model.draw(rng, 100))]
    window = window_of(buckets)
    result = jackknife(window, [group_of(buckets)], evaluate, evaluate(window), ALERT_STDERR_KEYS)
    assert result.stderrs == {}


# --------------------------------------------------------------------------- coverage
WINDOWS, BUCKETS, PER_BUCKET, GROUPS = 150, 16, 100, 8
SEED = 7
# The se of 8 groups has 7 degrees of freedom: a 95% interval is +- t(0.975, 7) se, not 1.96
# (which covers about 91%). Seeds 1-7 gave rms/spread 0.90-1.23 and coverage 0.91-0.98.
T_975_7DF = 2.365


def test_coverage_over_independent_windows_of_one_model() -> None:
    """Many independent windows of one unchanged model (iid traffic into buckets): the
    jackknife se matches the spread of the values across windows (the root mean square of the
    se, within 25-30%), and value +- t se covers the centre of that spread (the across-window
    mean: what the window estimates at this volume) about 95% of the time."""
    model, rng = Model(SEED), np.random.default_rng(SEED)
    values: dict[str, list[float]] = {k: [] for k in ALERT_STDERR_KEYS}
    errors: dict[str, list[float]] = {k: [] for k in ALERT_STDERR_KEYS}
    for _ in range(WINDOWS):
        buckets = [stats_of(*model.draw(rng, PER_BUCKET)) for _ in range(BUCKETS)]
        window = window_of(buckets)
        full = evaluate(window)
        index = deal_groups([b.sample_count for b in buckets], GROUPS)
        groups = [group_of([buckets[i] for i in members]) for members in index]
        result = jackknife(window, groups, evaluate, full, ALERT_STDERR_KEYS)
        for key in ALERT_STDERR_KEYS:
            values[key].append(float(full[key]))  # type: ignore[arg-type]
            errors[key].append(result.stderrs[key])
    for key in ALERT_STDERR_KEYS:
        v, se = np.array(values[key]), np.array(errors[key])
        spread = v.std(ddof=1)
        rms = math.sqrt(float((se**2).mean()))
        assert 0.75 * spread < rms < 1.3 * spread, (key, spread, rms)
        centre = v.mean()
        coverage = float((np.abs(v - centre) <= T_975_7DF * se).mean())
        assert 0.88 <= coverage <= 0.99, (key, coverage)


# --------------------------------------------------------------------------- combining
def test_traffic_stderr_adds_pair_sampling_in_quadrature() -> None:
    result = JackknifeResult({"nc1_cdnv_unbiased": 0.3, "effective_rank": 0.5}, 8)
    metrics = {"nc1_cdnv_unbiased_stderr": 0.4, "effective_rank": 3.0}
    out = traffic_stderrs(metrics, result)
    assert out == {
        "nc1_cdnv_unbiased_traffic_stderr": pytest.approx(0.5),
        "effective_rank_traffic_stderr": pytest.approx(0.5),
    }


def test_ratio_stderr_by_the_delta_method() -> None:
    base = BaselineSummary.of(stats_of(*Model().draw(np.random.default_rng(8), 400)))
    window = {
        "sample_count": 100,
        "nc1_cdnv_unbiased": 0.2,
        "nc1_cdnv_unbiased_traffic_stderr": 0.02,
        "drift_nc1_cdnv_ratio": 0.2 / 0.25,
        "effective_rank": 5.0,
        "effective_rank_traffic_stderr": 0.1,
        "drift_effective_rank_ratio": 5.0 / 4.0,
        "nc2_equiangularity_std": 0.1,
        "nc2_equiangularity_std_traffic_stderr": 0.01,
        "drift_nc2_equiangularity_std_ratio": None,  # guarded: no ratio, no stderr
    }
    base_metrics = {"nc1_cdnv_unbiased": 0.25, "effective_rank": 4.0, "nc2_equiangularity_std": 1}
    out = ratio_stderrs(window, base_metrics, {"nc1_cdnv_unbiased": 0.05}, base)
    # Pinned stderr of the baseline: relative errors 0.1 and 0.2.
    assert out["drift_nc1_cdnv_ratio_stderr"] == pytest.approx(0.8 * math.hypot(0.1, 0.2))
    # None pinned: the window's relative error 0.02 scaled by sqrt(100 / 400) = 0.01.
    assert out["drift_effective_rank_ratio_stderr"] == pytest.approx(1.25 * math.hypot(0.02, 0.01))
    assert "drift_nc2_equiangularity_std_ratio_stderr" not in out
    assert "drift_nc4_ncc_agreement_ratio_stderr" not in out


# --------------------------------------------------------------------------- replicates at scale
def head_of(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(11)
    return torch.from_numpy(model.head), torch.from_numpy(rng.normal(size=K) * 0.1)


@pytest.mark.parametrize("sampled", [False, True])
def test_keys_give_the_full_calls_values_and_nothing_else(sampled: bool) -> None:
    """Each key asked alone, and the replicates' set, has exactly the full call's value (and
    `<key>_stderr`); the keys not asked for are None."""
    model, rng = Model(12), np.random.default_rng(12)
    x, y, hits = model.draw(rng, 900)
    stats = stats_of(x, y, hits)
    weight, bias = head_of(model)
    options: dict[str, Any] = {"eval_features": torch.from_numpy(x[:300]), "nc4_max_samples": 200}
    if sampled:
        options.update(max_exact_classes=10, pair_samples=3_000, seed=3)
    full = compute_metrics(stats, weight, bias, **options)
    assert full.exact_pairs == (not sampled)
    asked: list[tuple[str, ...]] = [(key,) for key in REPORT_KEYS]
    asked += [REPLICATE_KEYS, PAIR_KEYS, ("nc1_cdnv_unbiased_stderr", "effective_rank")]
    for keys in asked:
        part = compute_metrics(stats, weight, bias, keys=keys, **options)
        wanted = {k.removesuffix("_stderr") if k in STDERR_KEYS else k for k in keys}
        for key in REPORT_KEYS:
            base = key.removesuffix("_stderr") if key in STDERR_KEYS else key
            if base in wanted or key in ("class_count", "sample_count"):
                assert part.value(key) == full.value(key), (keys, key)
            else:
                assert part.value(key) is None, (keys, key)
    with pytest.raises(ValueError, match="no key"):
        compute_metrics(stats, keys=["nc1_cdnv", "collapse"])


def test_a_replicate_does_not_compute_the_trace_ratio_nc3_or_a_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, rng = Model(13), np.random.default_rng(13)
    stats = stats_of(*model.draw(rng, 400))
    weight, bias = head_of(model)
    want = compute_metrics(stats, weight, bias).as_dict()

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("computed a metric nobody asked for")

    monkeypatch.setattr(engine, "trace_ratio", refused)
    monkeypatch.setattr(engine, "duality", refused)
    monkeypatch.setattr(engine, "HeadRows", refused)
    got = compute_metrics(stats, weight, bias, keys=REPLICATE_KEYS).as_dict()
    assert all(got[k] == want[k] and got[k] is not None for k in REPLICATE_KEYS)
    monkeypatch.setattr(engine, "effective_rank", refused)
    monkeypatch.setattr(engine, "ClassMeans", refused)  # global sums only: no class rows read
    assert compute_metrics(
        stats, keys=["anisotropy_mean_cos"]
    ).anisotropy_mean_cos == pytest.approx(want["anisotropy_mean_cos"], rel=0, abs=0)


def test_class_pairs_are_the_sampled_draw_by_class_id() -> None:
    """`draw_class_pairs` names the pairs sampled mode draws; given back, the same values."""
    model, rng = Model(14), np.random.default_rng(14)
    stats = stats_of(*model.draw(rng, 600))
    pairs = draw_class_pairs(stats, samples=2_500, seed=5)
    assert pairs is not None
    assert len(pairs) == 2_500
    assert bool((pairs.first != pairs.second).all())
    kept = stats.classes(2).class_ids
    assert bool(torch.isin(pairs.first, kept).all())
    assert bool(torch.isin(pairs.second, kept).all())
    drawn = compute_metrics(stats, max_exact_classes=1, pair_samples=2_500, seed=5)
    given = compute_metrics(stats, pairs=pairs)  # K = 24 <= max_exact_classes: sampled anyway
    assert not given.exact_pairs
    for key in [*PAIR_KEYS, *PAIR_METRICS, *(f"{k}_stderr" for k in PAIR_METRICS)]:
        assert given.value(key) == drawn.value(key), key
    assert draw_class_pairs(stats_of(*model.draw(rng, 1)), samples=10, seed=0) is None


def brute_pair_values(
    x: np.ndarray, y: np.ndarray, first: np.ndarray, second: np.ndarray
) -> dict[str, float]:
    """From raw samples (float64): NC2 cosine mean/std and the unbiased CDNV over the given
    pairs of class ids, those with both classes of >= 2 samples only, repeats counted."""
    ids, counts = np.unique(y, return_counts=True)
    kept = {int(c): int(n) for c, n in zip(ids, counts, strict=True) if n >= 2}
    means = {c: x[y == c].mean(axis=0) for c in kept}
    var = {c: float(((x[y == c] - means[c]) ** 2).sum(axis=1).mean()) for c in kept}
    centre = np.mean([means[c] for c in sorted(kept)], axis=0)
    cos, cdnv = [], []
    for i, j in zip(first.tolist(), second.tolist(), strict=True):
        if i not in kept or j not in kept:
            continue
        mi, mj = means[i] - centre, means[j] - centre
        cos.append(float(mi @ mj / (np.linalg.norm(mi) * np.linalg.norm(mj))))
        s2 = {c: var[c] * kept[c] / (kept[c] - 1) for c in (i, j)}
        noise = s2[i] / kept[i] + s2[j] / kept[j]
        d_tilde = float(((means[i] - means[j]) ** 2).sum()) - noise
        if d_tilde > 0.25 * noise:  # RESOLUTION
            cdnv.append((s2[i] + s2[j]) / (2 * d_tilde))
    return {
        "pairs": float(len(cos)),
        "nc2_equiangularity_mean": float(np.mean(cos)),
        "nc2_equiangularity_std": float(np.std(cos)),
        "nc1_cdnv_unbiased": float(np.mean(cdnv)),
    }


def test_a_replicate_uses_the_shared_pairs_whose_classes_it_keeps() -> None:
    """Against a brute force from raw samples: pairs drawn for the window, a replicate that
    lost classes (below min_count without its deleted group) keeps the rest of them."""
    model, rng = Model(15), np.random.default_rng(15)
    x, y, hits = model.draw(rng, 150)
    window = stats_of(x, y, hits)
    pairs = draw_class_pairs(window, samples=3_000, seed=2)
    assert pairs is not None
    # The replicate: without the last 50 samples; some rare classes fall below 2 samples.
    xr, yr, hr = x[:100], y[:100], hits[:100]
    replicate = stats_of(xr, yr, hr)
    lost = set(window.classes(2).class_ids.tolist()) - set(replicate.classes(2).class_ids.tolist())
    assert lost, "the test needs a replicate that lost classes"
    got = compute_metrics(replicate, keys=(*PAIR_KEYS, "nc2_equiangularity_mean"), pairs=pairs)
    want = brute_pair_values(xr, yr, pairs.first.numpy(), pairs.second.numpy())
    assert 0 < want["pairs"] < len(pairs)
    for key in ("nc2_equiangularity_mean", "nc2_equiangularity_std", "nc1_cdnv_unbiased"):
        assert got.value(key) == pytest.approx(want[key], rel=1e-9), key


def test_carried_stderrs_scale_relative_errors_by_volume() -> None:
    result = JackknifeResult(
        {"nc1_cdnv_unbiased": 0.02, "effective_rank": 0.5, NC4: 0.01, "anisotropy_mean_cos": 0.1},
        8,
    )
    full = {"nc1_cdnv_unbiased": 0.4, "effective_rank": -5.0, NC4: 0.9, "anisotropy_mean_cos": 0}
    stats = stats_of(*Model().draw(np.random.default_rng(16), 100))
    stats.record_nc4(0, 300)  # NC4 total 400 (100 + 300), samples 100
    carried = CarriedStderrs.of(result, full, stats, at=1000.0)
    assert carried.relative == pytest.approx(
        {"nc1_cdnv_unbiased": 0.05, "effective_rank": 0.1, NC4: 0.01 / 0.9}
    )  # a value of 0 has no relative error: not carried
    now = {"nc1_cdnv_unbiased": 0.5, "effective_rank": 6.0, NC4: 0.8, "anisotropy_mean_cos": 0.2}
    scaled = carried.scaled(now, sample_count=400, nc4_total=100)
    assert scaled.groups == 8
    assert scaled.stderrs == pytest.approx(
        {
            "nc1_cdnv_unbiased": 0.05 * 0.5 * math.sqrt(100 / 400),
            "effective_rank": 0.1 * 6.0 * math.sqrt(100 / 400),
            NC4: 0.01 / 0.9 * 0.8 * math.sqrt(400 / 100),
        }
    )
    gone = carried.scaled({**now, "effective_rank": None}, sample_count=0, nc4_total=100)
    assert set(gone.stderrs) == {NC4}


# --------------------------------------------------------------------------- sampled pairs
# A model with a long tail of rare classes, whose replicates lose classes (below min_count
# without their deleted group): pairs drawn by position in each replicate's own class list
# then differ from the window's from the first lost class on.
TAIL_K, TAIL_D, TAIL_WINDOWS, TAIL_PAIRS, TAIL_SEED = 150, 8, 40, 3_000, 21


def tail_window(rng: np.random.Generator, means: np.ndarray) -> tuple[CollapseStats, list[Group]]:
    p = 1.0 / (np.arange(TAIL_K) + 3.0) ** 1.1
    buckets = []
    for _ in range(BUCKETS):
        y = rng.choice(TAIL_K, size=150, p=p / p.sum())
        x = means[y] + rng.normal(size=(y.size, TAIL_D))
        stats = CollapseStats(TAIL_K, TAIL_D)
        stats.update(torch.from_numpy(x), torch.from_numpy(y))
        buckets.append(stats)
    window = from_fields(to_fields(CollapseStats.merged(buckets)))
    index = deal_groups([b.sample_count for b in buckets], GROUPS)
    return window, [tail_group([buckets[i] for i in members]) for members in index]


def tail_group(buckets: list[CollapseStats]) -> Group:
    parts: list[Part] = []
    for b in buckets:
        parts.append(Globals.decode(to_fields(b)[b"g"]))
        parts.append(
            Rows(b.class_ids.clone(), b.counts.clone(), b.sq_norms.clone(), b.sums.clone())
        )
    return Group(lambda: iter(parts))


@pytest.mark.parametrize("seed", [TAIL_SEED])
def test_sampled_pairs_shared_by_class_id_give_the_spread_across_windows(seed: int) -> None:
    """Independent windows of one model, pair metrics from sampled pairs (as above
    max_exact_classes): the error the evaluator reports, hypot(jackknife, `<key>_stderr`), with
    replicates on shared pairs is about the spread of the values across windows and covers
    them; replicates drawing their pairs by position (as first shipped) overstate it."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(TAIL_K, TAIL_D)) * 2.0
    sampled: dict[str, Any] = {"max_exact_classes": 1, "pair_samples": TAIL_PAIRS, "seed": 0}
    found: dict[str, dict[str, list[float]]] = {
        key: {"value": [], "now": [], "before": []} for key in PAIR_KEYS
    }

    def compute(
        s: CollapseStats, pairs: ClassPairs | None, keys: Sequence[str]
    ) -> dict[str, float | int | None]:
        return dict(compute_metrics(s, keys=keys, pairs=pairs, **sampled).as_dict())

    def by_position(s: CollapseStats) -> dict[str, float | int | None]:
        return dict(compute_metrics(s, keys=PAIR_KEYS, **sampled).as_dict())

    for _ in range(TAIL_WINDOWS):
        window, groups = tail_window(rng, means)
        report = compute_metrics(window, keys=PAIR_KEYS, **sampled)
        full = dict(report.as_dict())
        evaluate, reference = alert_replicates(
            window, full, compute, sampled=True, pair_samples=TAIL_PAIRS, seed=0, min_count=2,
            keys=PAIR_KEYS,
        )  # fmt: skip
        now = jackknife(window, groups, evaluate, reference, PAIR_KEYS)
        before = jackknife(window, groups, by_position, full, PAIR_KEYS)
        for key in PAIR_KEYS:
            pair_se = report.value(f"{key}_stderr")
            assert pair_se is not None
            found[key]["value"].append(float(full[key]))  # type: ignore[arg-type]
            found[key]["now"].append(math.hypot(now.stderrs[key], pair_se))
            found[key]["before"].append(math.hypot(before.stderrs[key], pair_se))
    for key in PAIR_KEYS:
        values, now_se, before_se = (np.array(found[key][n]) for n in ("value", "now", "before"))
        spread = values.std(ddof=1)
        now_rms = math.sqrt(float((now_se**2).mean()))
        before_rms = math.sqrt(float((before_se**2).mean()))
        covered = float((np.abs(values - values.mean()) <= T_975_7DF * now_se).mean())
        # The jackknife is conservative on this long-tailed model even with every pair
        # (1.3-1.5x the spread, the resolution cut and rare classes make the metrics rough).
        # Seeds 21-28: now / spread 1.02-1.82, covered 97.5-100%, before / now for the
        # equiangularity std 1.78-2.14 (CDNV: 1.11-1.32).
        assert 0.8 * spread < now_rms < 2.3 * spread, (key, spread, now_rms)
        assert covered >= 0.9, (key, covered)
        if key == "nc2_equiangularity_std":  # a pair's cosine moves with both classes
            assert before_rms > 1.4 * now_rms, (spread, now_rms, before_rms)
