"""nc1_trace_ratio on hidden states that lie in a hyperplane (final LayerNorm output).

Such samples make Sigma_B and Sigma_W singular along a common direction. In float32 (how a
model hands them over) they lie on the hyperplane only to float32 rounding, so Sigma_B's
"zero" eigenvalue is about 1e-14 of its largest: above numpy's pinv cut-off d * eps, which
then inverted noise and made the value depend on the summation order (7.07 vs 7.51 on a tiny
model). The references here are computed independently in float64 numpy from the raw samples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from brute_force import brute_force_metrics

from monitor import CollapseStats, compute_metrics
from monitor.metrics import geometry

EPS = float(np.finfo(np.float64).eps)
# (d, K, samples per class, LayerNorm bias scale, class-mean separation): few samples per class
# and a large bias put the float32 "zero" eigenvalue well above d * eps (see the module doc).
CASES = [(16, 40, 2, 10.0, 0.3), (16, 40, 3, 10.0, 0.1), (32, 80, 3, 10.0, 0.2)]


def layernorm_data(
    rng: np.random.Generator, d: int, k: int, per: int, beta: float, sep: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Float32 LayerNorm outputs `gamma * (x - mean) / std + beta`, returned as float64.

    Returns (X, y, gamma, vocab): class ids are scattered over a vocabulary, so the statistics'
    row order (first appearance) changes with the sample order.
    """
    vocab = 3 * k
    ids = rng.choice(vocab, size=k, replace=False)
    y = np.repeat(ids, per)
    means = sep * rng.normal(size=(vocab, d))
    x = means[y] + rng.normal(size=(y.shape[0], d))
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True))
    gamma = np.exp(0.3 * rng.normal(size=d))
    h = (gamma * x + beta * rng.normal(size=d)).astype(np.float32)
    return h.astype(np.float64), y.astype(np.int64), gamma, vocab


def feed(x: np.ndarray, y: np.ndarray, vocab: int, seed: int, parts: int = 1) -> CollapseStats:
    """Statistics of the samples in a shuffled order and uneven batches; with `parts` > 1 the
    batches go into separate statistics that are merged (as the service's buckets are)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(y.shape[0])
    cuts = sorted(rng.choice(np.arange(1, y.shape[0]), size=5, replace=False).tolist())
    bounds = [0, *cuts, y.shape[0]]
    stats = [
        CollapseStats(num_classes=vocab, dim=x.shape[1], second_moment=True) for _ in range(parts)
    ]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        rows = order[lo:hi]
        stats[i % parts].update(x[rows], y[rows])
    return CollapseStats.merged(stats)


def ratio(stats: CollapseStats) -> float:
    value = compute_metrics(stats, min_count=2, keys={"nc1_trace_ratio"}).nc1_trace_ratio
    assert value is not None
    return value


def class_covariances(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(Sigma_B, Sigma_W, K) of METRICS.md from the raw samples (every class has >= 2)."""
    ids = np.unique(y)
    mu = np.stack([x[y == c].mean(axis=0) for c in ids])
    m = mu - mu.mean(axis=0)
    dev = x - mu[np.searchsorted(ids, y)]
    return m.T @ m / len(ids), dev.T @ dev / y.shape[0], len(ids)


def hyperplane_reference(x: np.ndarray, y: np.ndarray, gamma: np.ndarray) -> float:
    """Tr(Sigma_W pinv(Sigma_B)) / K on the subspace the data span: the hyperplane
    {v : sum v_i / gamma_i = 0} that holds every difference of LayerNorm outputs. Its
    orthonormal basis comes from the construction (Helmert contrasts scaled by gamma), not from
    the data, and Sigma_B restricted to it is invertible (K - 1 >= d - 1): no cut-off at all."""
    d = x.shape[1]
    helmert = np.zeros((d, d - 1))
    for i in range(1, d):
        helmert[:i, i - 1] = 1.0
        helmert[i, i - 1] = -float(i)
    basis, _ = np.linalg.qr(gamma[:, None] * helmert)
    assert np.allclose(basis.T @ (1.0 / gamma), 0.0, atol=1e-12)
    sigma_b, sigma_w, k = class_covariances(x, y)
    b = basis.T @ sigma_b @ basis
    w = basis.T @ sigma_w @ basis
    return float(np.trace(np.linalg.solve(b, w))) / k


