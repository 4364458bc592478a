"""compute_metrics at LLM scale: no K x d copies, tile-by-tile class rows, any head dtype.

The engine derives class means, centred means and head rows a tile at a time from the class
sums and the head as stored (monitor/metrics/rows.py), and `CollapseStats.classes()` no longer
copies the sums. None of that may change a value: these tests compare the no-copy path with the
copy path (statistics whose rows are in class order against the same statistics in another
order), tiles of three rows with the brute-force reference, a float32/bf16/fp16 head with its
float64 upcast, and measure in a fresh process that the peak memory above the inputs stays
well under one K x d float64 matrix.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from brute_force import METRIC_KEYS, brute_force_metrics, kept_classes

import monitor.metrics.duality as duality_module
import monitor.metrics.rows as rows_module
from monitor import CollapseStats, compute_metrics
from monitor.metrics.engine import draw_class_pairs
from monitor.metrics.pairwise import PairInputs, sampled_pair_metrics
from monitor.metrics.rows import ClassMeans
from monitor.stats import ClassStatistics

ROOT = Path(__file__).resolve().parents[2]


def _data(
    seed: int, *, vocab: int = 300, used: int = 120, d: int = 7, max_count: int = 9
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled features of `used` classes scattered over the vocabulary, some with one sample."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab, size=used, replace=False)
    counts = rng.integers(1, max_count + 1, size=used)
    y = np.repeat(ids, counts)
    rng.shuffle(y)
    means = 2.0 * rng.normal(size=(vocab, d)) + 0.7
    return means[y] + rng.normal(size=(y.shape[0], d)), y.astype(np.int64)


def _layouts(x: np.ndarray, y: np.ndarray, vocab: int) -> tuple[CollapseStats, CollapseStats]:
    """(rows in first-seen order, rows in class order): the same statistics, stored two ways.

    Updates in several batches give rows in the order classes were first seen (as a window
    merged from buckets has them); a serialisation round trip stores them sorted by class id
    (as a blob loaded from the store has them).
    """
    shuffled = CollapseStats(vocab, x.shape[1], second_moment=True)
    for part in np.array_split(np.arange(len(y)), 5):
        shuffled.update(x[part], y[part])
    ordered = CollapseStats.from_bytes(shuffled.to_bytes())
    ids_s, ids_o = shuffled.class_ids, ordered.class_ids
    assert not bool((ids_s[1:] > ids_s[:-1]).all()), "the first layout must be out of order"
    assert bool((ids_o[1:] > ids_o[:-1]).all())
    return shuffled, ordered


def _head(rng: np.random.Generator, vocab: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rng.normal(size=(vocab, d))), torch.from_numpy(rng.normal(size=vocab))


def _assert_same(got: dict[str, Any], want: dict[str, Any], rel: float) -> None:
    assert set(got) == set(want)
    bad = []
    for key, w in want.items():
        g = got[key]
        if (g is None) != (w is None) or (
            w is not None and not math.isclose(float(g), float(w), rel_tol=rel, abs_tol=1e-15)
        ):
            bad.append(f"{key}: {g!r} vs {w!r}")
    assert not bad, "\n".join(bad)


@pytest.fixture
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of a few rows everywhere: every loop crosses many tile boundaries."""
    monkeypatch.setattr(rows_module, "TILE_BYTES", 8 * 7 * 3)  # 3 rows at d = 7
    monkeypatch.setattr(ClassStatistics, "TILE_BYTES", 8 * 7 * 2)
    monkeypatch.setattr(duality_module, "NC4_MAX_ELEMENTS", 5)
    monkeypatch.setattr(duality_module, "NC4_BLOCK_BYTES", 8 * 7 * 11)


# ------------------------------------------------------------------------ classes()
def test_classes_reads_the_storage_when_in_order_and_all_kept() -> None:
    x, y = _data(1)
    shuffled, ordered = _layouts(x, y, 300)
    every = ordered.classes(min_count=1)
    assert every.rows is None
    assert every.sums.data_ptr() == ordered.sums.data_ptr()  # a view: no K x d copy
    assert every.class_ids.data_ptr() != ordered.class_ids.data_ptr()  # O(K) vectors: copies
    for min_count in (1, 2, 4):
        a, b = shuffled.classes(min_count), ordered.classes(min_count)
        assert a.rows is not None
        assert (b.rows is None) == (min_count == 1)
        ids = sorted({int(c) for c in y if (y == c).sum() >= min_count})
        for kept in (a, b):
            assert kept.class_ids.tolist() == ids
            assert kept.counts.tolist() == [int((y == c).sum()) for c in ids]
            np.testing.assert_allclose(
                kept.sums.numpy(), np.stack([x[y == c].sum(0) for c in ids]), rtol=1e-12
            )
        assert torch.equal(a.sums, b.sums)
        assert torch.equal(a.means(), b.means())
        assert torch.equal(a.variances(), b.variances())
        assert torch.equal(a.means(), a.sums / a.counts.unsqueeze(1).double())
        index = torch.tensor([len(ids) - 1, 0, 1, 0])
        assert torch.equal(a.take_means(index), a.means()[index])
        assert torch.equal(
            b.take_means(index, out=torch.empty(4, 7, dtype=torch.float64)), b.means()[index]
        )
        assert torch.equal(a.mean_tile(1, 3), a.means()[1:3])


