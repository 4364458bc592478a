"""CollapseStats: accumulation, merge laws, serialisation, and input validation."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from monitor import CollapseStats
from monitor.errors import IncompatibleStats, InvalidInput
from monitor.stats import RFFConfig
from monitor.stats.validation import FLOAT32_MAX, CheckedBatch, check_batch, check_values

REL = 1e-9


# ----------------------------------------------------------------------------- helpers
def np_(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def assert_rel(a: Any, b: Any, what: str) -> None:
    """max |a - b| <= REL * max |b| (norm-wise relative, robust to entries summing to ~0)."""
    a, b = np.asarray(np_(a), dtype=np.float64), np.asarray(np_(b), dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert err <= REL * scale + 1e-300, f"{what}: max abs err {err}, scale {scale}"


def rows_by_class(stats: CollapseStats) -> dict[int, tuple[int, np.ndarray, float]]:
    """class id -> (count, sum, sq_norm), from the slot-ordered attribute tensors."""
    ids = np_(stats.class_ids).tolist()
    counts = np_(stats.counts).tolist()
    sums = np_(stats.sums)
    sq = np_(stats.sq_norms)
    assert len(ids) == len(set(ids)), "a class id has two slots"
    return {
        int(c): (int(n), sums[i].astype(np.float64), float(sq[i]))
        for i, (c, n) in enumerate(zip(ids, counts, strict=True))
    }


def assert_same_statistics(got: CollapseStats, want: CollapseStats) -> None:
    assert got.num_classes == want.num_classes
    assert got.dim == want.dim
    assert got.sample_count == want.sample_count
    assert got.unit_count == want.unit_count
    assert got.nc4_hits == want.nc4_hits
    assert got.nc4_total == want.nc4_total
    g, w = rows_by_class(got), rows_by_class(want)
    assert sorted(g) == sorted(w)
    for c in w:
        assert g[c][0] == w[c][0], f"count of class {c}"
    ids = sorted(w)
    if ids:
        assert_rel(np.stack([g[c][1] for c in ids]), np.stack([w[c][1] for c in ids]), "sums")
        assert_rel([g[c][2] for c in ids], [w[c][2] for c in ids], "sq_norms")
    assert_rel(got.total_sum, want.total_sum, "total_sum")
    assert_rel(got.unit_sum, want.unit_sum, "unit_sum")
    if want.second is None:
        assert got.second is None
    else:
        assert got.second is not None
        assert_rel(got.second, want.second, "second")


def snapshot(stats: CollapseStats) -> tuple[Any, ...]:
    """Every statistic, canonically ordered (by class id), as plain Python values."""
    rows = rows_by_class(stats)
    return (
        stats.num_classes,
        stats.dim,
        stats.sample_count,
        stats.unit_count,
        stats.nc4_hits,
        stats.nc4_total,
        [(c, rows[c][0], rows[c][1].tolist(), rows[c][2]) for c in sorted(rows)],
        np_(stats.total_sum).tolist(),
        np_(stats.unit_sum).tolist(),
        None if stats.second is None else np_(stats.second).tolist(),
    )


def random_data(
    rng: np.random.Generator, n: int, d: int, vocab: int, used: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.choice(vocab, size=used, replace=False)
    y = ids[rng.integers(0, used, size=n)]
    X = rng.normal(size=(n, d)) * 3.0 + rng.normal(size=d)
    return X, y.astype(np.int64)


def exact_data(
    rng: np.random.Generator, n: int, d: int, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features whose every sum is exact in floating point: 4 non-zero entries +-a with
    a in {0.5, 1, 2}, so ||h|| = 2a and h/||h|| has entries +-0.5. Any summation order gives
    bit-identical statistics."""
    X = np.zeros((n, d))
    for i in range(n):
        cols = rng.choice(d, size=4, replace=False)
        X[i, cols] = rng.choice([0.5, 1.0, 2.0]) * rng.choice([-1.0, 1.0], size=4)
    y = rng.integers(0, vocab, size=n).astype(np.int64)
    return X, y


