"""compute_metrics against the brute-force float64 oracle (tests/unit/brute_force.py).

The reference works from the raw samples; the implementation only sees the sufficient
statistics, so agreement to rel 1e-6 checks the whole chain (accumulation, merging of batches,
class filtering, pairwise reductions, pinv, eigen-decomposition, NC4).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from brute_force import (
    ALL_KEYS,
    METRIC_KEYS,
    PAIRWISE_KEYS,
    STDERR_KEYS,
    anisotropy_by_formula,
    assert_matches,
    brute_force_metrics,
    cdnv_by_matrices,
    class_means_and_variances,
    kept_classes,
    pair_kernels,
)

from monitor import CollapseStats, compute_metrics

REL = 1e-6
ABS = 1e-12


# ----------------------------------------------------------------------------- helpers
def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=ABS)


# The volume-robust keys of issue 15 (checked against their own brute force in
# test_volume_robust.py); every report carries them too.
VOLUME_KEYS = (
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
    "mean_noise_ratio",
    "nc1_cdnv_unbiased_stderr",
    "nc1_cdnv2_unbiased_stderr",
)


def assert_well_formed(d: dict[str, Any]) -> None:
    want = set(ALL_KEYS) | set(VOLUME_KEYS)
    assert set(d) == want, sorted(set(d) ^ want)
    for key in ("class_count", "sample_count"):
        assert type(d[key]) is int, (key, d[key])
    for key, value in d.items():
        if key in ("class_count", "sample_count") or value is None:
            continue
        assert isinstance(value, float), (key, value)
        assert math.isfinite(value), (key, value)


def build_stats(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    second_moment: bool = True,
    rng: np.random.Generator | None = None,
) -> CollapseStats:
    """Statistics fed in a few uneven batches, alternating numpy arrays and torch tensors."""
    stats = CollapseStats(num_classes=num_classes, dim=X.shape[1], second_moment=second_moment)
    rng = rng or np.random.default_rng(123)
    cuts = sorted(set(rng.integers(1, X.shape[0], size=3).tolist()))
    bounds = [0, *cuts, X.shape[0]]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi <= lo:
            continue
        if i % 2:
            stats.update(torch.from_numpy(X[lo:hi].copy()), torch.from_numpy(y[lo:hi].copy()))
        else:
            stats.update(X[lo:hi], y[lo:hi])
    return stats


def make_data(
    rng: np.random.Generator,
    *,
    d: int,
    vocab: int,
    used: int,
    singletons: int,
    doubles: int,
    max_count: int,
    sep: float = 3.0,
    noise: float = 1.0,
    offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random labelled features: `used` class ids scattered over the vocabulary, of which
    `singletons` have exactly one sample and `doubles` exactly two; the rest 3..max_count.
    Returns (X, y, true_means (vocab, d))."""
    ids = rng.choice(vocab, size=used, replace=False)
    counts = rng.integers(3, max_count + 1, size=used)
    counts[:singletons] = 1
    counts[singletons : singletons + doubles] = 2
    y = np.repeat(ids, counts)
    rng.shuffle(y)
    true_means = offset + sep * rng.normal(size=(vocab, d))
    X = true_means[y] + noise * rng.normal(size=(y.shape[0], d))
    return X, y.astype(np.int64), true_means


