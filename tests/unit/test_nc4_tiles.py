"""`ncc_agreement` in (sample chunk x class tile) blocks equals the untiled decision.

The class tiling keeps a running arg-max/arg-min across tiles; these tests make it cross many
tiles and chunks, against a numpy brute force with explicit distances, and check that a tie
across tiles goes to the lowest class index, as a single `argmax` would. `agreement_by_tiles`,
which the engine uses with rows derived per tile, adds blocks of samples: the same decisions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.metrics.nc4 import agreement_by_tiles, ncc_agreement


def brute_force(h: np.ndarray, mu: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    logits = h @ w.T + (0.0 if b is None else b)
    dist = np.sqrt(((h[:, None, :] - mu[None, :, :]) ** 2).sum(axis=2))
    return np.argmax(logits, axis=1) == np.argmin(dist, axis=1)


@pytest.mark.parametrize("class_tile", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tiled_matches_brute_force(class_tile: int, with_bias: bool) -> None:
    rng = np.random.default_rng(class_tile)
    k, d, n = 37, 6, 91
    mu = rng.normal(size=(k, d))
    w = mu + 0.8 * rng.normal(size=(k, d))  # a head near the means: some agree, some not
    b = 0.3 * rng.normal(size=k) if with_bias else None
    h = mu[rng.integers(0, k, n)] + 0.9 * rng.normal(size=(n, d))
    expected = brute_force(h, mu, w, b)
    assert 0 < expected.sum() < n  # both outcomes occur, so a constant answer would fail
    got = ncc_agreement(
        torch.from_numpy(h).float(),  # features arrive as float32 from capture
        torch.from_numpy(mu),
        torch.from_numpy(w),
        None if b is None else torch.from_numpy(b),
        max_elements=20,  # chunks of a few rows: many chunks, many tiles
        class_tile=class_tile,
    )
    expected32 = brute_force(h.astype(np.float32).astype(np.float64), mu, w, b)
    assert got.numpy().tolist() == expected32.tolist()


def test_a_tie_across_tiles_goes_to_the_lowest_class() -> None:
    d = 4
    rng = np.random.default_rng(0)
    h = np.array([[1.0, 2.0, -1.0, 0.5]])
    mu = rng.normal(size=(15, d)) * 5.0
    mu[3] = h[0]  # class 3 is uniquely the nearest mean
    w = 0.01 * rng.normal(size=(15, d))
    w[3] = w[12] = 10.0 * h[0]  # classes 3 and 12 (another tile) tie for the top logit
    for tile in (5, 15):
        got = ncc_agreement(
            torch.from_numpy(h), torch.from_numpy(mu), torch.from_numpy(w), class_tile=tile
        )
        assert got.tolist() == [True], tile  # argmax keeps class 3, as one untiled argmax does


@pytest.mark.parametrize(
    ("class_tile", "chunk", "block"), [(1, 7, 7), (5, 4, 13), (16, 9, 91), (37, 1, 40)]
)
def test_blocks_of_samples_match_brute_force(class_tile: int, chunk: int, block: int) -> None:
    """`agreement_by_tiles` produces each class tile once per block of samples (the engine's
    rows are derived from the class sums and the head per tile) and walks the block in chunks:
    the same decisions as the brute force, whatever the block, chunk and tile sizes."""
    rng = np.random.default_rng(class_tile + 100 * chunk)
    k, d, n = 37, 6, 91
    mu = rng.normal(size=(k, d))
    w = mu + 0.8 * rng.normal(size=(k, d))
    b = 0.3 * rng.normal(size=k)
    h = mu[rng.integers(0, k, n)] + 0.9 * rng.normal(size=(n, d))
    expected = brute_force(h, mu, w, b)
    assert 0 < expected.sum() < n
    calls: list[tuple[int, int]] = []

    def rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        calls.append((start, stop))
        return (
            torch.from_numpy(mu[start:stop]),
            torch.from_numpy(w[start:stop]),
            torch.from_numpy(b[start:stop]),
        )

    got = agreement_by_tiles(
        torch.from_numpy(h), k, rows, class_tile=class_tile, chunk=chunk, block=block
    )
    assert got.numpy().tolist() == expected.tolist()
    blocks = -(-n // block)
    assert len(calls) == blocks * -(-k // class_tile)  # each tile once per block