# --------------------------------------------------------------------- single pass
def test_single_pass_matches_raw_sums() -> None:
    rng = np.random.default_rng(0)
    X, y = random_data(rng, 777, 9, 500, 60)
    stats = CollapseStats(num_classes=500, dim=9, second_moment=True)
    stats.update(X, y)
    assert stats.sample_count == 777
    assert stats.unit_count == 777
    assert stats.nc4_hits == 0
    assert stats.nc4_total == 0
    rows = rows_by_class(stats)
    assert sorted(rows) == sorted(set(y.tolist()))
    for c, (n, s, q) in rows.items():
        Xc = X[y == c]
        assert n == Xc.shape[0]
        assert_rel(s, Xc.sum(axis=0), f"sum of {c}")
        assert_rel([q], [np.sum(Xc * Xc)], f"sq_norm of {c}")
    assert_rel(stats.total_sum, X.sum(axis=0), "total_sum")
    assert_rel(stats.unit_sum, (X / np.linalg.norm(X, axis=1, keepdims=True)).sum(axis=0), "unit")
    assert stats.second is not None
    assert stats.second.dtype == torch.float64
    assert tuple(stats.second.shape) == (9, 9)
    assert_rel(stats.second, X.T @ X, "second")


def test_classes_are_sorted_and_filtered() -> None:
    rng = np.random.default_rng(1)
    y = np.array([40, 7, 7, 13, 40, 40, 2, 13, 99, 7], dtype=np.int64)
    X = rng.normal(size=(y.shape[0], 3))
    stats = CollapseStats(num_classes=100, dim=3)
    stats.update(X, y)
    assert stats.second is None
    all_rows = stats.classes()
    assert np_(all_rows.class_ids).tolist() == [2, 7, 13, 40, 99]
    assert np_(all_rows.counts).tolist() == [1, 3, 2, 3, 1]
    kept = stats.classes(min_count=3)
    assert np_(kept.class_ids).tolist() == [7, 40]
    assert_rel(kept.sums, np.stack([X[y == 7].sum(0), X[y == 40].sum(0)]), "sums")
    assert_rel(kept.sq_norms, [np.sum(X[y == 7] ** 2), np.sum(X[y == 40] ** 2)], "sq")


