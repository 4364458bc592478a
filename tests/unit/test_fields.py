"""The split statistics format: round trips, add and subtract laws, blocks, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.errors import IncompatibleStats
from monitor.stats import CollapseStats, RFFConfig
from monitor.stats import fields as fmt
from monitor.stats.fields import (
    GLOBAL_FIELD,
    Globals,
    StatsAlgebra,
    from_fields,
    is_row,
    to_fields,
)

VOCAB, DIM = 50, 7
ALGEBRA = StatsAlgebra()


def make(seed: int, rows: int = 60, *, second: bool = True) -> CollapseStats:
    rng = np.random.default_rng(seed)
    rff = RFFConfig(dim=DIM, features=16, bandwidths=(2.0,), seed=1)
    s = CollapseStats(VOCAB, DIM, second_moment=second, rff=rff)
    y = rng.integers(0, VOCAB, rows)
    s.update(rng.normal(loc=30.0, size=(rows, DIM)), y)
    s.record_nc4(3, 9)
    return s


def assert_equal_stats(a: CollapseStats, b: CollapseStats, tol: float = 1e-12) -> None:
    assert (a.sample_count, a.unit_count, a.nc4_hits, a.nc4_total) == (
        b.sample_count,
        b.unit_count,
        b.nc4_hits,
        b.nc4_total,
    )
    ca, cb = a.classes(), b.classes()
    assert torch.equal(ca.class_ids, cb.class_ids)
    assert torch.equal(ca.counts, cb.counts)
    torch.testing.assert_close(ca.sums, cb.sums, rtol=tol, atol=tol)
    torch.testing.assert_close(ca.sq_norms, cb.sq_norms, rtol=tol, atol=tol)
    torch.testing.assert_close(a.unit_sum, b.unit_sum, rtol=tol, atol=tol)
    assert a.rff_sum is not None
    assert b.rff_sum is not None
    torch.testing.assert_close(a.rff_sum, b.rff_sum, rtol=tol, atol=tol)
    if a.second is not None or b.second is not None:
        assert a.second is not None
        assert b.second is not None
        torch.testing.assert_close(a.second, b.second, rtol=tol, atol=tol)


def test_round_trip_is_exact() -> None:
    s = make(0)
    back = from_fields(to_fields(s))
    assert_equal_stats(back, s, tol=0.0)


def test_added_fields_equal_merged_statistics() -> None:
    a, b = make(1), make(2)
    merged = ALGEBRA.merge_all([to_fields(a), to_fields(b)])
    assert_equal_stats(from_fields(merged), a.copy().merge(b))


def test_subtracting_what_was_added_leaves_the_rest_and_drops_empty_classes() -> None:
    a, b = make(3), make(4)
    total = ALGEBRA.merge_all([to_fields(a), to_fields(b)])
    names = list(to_fields(b))
    left = ALGEBRA.combine(
        names, [total.get(n) for n in names], [to_fields(b)[n] for n in names], -1
    )
    for name, value in zip(names, left, strict=True):
        if value is None:
            del total[name]
        else:
            total[name] = value
    back = from_fields(total)
    assert_equal_stats(back, a, tol=1e-9)
    # Every class row that survived has samples; classes only `b` had are gone entirely.
    only_b = set(b.class_ids.tolist()) - set(a.class_ids.tolist())
    assert all(str(c).encode() not in total for c in only_b)


def test_subtracting_more_than_was_added_is_refused() -> None:
    a = to_fields(make(5))
    names = list(a)
    doubled = [ALGEBRA.merge_all([{n: a[n]}, {n: a[n]}])[n] for n in names]
    with pytest.raises(IncompatibleStats, match="never added"):
        ALGEBRA.combine(names, [a[n] for n in names], doubled, -1)


def test_second_moment_is_split_into_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 3 * 8 * DIM)  # three rows per block
    s = make(6)
    fields = to_fields(s)
    blocks = [f for f in fields if f.startswith(b"m:")]
    assert len(blocks) == 3  # rows 0-2, 3-5, 6
    assert max(len(fields[b]) for b in blocks) <= 3 * 8 * DIM
    g = Globals.decode(fields[GLOBAL_FIELD])
    assert g.non_row_fields() == 4
    assert sum(1 for f in fields if is_row(f)) == s.touched_classes
    assert_equal_stats(from_fields(fields), s, tol=0.0)


def test_corrupt_or_foreign_fields_are_refused() -> None:
    fields = to_fields(make(7, second=False))
    with pytest.raises(IncompatibleStats):
        Globals.decode(b"not a globals field")
    bad = dict(fields)
    row = next(f for f in bad if is_row(f))
    bad[row] = bad[row][:-8]
    with pytest.raises(IncompatibleStats, match="width"):
        from_fields(bad)
    bad = dict(fields)
    bad[str(VOCAB + 5).encode()] = fields[row]
    with pytest.raises(IncompatibleStats):
        from_fields(bad)
    other = CollapseStats(VOCAB + 1, DIM)
    other.update(torch.ones(2, DIM), torch.tensor([0, 1]))
    with pytest.raises(IncompatibleStats, match="cannot merge"):
        ALGEBRA.merge_all([fields, to_fields(other)])
