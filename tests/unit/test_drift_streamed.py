"""Drift against a baseline summary with its class rows streamed in chunks equals drift against
the whole baseline: the evaluator's low-memory path changes no number."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.metrics.baseline import BaselineSummary
from monitor.metrics.drift import compute_drift
from monitor.stats import CollapseStats, RFFConfig
from monitor.stats.fields import Globals, decode_rows, field_chunks

VOCAB, DIM = 200, 9


def stats(seed: int, shift: float) -> CollapseStats:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(scale=4.0, size=(VOCAB, DIM))
    y = rng.zipf(1.3, 3000) % VOCAB
    x = means[y] + shift + rng.normal(size=(len(y), DIM))
    s = CollapseStats(VOCAB, DIM, rff=RFFConfig(dim=DIM, features=32, bandwidths=(3.0,)))
    s.update(x, y)
    return s


@pytest.mark.parametrize("chunk_bytes", [200, 5000, 2**20])
def test_streamed_baseline_gives_the_same_drift(chunk_bytes: int) -> None:
    window, base = stats(1, 0.3), stats(2, 0.0)
    g = Globals.decode(next(field_chunks(base))[b"g"])

    def rows():  # type: ignore[no-untyped-def]
        for chunk in field_chunks(base, max_bytes=chunk_bytes):
            decoded = decode_rows(chunk.items(), g)
            if decoded is not None:
                yield decoded

    want = compute_drift(window, base, min_count=2, top_k=10)
    got = compute_drift(window, BaselineSummary.of(base), base_rows=rows, min_count=2, top_k=10)
    for key, value in want.as_dict().items():
        if value is None:
            assert got.as_dict()[key] is None, key
        else:
            assert got.as_dict()[key] == pytest.approx(value, rel=1e-12), key
    assert got.top_classes == want.top_classes


def test_a_summary_without_its_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="base_rows"):
        compute_drift(stats(1, 0.0), BaselineSummary.of(stats(2, 0.0)))
