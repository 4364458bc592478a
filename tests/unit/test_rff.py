"""Random Fourier features: the kernel they approximate, and their sums inside CollapseStats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.errors import IncompatibleStats
from monitor.stats import CollapseStats, RFFConfig, median_bandwidth, rff_features


def test_features_approximate_the_gaussian_kernel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    sigma = 2.0
    config = RFFConfig(dim=6, features=8192, bandwidths=(sigma,), seed=3)
    phi = rff_features(torch.from_numpy(x), config).double().numpy()
    approx = phi @ phi.T
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    exact = np.exp(-d2 / (2 * sigma**2))
    # Monte-Carlo error of one entry ~ 1/sqrt(D); allow 5 of those.
    assert np.abs(approx - exact).max() < 5 / math.sqrt(config.features)


def test_several_bandwidths_approximate_the_mean_kernel() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    config = RFFConfig(dim=4, features=8192, bandwidths=(0.5, 4.0), seed=5)
    phi = rff_features(torch.from_numpy(x), config).double().numpy()
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    exact = (np.exp(-d2 / (2 * 0.25)) + np.exp(-d2 / (2 * 16.0))) / 2
    assert np.abs(phi @ phi.T - exact).max() < 5 / math.sqrt(config.features)


def test_the_map_is_a_function_of_its_config() -> None:
    x = torch.randn(5, 3)
    a = rff_features(x, RFFConfig(dim=3, features=16, seed=7))
    b = rff_features(x, RFFConfig(dim=3, features=16, seed=7))
    c = rff_features(x, RFFConfig(dim=3, features=16, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert RFFConfig.from_json(RFFConfig(dim=3, bandwidths=(1.5, 2.0)).to_json()) == RFFConfig(
        dim=3, bandwidths=(1.5, 2.0)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"features": 3},
        {"features": 0},
        {"bandwidths": ()},
        {"bandwidths": (0.0,)},
        {"bandwidths": (math.inf,)},
        {"bandwidths": (math.nan,)},
        {"bandwidths": (4e39,)},  # its float32 weights would underflow to 0
        {"bandwidths": (1e-40,)},  # ... or overflow to inf
        {"dim": 0},
    ],
)
def test_invalid_configs_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"dim": 4, **kwargs}
    with pytest.raises(ValueError, match="RFF"):
        RFFConfig(**args)  # type: ignore[arg-type]


def test_stats_accumulate_feature_sums_and_merge_them() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.integers(0, 20, 300)
    config = RFFConfig(dim=5, features=32, bandwidths=(1.0, 3.0), seed=1)
    whole = CollapseStats(20, 5, rff=config)
    whole.update(x, y)
    phi = rff_features(torch.from_numpy(x), config).double()
    assert whole.rff_sum is not None
    torch.testing.assert_close(whole.rff_sum, phi.sum(0), rtol=1e-9, atol=1e-9)
    assert math.isclose(whole.rff_sq, float((phi * phi).sum()), rel_tol=1e-9)

    parts = [CollapseStats(20, 5, rff=config) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(np.arange(300), 3), strict=True):
        part.update(x[rows], y[rows])
    merged = CollapseStats.merged(parts)
    assert merged.rff_sum is not None
    torch.testing.assert_close(merged.rff_sum, whole.rff_sum, rtol=1e-9, atol=1e-9)
    assert math.isclose(merged.rff_sq, whole.rff_sq, rel_tol=1e-9)

    restored = CollapseStats.from_bytes(whole.to_bytes())
    assert restored.rff == config
    assert restored.rff_sum is not None
    assert torch.equal(restored.rff_sum, whole.rff_sum)
    assert restored.rff_sq == whole.rff_sq
    assert restored.to_bytes() == whole.to_bytes()


def test_stats_with_other_features_do_not_merge() -> None:
    a = CollapseStats(10, 4, rff=RFFConfig(dim=4, features=8, seed=1))
    b = CollapseStats(10, 4, rff=RFFConfig(dim=4, features=8, seed=2))
    c = CollapseStats(10, 4)
    with pytest.raises(IncompatibleStats):
        a.merge(b)
    with pytest.raises(IncompatibleStats):
        a.merge(c)
    with pytest.raises(ValueError, match="dimension"):
        CollapseStats(10, 5, rff=RFFConfig(dim=4))


def test_median_heuristic() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert median_bandwidth(x) == 2.0  # distances 1, 2, 3
    with pytest.raises(ValueError, match="identical"):
        median_bandwidth(torch.zeros(4, 2))


def test_rows_whose_float32_projection_overflows_are_projected_in_float64() -> None:
    """3e38 fits float32, but a sum of such products does not: those rows (and only those)
    are projected again in float64, so phi stays finite and equals the exact map there."""
    config = RFFConfig(dim=6, features=64, bandwidths=(0.5, 1.0, 2.0), seed=2)
    x = torch.randn(7, 6, dtype=torch.float64)
    x[[2, 5]] = 3e38
    x[5, ::2] = -3e38
    phi = rff_features(x, config)
    assert phi.dtype == torch.float32
    assert bool(torch.isfinite(phi).all())
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[torch.arange(64) * 3 // 64]
    gen = torch.Generator().manual_seed(2)  # the map's own draws, in float64
    omega = torch.randn(64, 6, generator=gen, dtype=torch.float64) / scale.unsqueeze(1)
    phase = torch.rand(64, generator=gen, dtype=torch.float64) * (2 * math.pi)
    # cos of arguments near 1e39 is a function of their last bits: the same float64 op is the spec.
    exact = torch.cos(torch.addmm(phase, x[[2, 5]], omega.T)) * math.sqrt(2.0 / 64)
    torch.testing.assert_close(phi[[2, 5]].double(), exact, rtol=0, atol=1e-7)
    plain = x.clone()
    plain[[2, 5]] = 0.0
    others = [0, 1, 3, 4, 6]
    assert torch.equal(rff_features(plain, config)[others], phi[others])  # float32 path untouched