def test_tiny_tiles_give_the_same_class_rows(tiny_tiles: None) -> None:
    x, y = _data(2)
    stats = _layouts(x, y, 300)[0]
    kept = stats.classes(2)
    means = kept.sums / kept.counts.unsqueeze(1).double()
    assert torch.equal(kept.means(), means)
    n = kept.counts.double()
    expected = (kept.sq_norms / n - (kept.sums**2).sum(1) / (n * n)).clamp_min(0.0)
    assert torch.equal(kept.variances(), expected)
    classes = ClassMeans(kept, torch.device("cpu"))
    assert classes.tile == 3
    centred = means - means.mean(dim=0)
    torch.testing.assert_close(classes.materialise(), centred, rtol=0, atol=1e-14)
    lazy = ClassMeans(kept, torch.device("cpu"))
    torch.testing.assert_close(lazy.centred_norms(), centred.norm(dim=1), rtol=1e-14, atol=0)
    index = torch.tensor([5, 0, 5, kept.num_classes - 1])
    torch.testing.assert_close(lazy.take_centred(index), centred[index], rtol=0, atol=1e-14)


# ----------------------------------------------------------------- compute_metrics
@pytest.mark.parametrize("sampled", [False, True])
def test_the_no_copy_path_equals_the_copy_path(sampled: bool) -> None:
    """Rows in class order (read in place) and out of order (gathered): the same values."""
    x, y = _data(3)
    shuffled, ordered = _layouts(x, y, 300)
    weight, bias = _head(np.random.default_rng(3), 300, 7)
    options: dict[str, Any] = {"eval_features": torch.from_numpy(x), "min_count": 1}
    if sampled:
        options.update(max_exact_classes=10, pair_samples=5_000, seed=4, nc4_max_samples=200)
    before = shuffled.to_bytes()
    a = compute_metrics(shuffled, weight, bias, **options)
    b = compute_metrics(ordered, weight, bias, **options)
    assert shuffled.to_bytes() == before, "compute_metrics changed the statistics"
    assert a.exact_pairs == (not sampled)
    _assert_same(a.as_dict(), b.as_dict(), rel=1e-12)


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_tiny_tiles_match_the_reference(tiny_tiles: None, min_count: int) -> None:
    x, y = _data(4 + min_count)
    stats = _layouts(x, y, 300)[0]
    weight, bias = _head(np.random.default_rng(min_count), 300, 7)
    got = compute_metrics(
        stats, weight, bias, eval_features=torch.from_numpy(x), min_count=min_count
    ).as_dict()
    want = brute_force_metrics(
        x, y, classifier=weight.numpy(), bias=bias.numpy(), min_count=min_count
    )
    keys = [k for k in METRIC_KEYS if not (min_count > 2 and k == "nc1_trace_ratio")]
    _assert_same({k: got[k] for k in keys}, {k: want[k] for k in keys}, rel=1e-6)
    assert got["class_count"] == len(kept_classes(y, min_count))


def test_tiny_tiles_give_the_sampled_estimates_of_default_tiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = _data(8)
    stats = _layouts(x, y, 300)[0]
    weight, bias = _head(np.random.default_rng(8), 300, 7)
    options: dict[str, Any] = {
        "eval_features": torch.from_numpy(x),
        "max_exact_classes": 10,
        "pair_samples": 3_000,
        "nc4_max_samples": 150,
        "seed": 2,
    }
    default = compute_metrics(stats, weight, bias, **options).as_dict()
    monkeypatch.setattr(rows_module, "TILE_BYTES", 8 * 7 * 2)
    monkeypatch.setattr(duality_module, "NC4_MAX_ELEMENTS", 3)
    tiny = compute_metrics(stats, weight, bias, **options).as_dict()
    _assert_same(tiny, default, rel=1e-12)
    assert default["nc1_cdnv_stderr"] is not None
    assert default["nc4_ncc_agreement_stderr"] is not None


