"""`agreement_estimate`: NC4 is null with one class, and a subsample's standard error is the
Wilson score half-width (never 0 at p = 0 or 1), checked against the interval's own bounds."""

from __future__ import annotations

import math

import pytest

from monitor.metrics.nc4 import agreement_estimate


def wilson_half_width(hits: int, n: int, z: float = 1.0) -> float:
    """Half the distance between the Wilson score interval's bounds (Wilson 1927)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = centre - spread, centre + spread
    return (high - low) / 2


def test_one_class_or_no_sample_is_null() -> None:
    assert agreement_estimate(50, 50, 1, sampled=False).value is None
    assert agreement_estimate(50, 50, 1, sampled=True).value is None
    assert agreement_estimate(0, 0, 10, sampled=True).value is None
    assert agreement_estimate(50, 50, 2, sampled=False).value == 1.0


@pytest.mark.parametrize(("hits", "n"), [(0, 200), (200, 200), (37, 200), (1, 7), (5000, 20000)])
def test_subsample_stderr_is_the_wilson_half_width(hits: int, n: int) -> None:
    est = agreement_estimate(hits, n, 30, sampled=True)
    assert est.value == hits / n
    assert est.stderr == pytest.approx(wilson_half_width(hits, n), rel=1e-12)
    assert est.stderr is not None
    assert est.stderr > 0.0


def test_stderr_at_the_edges_and_for_large_samples() -> None:
    assert agreement_estimate(0, 200, 30, sampled=True).stderr == pytest.approx(1 / 402)
    big = agreement_estimate(30_000, 100_000, 30, sampled=True).stderr
    assert big == pytest.approx(math.sqrt(0.3 * 0.7 / 100_000), rel=1e-4)
    assert agreement_estimate(3, 10, 30, sampled=False).stderr is None  # exact: no error