@pytest.mark.parametrize(("d", "k", "per", "beta", "sep"), CASES)
def test_hyperplane_value_independent_of_order_and_equal_to_projected_reference(
    d: int, k: int, per: int, beta: float, sep: float
) -> None:
    rng = np.random.default_rng(d * 1000 + k)
    x, y, gamma, vocab = layernorm_data(rng, d, k, per, beta, sep)
    want = hyperplane_reference(x, y, gamma)
    got = [ratio(feed(x, y, vocab, seed, parts)) for seed in range(4) for parts in (1, 3)]
    for value in got:
        assert math.isclose(value, got[0], rel_tol=1e-9), got
        assert math.isclose(value, want, rel_tol=1e-9), (value, want)


def test_exact_float64_hyperplane_matches_projected_reference() -> None:
    """The same without float32 rounding: the zero eigenvalue is pure float64 noise."""
    rng = np.random.default_rng(3)
    d, k, per = 12, 30, 4
    vocab = k
    y = np.repeat(np.arange(k), per)
    x = 0.5 * rng.normal(size=(k, d))[y] + rng.normal(size=(y.shape[0], d))
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True)) + 4.0
    want = hyperplane_reference(x, y, np.ones(d))
    for seed in range(3):
        assert math.isclose(ratio(feed(x, y, vocab, seed, 2)), want, rel_tol=1e-9)


def test_full_rank_unchanged_against_pinv_oracle() -> None:
    """Full-rank data, one genuine small direction (~5e-8 of the largest eigenvalue): kept, and
    the value equals the brute-force oracle's np.linalg.pinv."""
    rng = np.random.default_rng(11)
    d, k, per = 8, 40, 5
    y = np.repeat(rng.choice(100, size=k, replace=False), per)
    means = rng.normal(size=(100, d))
    x = means[y] + 0.7 * rng.normal(size=(y.shape[0], d))
    x[:, -1] *= 3e-4  # a real direction of both covariances, ~1e-7 of the others' variance
    sigma_b, sigma_w, _ = class_covariances(x, y)
    eig = np.linalg.eigvalsh(sigma_b)
    assert eig[0] / eig[-1] < 1e-7  # genuinely small ...
    assert eig[0] / eig[-1] > 100 * geometry.PINV_RTOL  # ... but above the cut-off
    want = brute_force_metrics(x, y, min_count=2)["nc1_trace_ratio"]
    got = ratio(feed(x, y, 100, seed=0, parts=2))
    assert math.isclose(got, want, rel_tol=1e-9), (got, want)
    # The small direction matters: a cut-off that dropped it would move the value by > 10%.
    dropped = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-6, hermitian=True))) / k
    assert abs(dropped - want) > 0.1 * want, (dropped, want)


@pytest.mark.parametrize(("d", "k", "per", "beta", "sep"), CASES)
def test_cutoff_has_margin_where_d_eps_had_none(
    d: int, k: int, per: int, beta: float, sep: float
) -> None:
    """Sigma_B's spectrum from the raw samples: the hyperplane's zero eigenvalue is within a
    factor of 10 of numpy's d * eps (no margin: above it in two cases, just below in the third)
    but at least 1e3 below PINV_RTOL, and every real eigenvalue at least 1e3 above it."""
    rng = np.random.default_rng(d * 1000 + k)
    x, y, _, _ = layernorm_data(rng, d, k, per, beta, sep)
    sigma_b, _, _ = class_covariances(x, y)
    rel = np.linalg.eigvalsh(sigma_b) / np.linalg.eigvalsh(sigma_b)[-1]
    assert rel[0] > 0.1 * d * EPS
    assert rel[0] < 1e-3 * geometry.PINV_RTOL
    assert rel[1] > 1e3 * geometry.PINV_RTOL


def test_old_cutoff_made_the_value_depend_on_summation_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With numpy's d * eps the same samples gave values apart by more than 1e-3."""
    d, k, per, beta, sep = CASES[0]
    rng = np.random.default_rng(d * 1000 + k)
    x, y, gamma, vocab = layernorm_data(rng, d, k, per, beta, sep)
    monkeypatch.setattr(geometry, "PINV_RTOL", d * EPS)
    old = [ratio(feed(x, y, vocab, seed)) for seed in range(4)]
    assert max(old) - min(old) > 1e-3 * min(old), old
    want = hyperplane_reference(x, y, gamma)
    assert any(abs(v - want) > 1e-3 * want for v in old), (old, want)