def test_sampled_pairs_from_the_sums_equal_those_from_the_matrix() -> None:
    x, y = _data(9)
    kept = _layouts(x, y, 300)[0].classes(2)
    lazy = ClassMeans(kept, torch.device("cpu"))
    norms = lazy.centred_norms()
    variances = kept.variances()
    from_sums = sampled_pair_metrics(
        PairInputs(lazy, variances, norms * norms), samples=4_000, seed=1
    )
    matrix = ClassMeans(kept, torch.device("cpu")).materialise()
    from_matrix = sampled_pair_metrics(
        PairInputs(matrix, variances, norms * norms), samples=4_000, seed=1, chunk=333
    )
    for key, est in from_matrix.items():
        assert est.value is not None
        assert from_sums[key].value == pytest.approx(est.value, rel=1e-12), key
        assert from_sums[key].stderr == pytest.approx(est.stderr, rel=1e-9), key


# ----------------------------------------------------------------------- head dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_low_precision_head_gives_its_float64_upcast(dtype: torch.dtype, sampled: bool) -> None:
    """An LLM head stays in its own dtype; its rows are upcast per tile, exactly."""
    x, y = _data(10)
    stats = _layouts(x, y, 300)[0]
    w64, b64 = _head(np.random.default_rng(10), 300, 7)
    weight, bias = w64.to(dtype), b64.to(dtype)
    options: dict[str, Any] = {"eval_features": torch.from_numpy(x).float()}
    if sampled:
        options.update(max_exact_classes=10, pair_samples=2_000, nc4_max_samples=100)
    low = compute_metrics(stats, weight, bias, **options).as_dict()
    high = compute_metrics(stats, weight.double(), bias.double(), **options).as_dict()
    assert weight.dtype == dtype  # the caller's head is not converted in place
    _assert_same(low, high, rel=1e-9)
    assert low["nc3_duality_mean_cos"] is not None
    assert low["nc4_ncc_agreement"] is not None


# --------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, sys, gc, ctypes
import torch
sys.path.insert(0, sys.argv[1])
from monitor import CollapseStats, compute_metrics
from monitor.metrics import rows
from monitor.metrics.drift import compute_drift
from monitor.stats import ClassStatistics

K, D = 40_000, 256
rows.TILE_BYTES = ClassStatistics.TILE_BYTES = 1 << 20  # the tiles of a 4,096-wide model, scaled


def status(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) * 1024


def stats(seed, shuffled):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat(2)
    if shuffled:
        labels = labels[torch.randperm(2 * K, generator=gen)]
    s = CollapseStats(K, D)
    for start in range(0, 2 * K, 8192):
        y = labels[start : start + 8192]
        s.update(torch.randn(y.numel(), D, generator=gen, dtype=torch.float64) + y[:, None] % 7, y)
    return s


window, base = stats(0, True), stats(1, False)
head = torch.randn(K, D, dtype=torch.float32)
feats = torch.randn(300, D)
options = dict(max_exact_classes=100, pair_samples=20_000, eval_features=feats, nc4_max_samples=200)
compute_metrics(stats(2, True), head, **options)  # warm-up: thread pools, kernels
compute_drift(stats(3, True), base)
out = {}
for name, step in (
    ("metrics", lambda: compute_metrics(window, head, **options)),
    ("drift", lambda: compute_drift(window, base)),
):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    step()
    out[name] = status("VmHWM") - before
print(json.dumps(out))
"""


def test_peak_memory_above_the_inputs_is_tiles_not_matrices(tmp_path: Path) -> None:
    """K = 40,000, d = 256 (one K x d float64 matrix: 82 MB) with 1 MB tiles: before the
    tiling, compute_metrics peaked at about seven K x d matrices above its inputs and
    compute_drift at about five; now both stay under half of one."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    script = tmp_path / "child.py"
    script.write_text(_MEMORY_CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    matrix = 40_000 * 256 * 8
    for name, peak in peaks.items():
        assert peak < 0.5 * matrix, f"{name}: {peak / 2**20:.0f} MiB above the inputs"


def test_keys_and_pairs_by_class_id_keep_the_values_of_the_tiled_path(tiny_tiles: None) -> None:
    """A jackknife replicate's call (`keys`, `pairs`) on rows out of class order, tiles of
    three rows, pairs from the sums: each value is the full call's, bit for bit."""
    x, y = _data(11)
    stats = _layouts(x, y, 300)[0]
    options: dict[str, Any] = {"max_exact_classes": 10, "pair_samples": 4_000, "seed": 6}
    full = compute_metrics(stats, **options).as_dict()
    keys = ("nc1_cdnv_unbiased", "nc2_equiangularity_std", "effective_rank", "anisotropy_mean_cos")
    part = compute_metrics(stats, keys=keys, **options).as_dict()
    pairs = draw_class_pairs(stats, samples=4_000, seed=6)
    given = compute_metrics(stats, keys=keys, pairs=pairs).as_dict()  # exact by K: sampled
    for key in keys:
        assert full[key] is not None, key
        assert part[key] == full[key], key
        assert given[key] == full[key], key
    assert part["nc1_trace_ratio"] is None
    assert given["nc1_cdnv_unbiased_stderr"] == full["nc1_cdnv_unbiased_stderr"]