# ----------------------------------------------------------------------- merge laws
def split_stats(
    X: np.ndarray, y: np.ndarray, vocab: int, parts: int, rng: np.random.Generator, second: bool
) -> list[CollapseStats]:
    perm = rng.permutation(X.shape[0])
    cuts = np.sort(rng.choice(np.arange(1, X.shape[0]), size=parts - 1, replace=False))
    out = []
    for idx in np.split(perm, cuts):
        s = CollapseStats(num_classes=vocab, dim=X.shape[1], second_moment=second)
        s.update(X[idx], y[idx])
        out.append(s)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_merge_of_random_splits_equals_single_pass(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab, d = int(rng.integers(20, 3000)), int(rng.integers(1, 12))
    n = int(rng.integers(50, 900))
    X, y = random_data(rng, n, d, vocab, int(rng.integers(1, min(vocab, 80))))
    second = bool(seed % 2 == 0)
    single = CollapseStats(num_classes=vocab, dim=d, second_moment=second)
    single.update(X, y)
    for parts in range(1, 7):
        pieces = split_stats(X, y, vocab, parts, rng, second)
        order = rng.permutation(parts)
        merged = pieces[order[0]]
        for k in order[1:]:
            before, state = pieces[k].to_bytes(), snapshot(pieces[k])
            assert merged.merge(pieces[k]) is merged
            assert snapshot(pieces[k]) == state, "merge changed its argument"
            assert pieces[k].to_bytes() == before, "to_bytes differs for unchanged statistics"
        assert_same_statistics(merged, single)


def test_merge_into_empty_and_nc4_counts_add() -> None:
    rng = np.random.default_rng(11)
    X, y = random_data(rng, 300, 5, 50, 20)
    a = CollapseStats(num_classes=50, dim=5, second_moment=True)
    b = CollapseStats(num_classes=50, dim=5, second_moment=True)
    a.update(X[:100], y[:100])
    b.update(X[100:], y[100:])
    a.record_nc4(3, 10)
    b.record_nc4(5, 7)
    b.record_nc4(1, 1)
    assert (b.nc4_hits, b.nc4_total) == (6, 8)
    empty = CollapseStats(num_classes=50, dim=5, second_moment=True)
    empty.merge(a).merge(b)
    assert (empty.nc4_hits, empty.nc4_total) == (9, 18)
    single = CollapseStats(num_classes=50, dim=5, second_moment=True)
    single.update(X, y)
    single.record_nc4(9, 18)
    assert_same_statistics(empty, single)


@pytest.mark.parametrize(
    "other_args",
    [
        {"num_classes": 51, "dim": 5, "second_moment": True},
        {"num_classes": 50, "dim": 6, "second_moment": True},
        {"num_classes": 50, "dim": 5, "second_moment": False},
    ],
)
def test_merge_incompatible_raises(other_args: dict[str, Any]) -> None:
    rng = np.random.default_rng(12)
    X, y = random_data(rng, 60, 5, 50, 10)
    base = CollapseStats(num_classes=50, dim=5, second_moment=True)
    base.update(X, y)
    other = CollapseStats(**other_args)
    other.update(rng.normal(size=(4, other_args["dim"])), np.array([0, 1, 2, 3], dtype=np.int64))
    before, other_before = snapshot(base), snapshot(other)
    with pytest.raises(IncompatibleStats):
        base.merge(other)
    with pytest.raises(IncompatibleStats):
        other.merge(base)
    assert snapshot(base) == before
    assert snapshot(other) == other_before


# ------------------------------------------------------------------ serialisation
def test_to_bytes_is_deterministic() -> None:
    """The same statistics serialise to the same bytes every time (pinned baselines, dedup)."""
    rng = np.random.default_rng(19)
    X, y = random_data(rng, 100, 4, 30, 10)
    stats = CollapseStats(num_classes=30, dim=4, second_moment=True)
    stats.update(X, y)
    blobs = {stats.to_bytes() for _ in range(25)}
    assert len(blobs) == 1, f"{len(blobs)} different blobs from one unchanged statistics object"


@pytest.mark.parametrize("second", [True, False])
def test_round_trip(second: bool) -> None:
    rng = np.random.default_rng(20)
    X, y = random_data(rng, 400, 7, 1000, 70)
    stats = CollapseStats(num_classes=1000, dim=7, second_moment=second)
    stats.update(X[:150], y[:150])
    stats.update(torch.from_numpy(X[150:]), torch.from_numpy(y[150:]))
    stats.record_nc4(4, 9)
    blob = stats.to_bytes()
    assert isinstance(blob, bytes)
    back = CollapseStats.from_bytes(blob)
    assert back.to_bytes() == blob
    assert_same_statistics(back, stats)
    # bit-exact, not merely close
    g, w = rows_by_class(back), rows_by_class(stats)
    for c in w:
        assert np.array_equal(g[c][1], w[c][1])
        assert g[c][2] == w[c][2]
    assert (back.second is None) == (not second)
    # the copy is live: it keeps accumulating like the original
    stats.update(X[:10], y[:10])
    back.update(X[:10], y[:10])
    assert back.to_bytes() == stats.to_bytes()


def test_empty_round_trip() -> None:
    stats = CollapseStats(num_classes=3, dim=2, second_moment=True)
    back = CollapseStats.from_bytes(stats.to_bytes())
    assert back.sample_count == 0
    assert back.to_bytes() == stats.to_bytes()


def test_equal_statistics_give_identical_bytes_regardless_of_first_seen_order() -> None:
    rng = np.random.default_rng(21)
    X, y = exact_data(rng, 300, 8, 40)
    a = CollapseStats(num_classes=40, dim=8, second_moment=True)
    a.update(X, y)
    perm = rng.permutation(300)
    b = CollapseStats(num_classes=40, dim=8, second_moment=True)
    for idx in np.array_split(perm, 7):
        b.update(torch.from_numpy(X[idx]), torch.from_numpy(y[idx]))
    # slot order differs (classes first seen in another order) ...
    assert np_(a.class_ids).tolist() != np_(b.class_ids).tolist()
    assert a.to_bytes() == b.to_bytes()
    # ... and so does merging in either order
    p, q = split_stats(X, y, 40, 2, rng, True)
    p2, q2 = CollapseStats.from_bytes(p.to_bytes()), CollapseStats.from_bytes(q.to_bytes())
    assert p.merge(q).to_bytes() == q2.merge(p2).to_bytes() == a.to_bytes()


def _blob() -> bytes:
    rng = np.random.default_rng(22)
    X, y = random_data(rng, 200, 6, 90, 25)
    stats = CollapseStats(num_classes=90, dim=6, second_moment=True)
    stats.update(X, y)
    stats.record_nc4(2, 5)
    return stats.to_bytes()


def test_truncated_blobs_are_refused() -> None:
    blob = _blob()
    cuts = sorted(
        {0, 1, 7, 8, 9, 16, 50, len(blob) // 3, len(blob) // 2, len(blob) - 8, len(blob) - 1}
        | set(range(0, len(blob), max(1, len(blob) // 40)))
    )
    for cut in cuts:
        with pytest.raises(IncompatibleStats):
            CollapseStats.from_bytes(blob[:cut])


def _foreign_blobs() -> dict[str, bytes]:
    blob = _blob()
    header_len = int.from_bytes(blob[:8], "little")
    not_json = bytearray(blob)
    not_json[8] = ord("X")  # the header no longer starts a JSON object
    huge_len = (2**40).to_bytes(8, "little") + blob[8:]
    short_len = (header_len - 5).to_bytes(8, "little") + blob[8:]
    wrong_meta = st_save(
        {"class_ids": torch.zeros(1, dtype=torch.int64)}, metadata={"format": "other"}
    )
    return {
        "empty": b"",
        "zeros": bytes(64),
        "random": np.random.default_rng(5).bytes(len(blob)),
        "json": json.dumps({"num_classes": 3, "dim": 2}).encode(),
        "pickle": pickle.dumps({"num_classes": 3}),
        "other_safetensors": st_save({"weight": torch.ones(3, 3)}),
        "other_safetensors_meta": wrong_meta,
        "header_not_json": bytes(not_json),
        "header_length_huge": huge_len,
        "header_length_short": short_len,
        "doubled": blob + blob,
        "trailing_garbage_header": blob[:8] + b"\xff\xfe" + blob[10:],
    }


@pytest.mark.parametrize("name", sorted(_foreign_blobs()))
def test_foreign_or_corrupted_blobs_are_refused(name: str) -> None:
    blob = _foreign_blobs()[name]
    with pytest.raises(IncompatibleStats):
        CollapseStats.from_bytes(blob)


def _poisoned_blobs() -> dict[str, bytes]:
    """Well-formed safetensors whose contents are impossible statistics: for each stored array
    (found through the generic safetensors header, whatever the arrays are called), its first
    float set to NaN / +Inf, or its first integer (a class id or a count) set to -1."""
    blob = _blob()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end <= start:
            continue
        poisons = {
            "F64": [("nan", np.array([np.nan]).tobytes()), ("inf", np.array([np.inf]).tobytes())],
            "I64": [("negative", np.array([-1], dtype="<i8").tobytes())],
        }.get(info["dtype"], [])
        for tag, raw in poisons:
            bad = bytearray(blob)
            bad[base + start : base + start + len(raw)] = raw
            out[f"{name}_{tag}"] = bytes(bad)
    assert len(out) >= 6, sorted(out)
    return out


@pytest.mark.parametrize("name", sorted(_poisoned_blobs()))
def test_impossible_contents_are_refused(name: str) -> None:
    with pytest.raises(IncompatibleStats):
        CollapseStats.from_bytes(_poisoned_blobs()[name])


# ------------------------------------------------------------------ input validation
D, V = 4, 10


def _populated() -> CollapseStats:
    rng = np.random.default_rng(30)
    stats = CollapseStats(num_classes=V, dim=D, second_moment=True)
    stats.update(rng.normal(size=(12, D)), rng.integers(0, 5, size=12).astype(np.int64))
    return stats


def _bad_inputs() -> dict[str, tuple[str, Any, Any]]:
    rng = np.random.default_rng(31)
    good_x = rng.normal(size=(6, D))
    good_y = np.array([5, 6, 7, 8, 9, 5], dtype=np.int64)  # classes not yet in the stats
    nan_x = good_x.copy()
    nan_x[-1, 2] = np.nan
    inf_x = good_x.copy()
    inf_x[3, 0] = np.inf
    ninf_x = good_x.copy()
    ninf_x[-1, -1] = -np.inf
    high_y = good_y.copy()
    high_y[-1] = V
    neg_y = good_y.copy()
    neg_y[-1] = -1
    big_x = good_x.copy()
    big_x[2, 1] = 1e39  # finite in float64, inf in the float32 random-feature step
    huge_x = good_x.copy()
    huge_x[0, 0] = -1e300  # its square overflows float64 too
    return {
        "beyond_float32": ("value_out_of_range", big_x, good_y),
        "beyond_float32_negative": ("value_out_of_range", huge_x, good_y),
        "nan": ("non_finite", nan_x, good_y),
        "inf": ("non_finite", inf_x, good_y),
        "neg_inf": ("non_finite", ninf_x, good_y),
        "wrong_dim": ("wrong_dimension", rng.normal(size=(6, D + 1)), good_y),
        "features_1d": ("wrong_shape", good_x[0], good_y[:1]),
        "features_3d": ("wrong_shape", good_x.reshape(6, 1, D), good_y),
        "int_features": ("wrong_dtype", np.ones((6, D), dtype=np.int64), good_y),
        "float_labels": ("wrong_dtype", good_x, good_y.astype(np.float64)),
        "label_too_big": ("label_out_of_range", good_x, high_y),
        "label_negative": ("label_out_of_range", good_x, neg_y),
        "length_mismatch": ("length_mismatch", good_x, good_y[:5]),
        "empty": ("empty_batch", np.zeros((0, D)), np.zeros((0,), dtype=np.int64)),
    }


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("name", sorted(_bad_inputs()))
def test_bad_input_is_refused_without_side_effects(name: str, as_torch: bool) -> None:
    reason, x, y = _bad_inputs()[name]
    if as_torch:
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    rff = RFFConfig(dim=D, features=16, bandwidths=(1.0,))
    for stats in (
        _populated(),
        CollapseStats(num_classes=V, dim=D, second_moment=True),
        CollapseStats(num_classes=V, dim=D, rff=rff),
    ):
        before, state = stats.to_bytes(), snapshot(stats)
        with pytest.raises(InvalidInput) as info:
            stats.update(x, y)
        assert info.value.reason == reason, (name, info.value.reason)
        assert snapshot(stats) == state, f"{name}: statistics changed"
        assert stats.to_bytes() == before, f"{name}: to_bytes differs (statistics unchanged)"


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_accepts_float_dtypes_and_both_array_kinds(dtype: Any, as_torch: bool) -> None:
    rng = np.random.default_rng(40)
    X = rng.normal(size=(50, D)).astype(dtype)
    y = rng.integers(0, V, size=50).astype(np.int64)
    stats = CollapseStats(num_classes=V, dim=D, second_moment=True)
    if as_torch:
        stats.update(torch.from_numpy(X), torch.from_numpy(y))
    else:
        stats.update(X, y)
    ref = CollapseStats(num_classes=V, dim=D, second_moment=True)
    ref.update(X.astype(np.float64), y)
    assert_same_statistics(stats, ref)
    assert stats.total_sum.dtype == torch.float64
    assert stats.sums.dtype == torch.float64


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_accepts_integer_label_dtypes(label_dtype: Any) -> None:
    rng = np.random.default_rng(41)
    X = rng.normal(size=(20, D))
    y = rng.integers(0, V, size=20)
    stats = CollapseStats(num_classes=V, dim=D)
    stats.update(X, y.astype(label_dtype))
    ref = CollapseStats(num_classes=V, dim=D)
    ref.update(X, y.astype(np.int64))
    assert stats.to_bytes() == ref.to_bytes()


def test_range_refusals_name_the_rows_at_fault() -> None:
    x = np.ones((5, D))
    x[[1, 3], 0] = 3.5e38
    with pytest.raises(InvalidInput, match=r"float32 range .* in 2 row\(s\)") as info:
        check_batch(x, np.arange(5), dim=D, num_classes=V)
    assert info.value.reason == "value_out_of_range"
    x[4, 1] = np.nan  # non-finite is named first: it is the worse problem
    with pytest.raises(InvalidInput, match=r"NaN or Inf in 1 row\(s\)") as info:
        check_batch(x, np.arange(5), dim=D, num_classes=V)
    assert info.value.reason == "non_finite"
    check_values(torch.tensor([[FLOAT32_MAX, -FLOAT32_MAX]], dtype=torch.float64))  # the edge
    check_values(torch.full((2, 3), 65504.0, dtype=torch.float16))
    check_values(torch.full((2, 3), 3e38, dtype=torch.bfloat16))


def test_values_at_the_float32_edge_keep_every_sum_finite() -> None:
    """The largest accepted values, in every dtype, give finite statistics (random features
    included: their float32 projection overflows and is redone in float64)."""
    rff = RFFConfig(dim=D, features=32, bandwidths=(0.5, 1.0, 2.0))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        edge = min(FLOAT32_MAX, float(torch.finfo(dtype).max))  # bfloat16 rounds 3.4028e38 up
        x = torch.full((6, D), edge, dtype=dtype)
        x[::2] *= -1
        stats = CollapseStats(num_classes=V, dim=D, second_moment=True, rff=rff)
        stats.update(x, torch.arange(6))
        assert stats.rff_sum is not None
        for value in (stats.sums, stats.sq_norms, stats.second, stats.unit_sum, stats.rff_sum):
            assert value is not None
            assert bool(torch.isfinite(value).all()), dtype
        assert math.isfinite(stats.rff_sq)


def test_a_checked_batch_is_added_as_update_adds_it_and_only_where_it_was_checked() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 9, size=40)
    via_update, via_checked = CollapseStats(9, 6), CollapseStats(9, 6)
    via_update.update(x, y)
    via_checked.add_checked(CheckedBatch.check(x, y, dim=6, num_classes=9))
    assert torch.equal(via_update.counts, via_checked.counts)
    assert torch.equal(via_update.sums, via_checked.sums)
    assert torch.equal(via_update.sq_norms, via_checked.sq_norms)
    with pytest.raises(InvalidInput):  # the checks still run on the way in
        CheckedBatch.check(np.full((2, 6), np.nan), y[:2], dim=6, num_classes=9)
    wider = CheckedBatch.check(rng.normal(size=(3, 7)), y[:3], dim=7, num_classes=9)
    bigger_vocab = CheckedBatch.check(x[:3], np.array([0, 1, 11]), dim=6, num_classes=12)
    for batch in (wider, bigger_vocab):
        with pytest.raises(IncompatibleStats):
            via_checked.add_checked(batch)
    assert via_checked.sample_count == 40  # refused batches changed nothing