def make_classifier(
    rng: np.random.Generator, true_means: np.ndarray, kept: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """W correlated with the class means on C'; rows/biases of every other vocabulary id are
    huge, so an argmax over the whole vocabulary (instead of C') would be caught."""
    vocab, d = true_means.shape
    centre = true_means[kept].mean(axis=0)
    W = 40.0 * rng.normal(size=(vocab, d))
    b = 100.0 + rng.normal(size=vocab)
    W[kept] = (true_means[kept] - centre) + 0.7 * rng.normal(size=(len(kept), d))
    b[kept] = 0.3 * rng.normal(size=len(kept))
    return W, b


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


# ------------------------------------------------------------------ the reference itself
def test_reference_routes_agree() -> None:
    """The reference's loop-based numbers agree with a second, matrix-based route."""
    rng = np.random.default_rng(0)
    X, y, _ = make_data(rng, d=7, vocab=50, used=30, singletons=4, doubles=3, max_count=9)
    ref = brute_force_metrics(X, y, min_count=2)
    cdnv, cdnv2 = cdnv_by_matrices(X, y, min_count=2)
    assert close(ref["nc1_cdnv"], cdnv, 1e-10)
    assert close(ref["nc1_cdnv2"], cdnv2, 1e-10)
    assert close(ref["anisotropy_mean_cos"], anisotropy_by_formula(X), 1e-9)
    assert ref["class_count"] == 26


def test_reference_simplex_etf_known_values() -> None:
    """Noise-free simplex ETF: every metric takes its textbook value."""
    K, d = 6, 9
    means = np.zeros((K, d))
    means[:, :K] = 4.0 * (np.eye(K) - 1.0 / K)
    y = np.repeat(np.arange(K), 3)
    X = means[y] + 0.0
    X[::3] += 1e-3 * np.eye(d)[0]  # a sliver of within-class spread
    ids = kept_classes(y, 2)
    mu, _ = class_means_and_variances(X, y, ids)
    ref = brute_force_metrics(X, y, classifier=mu - mu.mean(axis=0))
    assert abs(ref["nc2_equiangularity_mean"] + 1.0 / (K - 1)) < 1e-9
    assert ref["nc2_equiangularity_std"] < 1e-6
    assert ref["nc2_equinorm_cv"] < 1e-6
    gap = math.sqrt(2.0 + 2.0 / (K - 1))
    assert abs(ref["nc2_log_energy_mean"] - math.log(1 / gap)) < 1e-6
    assert abs(ref["nc3_duality_mean_cos"] - 1.0) < 1e-12
    assert ref["nc4_ncc_agreement"] == 1.0
    assert abs(ref["effective_rank"] - (K - 1)) < 1e-3


# -------------------------------------------------------------------- random shapes
CASES = {
    # name: (seed, d, vocab, used, singletons, doubles, max_count, min_count)
    "K_gt_d": (1, 8, 400, 150, 10, 10, 12, 2),
    "K_lt_d": (2, 48, 30, 11, 2, 1, 90, 2),
    "huge_vocab_unseen_ids": (3, 16, 50000, 40, 5, 5, 40, 2),
    "min_count_3": (4, 12, 300, 90, 8, 12, 15, 3),
    "min_count_1": (5, 10, 120, 60, 15, 5, 20, 1),
    "few_classes": (6, 20, 9, 4, 1, 1, 300, 2),
    "fewer_samples_than_dims": (7, 64, 20, 8, 2, 3, 5, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_metrics_match_reference(name: str) -> None:
    seed, d, vocab, used, singles, doubles, max_count, min_count = CASES[name]
    rng = np.random.default_rng(seed)
    X, y, true_means = make_data(
        rng,
        d=d,
        vocab=vocab,
        used=used,
        singletons=singles,
        doubles=doubles,
        max_count=max_count,
    )
    kept = kept_classes(y, min_count)
    W, b = make_classifier(rng, true_means, kept)
    eval_x = X  # NC4 over the analysed samples themselves, as the reference does by default
    stats = build_stats(X, y, vocab, rng=rng)
    before = stats.to_bytes()
    report = compute_metrics(
        stats, classifier=t64(W), bias=t64(b), min_count=min_count, eval_features=t64(eval_x)
    )
    assert stats.to_bytes() == before, "compute_metrics changed the statistics"
    got = report.as_dict()
    assert_well_formed(got)
    ref = brute_force_metrics(X, y, classifier=W, bias=b, min_count=min_count)
    keys = tuple(k for k in METRIC_KEYS if not (min_count > 2 and k == "nc1_trace_ratio"))
    assert_matches(got, ref, keys)
    assert got["class_count"] == len(kept)
    assert got["sample_count"] == X.shape[0]
    for key in STDERR_KEYS:
        assert got[key] is None, (key, got[key])
    if min_count > 2:
        tr = got["nc1_trace_ratio"]
        assert tr is None or (isinstance(tr, float) and math.isfinite(tr))


def test_float32_input_accumulates_in_float64_with_large_offset() -> None:
    """||mu|| >> sigma: q/n - ||mu||^2 must not cancel catastrophically (METRICS.md)."""
    rng = np.random.default_rng(7)
    X, y, true_means = make_data(
        rng,
        d=6,
        vocab=40,
        used=25,
        singletons=3,
        doubles=2,
        max_count=30,
        sep=1.0,
        noise=0.05,
        offset=100.0,
    )
    X32 = X.astype(np.float32)
    kept = kept_classes(y, 2)
    W, b = make_classifier(rng, true_means - 100.0, kept)
    stats = CollapseStats(num_classes=40, dim=6, second_moment=True)
    stats.update(X32[:333], y[:333])
    stats.update(torch.from_numpy(X32[333:]), torch.from_numpy(y[333:]))
    got = compute_metrics(
        stats, classifier=t64(W), bias=t64(b), eval_features=t64(X32.astype(np.float64))
    ).as_dict()
    ref = brute_force_metrics(X32.astype(np.float64), y, classifier=W, bias=b)
    assert_matches(got, ref, METRIC_KEYS)


def test_eval_set_switches_nc4() -> None:
    rng = np.random.default_rng(8)
    X, y, true_means = make_data(
        rng, d=10, vocab=70, used=50, singletons=4, doubles=4, max_count=20, sep=1.0
    )
    kept = kept_classes(y, 2)
    W, b = make_classifier(rng, true_means, kept)
    eval_x = true_means[rng.choice(kept, 777)] + rng.normal(size=(777, 10))
    stats = build_stats(X, y, 70)
    got = compute_metrics(stats, classifier=t64(W), bias=t64(b), eval_features=t64(eval_x))
    got_d = got.as_dict()
    ref = brute_force_metrics(X, y, classifier=W, bias=b, eval_features=eval_x)
    ref_train = brute_force_metrics(X, y, classifier=W, bias=b)
    assert ref["nc4_ncc_agreement"] != ref_train["nc4_ncc_agreement"]
    assert_matches(got_d, ref, METRIC_KEYS)
    assert got_d["nc4_ncc_agreement_stderr"] is None


def test_nc4_from_recorded_counts_or_none() -> None:
    rng = np.random.default_rng(9)
    X, y, true_means = make_data(rng, d=5, vocab=20, used=12, singletons=1, doubles=1, max_count=9)
    W, b = make_classifier(rng, true_means, kept_classes(y, 2))
    stats = build_stats(X, y, 20)
    assert (
        compute_metrics(stats, classifier=t64(W), bias=t64(b)).as_dict()["nc4_ncc_agreement"]
        is None
    )
    stats.record_nc4(7, 20)
    got = compute_metrics(stats, classifier=t64(W), bias=t64(b)).as_dict()
    assert close(got["nc4_ncc_agreement"], 0.35)
    assert got["nc4_ncc_agreement_stderr"] is None
    stats.record_nc4(3, 20)
    got = compute_metrics(stats, classifier=t64(W), bias=t64(b)).as_dict()
    assert close(got["nc4_ncc_agreement"], 10 / 40)


def test_without_classifier_nc3_nc4_are_none() -> None:
    rng = np.random.default_rng(10)
    X, y, _ = make_data(rng, d=6, vocab=30, used=20, singletons=2, doubles=2, max_count=10)
    stats = build_stats(X, y, 30)
    got = compute_metrics(stats).as_dict()
    assert_well_formed(got)
    for key in ("nc3_duality_mean_cos", "nc3_uniform_duality_cv", "nc4_ncc_agreement"):
        assert got[key] is None, key
    ref = brute_force_metrics(X, y)
    assert_matches(got, ref, METRIC_KEYS)


def test_without_bias_is_zero_bias() -> None:
    rng = np.random.default_rng(11)
    X, y, true_means = make_data(
        rng, d=6, vocab=30, used=20, singletons=2, doubles=2, max_count=25, sep=1.0
    )
    W, _ = make_classifier(rng, true_means, kept_classes(y, 2))
    stats = build_stats(X, y, 30)
    got = compute_metrics(stats, classifier=t64(W), eval_features=t64(X)).as_dict()
    assert_matches(got, brute_force_metrics(X, y, classifier=W), METRIC_KEYS)


def test_without_second_moment() -> None:
    rng = np.random.default_rng(12)
    X, y, true_means = make_data(rng, d=6, vocab=30, used=20, singletons=2, doubles=2, max_count=10)
    W, b = make_classifier(rng, true_means, kept_classes(y, 2))
    stats = build_stats(X, y, 30, second_moment=False)
    assert stats.second is None
    got = compute_metrics(stats, classifier=t64(W), bias=t64(b), eval_features=t64(X)).as_dict()
    assert_well_formed(got)
    assert got["nc1_trace_ratio"] is None
    assert got["effective_rank"] is None
    keys = tuple(k for k in METRIC_KEYS if k not in ("nc1_trace_ratio", "effective_rank"))
    assert_matches(got, brute_force_metrics(X, y, classifier=W, bias=b), keys)


@pytest.mark.parametrize("kept_wanted", [0, 1])
def test_fewer_than_two_classes(kept_wanted: int) -> None:
    rng = np.random.default_rng(13)
    labels = [3, 5, 7, 9] + [11] * (3 * kept_wanted)
    y = np.array(labels, dtype=np.int64)
    X = rng.normal(size=(len(labels), 4))
    stats = build_stats(X, y, 16)
    W = rng.normal(size=(16, 4))
    got = compute_metrics(stats, classifier=t64(W), eval_features=t64(X)).as_dict()
    assert_well_formed(got)
    assert got["class_count"] == kept_wanted
    assert got["sample_count"] == len(labels)
    for key in PAIRWISE_KEYS:
        assert got[key] is None, key
    ref = brute_force_metrics(X, y)
    assert close(got["anisotropy_mean_cos"], ref["anisotropy_mean_cos"])
    assert close(got["effective_rank"], ref["effective_rank"])


# ------------------------------------------------------------------ sampled pairs
def _kernel_spread(kern: list[float], key: str) -> float:
    """Std of the per-pair quantity whose mean the estimator averages (brute force)."""
    k = np.asarray(kern)
    if key.endswith("_std"):
        # delta method for the std: sd of (k - mean)^2 over 2 * std
        dev2 = (k - k.mean()) ** 2
        return float(dev2.std() / (2.0 * k.std()))
    return float(k.std())


@pytest.fixture(scope="module")
def sampled_case() -> dict[str, Any]:
    """294 kept classes (42,921 pairs) and their brute-force reference, computed once."""
    rng = np.random.default_rng(100)
    X, y, true_means = make_data(
        rng, d=16, vocab=1000, used=300, singletons=6, doubles=10, max_count=8, sep=1.0
    )
    kept = kept_classes(y, 2)
    assert len(kept) == 294
    W, b = make_classifier(rng, true_means, kept)
    means, variances = class_means_and_variances(X, y, kept)
    return {
        "X": X,
        "y": y,
        "W": W,
        "b": b,
        "ref": brute_force_metrics(X, y, classifier=W, bias=b),
        "kern": pair_kernels(means, variances),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_pairs_within_five_stderr(seed: int, sampled_case: dict[str, Any]) -> None:
    X, y, W, b = (sampled_case[k] for k in ("X", "y", "W", "b"))
    ref, kern = sampled_case["ref"], sampled_case["kern"]
    stats = build_stats(X, y, 1000)
    pair_samples = 20000
    kwargs: dict[str, Any] = {
        "classifier": t64(W),
        "bias": t64(b),
        "eval_features": t64(X),
        "max_exact_classes": 100,
        "pair_samples": pair_samples,
        "seed": seed,
    }
    got = compute_metrics(stats, **kwargs).as_dict()
    assert_well_formed(got)
    by_key = {
        "nc1_cdnv": kern["cdnv"],
        "nc1_cdnv2": kern["cdnv2"],
        "nc2_equiangularity_mean": kern["cos"],
        "nc2_equiangularity_std": kern["cos"],
        "nc2_log_energy_mean": kern["log_energy"],
        "nc2_log_energy_std": kern["log_energy"],
    }
    problems = []
    for key in PAIRWISE_KEYS:
        est, se = got[key], got[f"{key}_stderr"]
        if not (isinstance(se, float) and se > 0.0):
            problems.append(f"{key}_stderr = {se!r}, expected a positive float")
            continue
        if abs(est - ref[key]) > 5.0 * se:
            problems.append(f"{key}: estimate {est} vs exact {ref[key]}, stderr {se}")
        if key not in by_key:  # the volume-robust keys: their stderr is checked against
            continue  # their own brute force in test_volume_robust.py
        bound = 10.0 * _kernel_spread(by_key[key], key) / math.sqrt(pair_samples)
        if se > bound:
            problems.append(f"{key}: stderr {se} implausibly large (bound {bound})")
    assert not problems, "\n".join(problems)
    # everything that is not pairwise is still exact
    exact = tuple(k for k in METRIC_KEYS if k not in PAIRWISE_KEYS)
    assert_matches(got, ref, exact)
    assert got["nc4_ncc_agreement_stderr"] is None
    # same seed, same estimate
    again = compute_metrics(stats, **kwargs).as_dict()
    for key in PAIRWISE_KEYS:
        assert again[key] == got[key], key


def test_nc4_subsample_within_five_stderr() -> None:
    rng = np.random.default_rng(21)
    X, y, true_means = make_data(
        rng, d=8, vocab=60, used=40, singletons=2, doubles=2, max_count=30, sep=1.0
    )
    kept = kept_classes(y, 2)
    W, b = make_classifier(rng, true_means, kept)
    eval_x = true_means[rng.choice(kept, 3001)] + 1.5 * rng.normal(size=(3001, 8))
    stats = build_stats(X, y, 60)
    n_sub = 500
    got = compute_metrics(
        stats,
        classifier=t64(W),
        bias=t64(b),
        eval_features=t64(eval_x),
        nc4_max_samples=n_sub,
        seed=3,
    ).as_dict()
    exact = brute_force_metrics(X, y, classifier=W, bias=b, eval_features=eval_x)[
        "nc4_ncc_agreement"
    ]
    assert 0.05 < exact < 0.95, exact  # the test needs a non-degenerate agreement
    p, se = got["nc4_ncc_agreement"], got["nc4_ncc_agreement_stderr"]
    assert isinstance(se, float), se
    assert se > 0.0, se
    assert abs(p * n_sub - round(p * n_sub)) < 1e-6, "p is not a fraction of the subsample"
    # The binomial error as the Wilson score half-width at z = 1 (not 0 at p = 0 or 1).
    assert close(se, math.sqrt(p * (1.0 - p) / n_sub + 0.25 / n_sub**2) / (1.0 + 1.0 / n_sub))
    assert abs(p - exact) <= 5.0 * se, (p, exact, se)
    for key in PAIRWISE_KEYS:
        assert got[f"{key}_stderr"] is None
    # exactly nc4_max_samples rows: no subsampling, exact value, no stderr
    at_limit = eval_x[:n_sub]
    got = compute_metrics(
        stats,
        classifier=t64(W),
        bias=t64(b),
        eval_features=t64(at_limit),
        nc4_max_samples=n_sub,
        seed=3,
    ).as_dict()
    want = brute_force_metrics(X, y, classifier=W, bias=b, eval_features=at_limit)
    assert close(got["nc4_ncc_agreement"], want["nc4_ncc_agreement"])
    assert got["nc4_ncc_agreement_stderr"] is None


# --------------------------------------------------------------------- planted geometry
@pytest.mark.parametrize(("K", "d"), [(5, 5), (8, 12), (20, 24)])
def test_planted_simplex_etf(K: int, d: int) -> None:
    rng = np.random.default_rng(K * 100 + d)
    per_class = 15
    base = np.zeros((K, d))
    base[:, :K] = 3.0 * (np.eye(K) - 1.0 / K)
    y = np.repeat(np.arange(K), per_class)
    rng.shuffle(y)
    X = base[y] + 1e-4 * rng.normal(size=(y.shape[0], d))
    mu, _ = class_means_and_variances(X, y, list(range(K)))
    W = mu - mu.mean(axis=0)  # the centred class means m_c
    stats = build_stats(X, y, K)
    got = compute_metrics(
        stats, classifier=t64(W), bias=t64(np.zeros(K)), eval_features=t64(X)
    ).as_dict()
    assert_well_formed(got)
    assert got["class_count"] == K
    assert got["nc1_cdnv"] < 1e-6
    assert abs(got["nc2_equiangularity_mean"] + 1.0 / (K - 1)) < 1e-3
    assert got["nc2_equiangularity_std"] < 1e-3
    assert got["nc2_equinorm_cv"] < 1e-3
    assert got["nc4_ncc_agreement"] == 1.0
    assert abs(got["nc3_duality_mean_cos"] - 1.0) < 1e-9
    assert abs(got["nc3_uniform_duality_cv"]) < 1e-6
    assert_matches(got, brute_force_metrics(X, y, classifier=W, bias=np.zeros(K)), METRIC_KEYS)


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/4 in [-2, 2): every sum/mean below is exact in any order."""
    return rng.integers(-8, 8, size=shape) / 4.0


def test_coinciding_class_means_are_skipped() -> None:
    """Two classes with the very same samples (the same context followed by two different
    tokens): their means coincide exactly, so that pair is left out of cdnv, cdnv2 and the log
    energy (distance 0) but kept in the equiangularity (cos = 1)."""
    rng = np.random.default_rng(41)
    d = 6
    X, y, _ = make_data(rng, d=d, vocab=50, used=15, singletons=0, doubles=2, max_count=8)
    shared = _dyadic(rng, (4, d)) + 3.0  # far from the others' centre: ||m|| > 0
    X = np.concatenate([X, shared, shared[::-1]])
    y = np.concatenate([y, np.full(4, 60), np.full(4, 61)]).astype(np.int64)
    ref = brute_force_metrics(X, y)
    means, variances = class_means_and_variances(X, y, kept_classes(y, 2))
    n_pairs = len(means) * (len(means) - 1) // 2
    kern = pair_kernels(means, variances)
    assert len(kern["cdnv"]) == n_pairs - 1  # the reference did skip the pair
    assert len(kern["log_energy"]) == n_pairs - 1
    assert len(kern["cos"]) == n_pairs
    stats = build_stats(X, y, 64)
    got = compute_metrics(stats).as_dict()
    assert_well_formed(got)
    assert_matches(got, ref, METRIC_KEYS)


def test_class_mean_at_the_global_mean_is_left_out_of_angles() -> None:
    """Class means a, -a and 0: m_c = 0 for the third class (mu_G = 0 exactly), which has no
    direction; the angular metrics use the single pair (a, -a): cos = -1, log energy -log 2."""
    rng = np.random.default_rng(42)
    d = 5
    a = _dyadic(rng, (d,)) + 0.5
    e = _dyadic(rng, (3, d)) / 8.0
    X = np.concatenate([a + e, a - e, -a + e, -a - e, e, -e])
    y = np.repeat([2, 2, 4, 4, 7, 7], 3).astype(np.int64)
    W = rng.normal(size=(9, d))
    ref = brute_force_metrics(X, y, classifier=W)
    assert abs(ref["nc2_equiangularity_mean"] + 1.0) < 1e-15
    assert abs(ref["nc2_log_energy_mean"] + math.log(2.0)) < 1e-15
    assert abs(ref["nc2_equinorm_cv"] - math.sqrt(2.0) / 2.0) < 1e-12
    stats = build_stats(X, y, 9)
    got = compute_metrics(stats, classifier=t64(W), eval_features=t64(X)).as_dict()
    assert_well_formed(got)
    assert got["class_count"] == 3
    assert_matches(got, ref, METRIC_KEYS)


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    rng = np.random.default_rng(50)
    X, y, true_means = make_data(
        rng, d=24, vocab=500, used=120, singletons=5, doubles=5, max_count=10
    )
    W, b = make_classifier(rng, true_means, kept_classes(y, 2))
    stats = build_stats(X, y, 500)
    got = compute_metrics(
        stats, classifier=t64(W), bias=t64(b), eval_features=t64(X), device="cuda"
    ).as_dict()
    assert_well_formed(got)
    assert_matches(got, brute_force_metrics(X, y, classifier=W, bias=b), METRIC_KEYS)


def test_non_collapsed_geometry() -> None:
    rng = np.random.default_rng(31)
    K, d = 12, 16
    y = np.repeat(np.arange(K), 40)
    rng.shuffle(y)
    centres = 0.1 * rng.normal(size=(K, d))
    X = centres[y] + rng.normal(size=(y.shape[0], d))
    W = rng.normal(size=(K, d))
    stats = build_stats(X, y, K)
    got = compute_metrics(stats, classifier=t64(W), eval_features=t64(X)).as_dict()
    assert got["nc1_cdnv"] > 1.0
    assert got["nc4_ncc_agreement"] < 0.9
    assert_matches(got, brute_force_metrics(X, y, classifier=W), METRIC_KEYS)
