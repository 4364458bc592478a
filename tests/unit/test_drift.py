"""Drift metrics against brute-force float64 computations from raw samples, and their behaviour
as a test: no alarm when nothing changed, an alarm when the distribution moved."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.errors import IncompatibleStats
from monitor.metrics import compute_metrics, rows
from monitor.metrics.drift import (
    DRIFT_KEYS,
    compute_drift,
    mmd_threshold,
    mmd_unbiased,
    top_drift_classes,
)
from monitor.stats import CollapseStats, RFFConfig, median_bandwidth, rff_features
from monitor.stats.rff import BucketSums, bucket_sums


def _stats(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    rff: RFFConfig | None = None,
    second_moment: bool = False,
) -> CollapseStats:
    s = CollapseStats(num_classes, x.shape[1], rff=rff, second_moment=second_moment)
    s.update(torch.from_numpy(x), torch.from_numpy(y))
    return s


def _phi(x: np.ndarray, cfg: RFFConfig) -> np.ndarray:
    return rff_features(torch.from_numpy(x), cfg).double().numpy()


def _mmd_u_gram(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: off-diagonal means minus twice the cross mean."""
    n, m = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


# ----------------------------------------------------------------------------------- MMD
def test_mmd_matches_explicit_double_loop_over_pairs() -> None:
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(30, 3))
    xb = rng.normal(loc=0.4, size=(25, 3))
    cfg = RFFConfig(dim=3, features=64, bandwidths=(1.5,), seed=1)
    pa, pb = _phi(xa, cfg), _phi(xb, cfg)
    aa = sum(float(pa[i] @ pa[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    bb = sum(float(pb[i] @ pb[j]) for i in range(25) for j in range(25) if i != j) / (25 * 24)
    ab = sum(float(pa[i] @ pb[j]) for i in range(30) for j in range(25)) / (30 * 25)
    expected = aa + bb - 2 * ab

    sa = _stats(xa, np.zeros(30, dtype=np.int64), 2, cfg)
    sb = _stats(xb, np.ones(25, dtype=np.int64), 2, cfg)
    assert mmd_unbiased(bucket_sums(sa), bucket_sums(sb)) == pytest.approx(expected, abs=1e-12)
    report = compute_drift(sa, sb)
    assert report.drift_mmd == pytest.approx(expected, abs=1e-12)
    # The U-statistic is symmetric.
    assert mmd_unbiased(bucket_sums(sb), bucket_sums(sa)) == pytest.approx(expected, abs=1e-12)


def test_mmd_estimates_the_exact_gaussian_kernel_mmd() -> None:
    rng = np.random.default_rng(1)
    n, m, sigma = 150, 120, 2.0
    xa = rng.normal(size=(n, 4))
    xb = rng.normal(size=(m, 4)) * 1.3 + np.array([1.0, 0.0, 0.5, 0.0])
    cfg = RFFConfig(dim=4, features=8192, bandwidths=(sigma,), seed=2)
    sa = _stats(xa, np.zeros(n, dtype=np.int64), 1, cfg)
    sb = _stats(xb, np.zeros(m, dtype=np.int64), 1, cfg)
    estimate = compute_drift(sa, sb).drift_mmd
    assert estimate is not None

    def gauss(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d2 = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        out: np.ndarray = np.exp(-d2 / (2 * sigma**2))
        return out

    exact = _mmd_u_gram(gauss(xa, xa), gauss(xb, xb), gauss(xa, xb))
    assert exact > 0.05  # a real difference, so the comparison is not trivially near 0
    # Monte-Carlo error: given the data, the RFF estimate is the mean over the D iid features
    # of D x (the same U-statistic with one feature); its standard error is their std / sqrt(D).
    pa, pb = _phi(xa, cfg), _phi(xb, cfg)
    D = cfg.features
    sa_j, sb_j = pa.sum(0), pb.sum(0)
    qa_j, qb_j = (pa**2).sum(0), (pb**2).sum(0)
    per_feature = D * (
        (sa_j**2 - qa_j) / (n * (n - 1))
        + (sb_j**2 - qb_j) / (m * (m - 1))
        - 2 * sa_j * sb_j / (n * m)
    )
    assert per_feature.mean() == pytest.approx(estimate, abs=1e-9)
    stderr = per_feature.std() / math.sqrt(D)
    assert abs(estimate - exact) < 5 * stderr
    assert abs(estimate - exact) < 0.1 * exact


def test_threshold_matches_bucket_against_rest_from_raw_samples() -> None:
    rng = np.random.default_rng(3)
    cfg = RFFConfig(dim=3, features=32, bandwidths=(1.0,), seed=4)
    sizes = [20, 35, 12, 28, 40, 17]
    raw = [rng.normal(size=(k, 3)) for k in sizes]
    parts = [_stats(x, np.zeros(len(x), dtype=np.int64), 1, cfg) for x in raw]
    buckets = [bucket_sums(p) for p in parts]
    scaled = []
    for i, xi in enumerate(raw):
        rest = np.concatenate([x for j, x in enumerate(raw) if j != i])
        pi, pr = _phi(xi, cfg), _phi(rest, cfg)
        value = _mmd_u_gram(pi @ pi.T, pr @ pr.T, pi @ pr.T)
        scaled.append(value / (1 / len(xi) + 1 / len(rest)))
    n_window, n_base = 50, sum(sizes)
    for q in (0.5, 0.9, 0.99, 1.0):
        expected = float(np.quantile(scaled, q)) * (1 / n_window + 1 / n_base)
        assert mmd_threshold(buckets, n_window, n_base, q) == pytest.approx(expected, rel=1e-9)
    assert mmd_threshold(buckets, n_window, n_base, 1.0) == pytest.approx(
        max(scaled) * (1 / n_window + 1 / n_base), rel=1e-9
    )
    window = _stats(rng.normal(size=(n_window, 3)), np.zeros(n_window, dtype=np.int64), 1, cfg)
    report = compute_drift(window, CollapseStats.merged(parts), base_buckets=buckets, quantile=0.9)
    expected_09 = float(np.quantile(scaled, 0.9)) * (1 / n_window + 1 / n_base)
    assert report.drift_mmd_threshold == pytest.approx(expected_09, rel=1e-9)


def test_threshold_and_mmd_absent_when_not_computable() -> None:
    rng = np.random.default_rng(5)
    cfg = RFFConfig(dim=2, features=16, seed=0)
    x, y = rng.normal(size=(10, 2)), np.zeros(10, dtype=np.int64)
    one = _stats(x[:1], y[:1], 1, cfg)
    full = _stats(x, y, 1, cfg)
    with pytest.raises(ValueError, match="2 samples"):
        mmd_unbiased(bucket_sums(one), bucket_sums(full))
    assert compute_drift(one, full).drift_mmd is None
    assert mmd_threshold([bucket_sums(full)], 10, 10) is None  # one bucket
    assert mmd_threshold([bucket_sums(one), bucket_sums(full)], 10, 10) is None  # one usable
    assert mmd_threshold([bucket_sums(full)] * 3, 1, 10) is None
    no_rff = _stats(x, y, 1)
    assert compute_drift(no_rff, full).drift_mmd is None
    other = _stats(x, y, 1, RFFConfig(dim=2, features=16, seed=1))
    report = compute_drift(other, full, base_buckets=[bucket_sums(full)] * 3)
    assert report.drift_mmd is None
    assert report.drift_mmd_threshold is None
    assert compute_drift(full, full).drift_mmd_threshold is None  # no buckets
    with pytest.raises(ValueError, match="feature dimensions"):
        mmd_threshold(
            [BucketSums(5, torch.zeros(4), 1.0), BucketSums(5, torch.zeros(6), 1.0)], 5, 5
        )


# ---------------------------------------------------------------------- other metrics
def _two_windows(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(7, 5)) + 100.0  # a large common offset: cancellation must not bite
    yb = np.concatenate([rng.integers(0, 6, size=300), [6]])  # class 6: 1 sample in the base
    yw = np.concatenate([rng.integers(1, 7, size=250), [0]])  # class 0: 1 sample in the window
    xb = means[yb] + rng.normal(size=(len(yb), 5)) * 0.7
    xw = means[yw] + rng.normal(size=(len(yw), 5)) * 0.7 + rng.normal(size=5) * 0.3
    return xw, yw, xb, yb


def test_mean_shift_matches_raw_samples() -> None:
    xw, yw, xb, yb = _two_windows(6)
    report = compute_drift(_stats(xw, yw, 9), _stats(xb, yb, 9))
    trace = np.trace(np.cov(xb.T, bias=True))
    expected = np.linalg.norm(xw.mean(0) - xb.mean(0)) / math.sqrt(trace)
    assert report.drift_mean_shift == pytest.approx(expected, rel=1e-9)
    # A baseline without spread has no scale: absent, not inf.
    flat = np.ones((4, 5))
    s_flat = _stats(flat, np.zeros(4, dtype=np.int64), 9)
    assert compute_drift(_stats(xw, yw, 9), s_flat).drift_mean_shift is None


def test_class_mean_cos_and_top_classes_match_raw_samples() -> None:
    xw, yw, xb, yb = _two_windows(7)
    window, base = _stats(xw, yw, 9), _stats(xb, yb, 9)
    rows = []
    for c in range(9):
        nw, nb = int((yw == c).sum()), int((yb == c).sum())
        if nw < 2 or nb < 2:
            continue
        mw, mb = xw[yw == c].mean(0), xb[yb == c].mean(0)
        dist = 1 - mw @ mb / (np.linalg.norm(mw) * np.linalg.norm(mb))
        rows.append((c, nw, nb, dist))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    total = sum(r[1] for r in rows)
    expected = sum(r[1] * r[3] for r in rows) / total
    report = compute_drift(window, base, top_k=3)
    assert report.drift_class_mean_cos == pytest.approx(expected, rel=1e-6)

    ranked = sorted(rows, key=lambda r: -r[1] * r[3] / total)
    top = top_drift_classes(window, base, k=3)
    assert [t.class_id for t in top] == [r[0] for r in ranked[:3]]
    assert report.top_classes == top
    for t, r in zip(top, ranked, strict=False):
        assert (t.count, t.base_count) == (r[1], r[2])
        assert t.cosine_distance == pytest.approx(r[3], rel=1e-6)
        assert t.contribution == pytest.approx(r[1] * r[3] / total, rel=1e-6)
    every = top_drift_classes(window, base, k=20)
    assert len(every) == 5
    assert sum(t.contribution for t in every) == pytest.approx(expected, rel=1e-9)
    assert top_drift_classes(window, base, k=0) == []
    # min_count=1 admits the classes that have a single sample on one side only if in both.
    assert {t.class_id for t in top_drift_classes(window, base, min_count=1)} == {
        0,
        1,
        2,
        3,
        4,
        5,
        6,
    }


def test_label_js_matches_the_manual_formula() -> None:
    xw, yw, xb, yb = _two_windows(8)
    p = np.bincount(yw, minlength=9) / len(yw)
    q = np.bincount(yb, minlength=9) / len(yb)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(sum(a[i] * math.log2(a[i] / b[i]) for i in range(len(a)) if a[i] > 0))

    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    report = compute_drift(_stats(xw, yw, 9), _stats(xb, yb, 9))
    assert report.drift_label_js == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < 1
    # Disjoint supports: exactly 1 bit.
    a = _stats(np.ones((3, 2)), np.array([0, 1, 1]), 4)
    b = _stats(np.ones((2, 2)), np.array([2, 3]), 4)
    assert compute_drift(a, b).drift_label_js == pytest.approx(1.0, abs=1e-12)


def test_ratios_divide_window_by_baseline() -> None:
    s = _stats(np.random.default_rng(9).normal(size=(20, 3)), np.arange(20) % 4, 4)
    # The CDNV ratio divides the volume-robust key; the plug-in one is not used.
    win = {"nc1_cdnv_unbiased": 0.3, "nc1_cdnv": 9.0, "nc2_equiangularity_std": 0.2,
           "nc4_ncc_agreement": None, "mean_noise_ratio": 0.01}  # fmt: skip
    base = {"nc1_cdnv_unbiased": 0.1, "nc1_cdnv": 1.0, "nc2_equiangularity_std": 0.0,
            "nc4_ncc_agreement": 0.5, "mean_noise_ratio": 0.01}  # fmt: skip
    out = compute_drift(s, s, window_metrics=win, base_metrics=base).as_dict()
    assert out["drift_nc1_cdnv_ratio"] == pytest.approx(3.0)
    assert out["drift_nc2_equiangularity_std_ratio"] is None  # base 0
    assert out["drift_nc4_ncc_agreement_ratio"] is None  # window missing
    assert out["drift_effective_rank_ratio"] is None  # key absent on both
    assert compute_drift(s, s, window_metrics=win).drift_nc1_cdnv_ratio is None


def test_identical_statistics_show_no_drift() -> None:
    rng = np.random.default_rng(10)
    y = rng.integers(0, 8, size=400)
    # Separated classes, so that mean_noise_ratio passes the volume guard of two ratios.
    x = 3.0 * rng.normal(size=(8, 6))[y] + 0.5 * rng.normal(size=(400, 6)) + 3.0
    cfg = RFFConfig(dim=6, features=64, seed=0)
    s = _stats(x, y, 8, cfg, second_moment=True)
    s.record_nc4(30, 100)
    twin = s.copy()
    head = torch.from_numpy(rng.normal(size=(8, 6)))
    mw = compute_metrics(s, head).as_dict()
    mb = compute_metrics(twin, head).as_dict()
    out = compute_drift(s, twin, window_metrics=mw, base_metrics=mb).as_dict()
    assert set(out) == set(DRIFT_KEYS)
    assert out["drift_label_js"] == pytest.approx(0.0, abs=1e-12)
    assert out["drift_class_mean_cos"] == pytest.approx(0.0, abs=1e-12)
    assert out["drift_mean_shift"] == pytest.approx(0.0, abs=1e-12)
    for key in ("nc1_cdnv", "nc2_equiangularity_std", "nc4_ncc_agreement", "effective_rank"):
        assert out[f"drift_{key}_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_incompatible_statistics_are_refused() -> None:
    a = CollapseStats(5, 3)
    with pytest.raises(IncompatibleStats):
        compute_drift(a, CollapseStats(6, 3))
    with pytest.raises(IncompatibleStats):
        compute_drift(a, CollapseStats(5, 4))


def test_empty_window_gives_absent_values_never_nan() -> None:
    base = _stats(np.random.default_rng(11).normal(size=(10, 3)), np.arange(10) % 2, 3)
    out = compute_drift(CollapseStats(3, 3), base).as_dict()
    assert all(v is None for v in out.values())


# ------------------------------------------------------------------ as a statistical test
K, DIM, FEATURES, BUCKETS, BUCKET_N, WINDOW_N = 12, 8, 256, 24, 200, 2000


def _trial(seed: int, change: str) -> tuple[float, float]:
    """Baseline: 24 buckets from P; window from P, or P with its mean or label mix moved."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, DIM))
    probs = rng.dirichlet(np.full(K, 2.0))

    def draw(
        n: int, p: np.ndarray, shift: np.ndarray | float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(K, size=n, p=p)
        return means[y] + rng.normal(size=(n, DIM)) + shift, y

    pilot, _ = draw(500, probs)
    bandwidth = median_bandwidth(torch.from_numpy(pilot))
    cfg = RFFConfig(dim=DIM, features=FEATURES, bandwidths=(bandwidth,), seed=seed)
    parts = [_stats(*draw(BUCKET_N, probs), K, cfg) for _ in range(BUCKETS)]
    if change == "none":
        window = _stats(*draw(WINDOW_N, probs), K, cfg)
    elif change == "mean":  # half a noise standard deviation along a random direction
        u = rng.normal(size=DIM)
        window = _stats(*draw(WINDOW_N, probs, 0.5 * u / np.linalg.norm(u)), K, cfg)
    else:  # a different next-token mix
        window = _stats(*draw(WINDOW_N, rng.dirichlet(np.full(K, 2.0))), K, cfg)
    report = compute_drift(
        window, CollapseStats.merged(parts), base_buckets=[bucket_sums(p) for p in parts]
    )
    assert report.drift_mmd is not None
    assert report.drift_mmd_threshold is not None
    return report.drift_mmd, report.drift_mmd_threshold


def test_no_change_rarely_crosses_the_calibrated_threshold() -> None:
    # With 24 buckets a 0.99 quantile is close to their maximum: the expected false-positive
    # rate is about 1/25, not 1%. 200 seeds keep the check itself from being flaky.
    results = [_trial(seed, "none") for seed in range(200)]
    false_positives = sum(mmd > thr for mmd, thr in results)
    assert false_positives / len(results) <= 0.10
    # The null estimate is centred near 0 (unbiased), far below the threshold typically.
    values = np.array([mmd for mmd, _ in results])
    thresholds = np.array([thr for _, thr in results])
    assert abs(np.median(values)) < 0.2 * np.median(thresholds)


@pytest.mark.parametrize("change", ["mean", "labels"])
def test_a_moved_distribution_crosses_the_threshold(change: str) -> None:
    results = [_trial(1000 + seed, change) for seed in range(40)]
    detected = sum(mmd > thr for mmd, thr in results)
    assert detected >= 38


# --------------------------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_give_the_cpu_values() -> None:
    xw, yw, xb, yb = _two_windows(12)
    cfg = RFFConfig(dim=5, features=64, seed=0)
    cpu = compute_drift(_stats(xw, yw, 9, cfg), _stats(xb, yb, 9, cfg)).as_dict()
    gw = CollapseStats(9, 5, rff=cfg, device="cuda")
    gw.update(torch.from_numpy(xw), torch.from_numpy(yw))
    gb = CollapseStats(9, 5, rff=cfg, device="cuda")
    gb.update(torch.from_numpy(xb), torch.from_numpy(yb))
    gpu = compute_drift(gw, gb, base_buckets=[bucket_sums(gb)] * 3).as_dict()
    for key, value in cpu.items():
        if key != "drift_mmd_threshold" and value is not None:
            assert gpu[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------ at scale
def _in_batches(x: np.ndarray, y: np.ndarray, vocab: int) -> CollapseStats:
    """Rows in first-seen order (a window merged from buckets), not in class order."""
    s = CollapseStats(vocab, x.shape[1])
    for part in np.array_split(np.arange(len(y)), 4):
        s.update(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    return s


def test_tiles_and_row_order_change_no_drift_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_drift compares class means a few classes at a time and reads the statistics'
    rows in place or gathered: every value equals the brute force from raw samples, whatever
    the tile size and the order the rows are stored in."""
    rng = np.random.default_rng(21)
    vocab, d = 200, 5
    means = rng.normal(size=(vocab, d)) + 30.0
    yb = rng.choice(rng.choice(vocab, 80, replace=False), 700)
    yw = rng.choice(rng.choice(vocab, 80, replace=False), 600)
    xb = means[yb] + rng.normal(size=(len(yb), d))
    xw = means[yw] + rng.normal(size=(len(yw), d)) + 0.2
    window = _in_batches(xw, yw, vocab)
    ids = window.class_ids
    assert not bool((ids[1:] > ids[:-1]).all())
    base = _in_batches(xb, yb, vocab)
    sorted_window = CollapseStats.from_bytes(window.to_bytes())
    sorted_base = CollapseStats.from_bytes(base.to_bytes())

    common = [
        c for c in range(vocab) if (yw == c).sum() >= 2 and (yb == c).sum() >= 2
    ]  # min_count = 2 on both sides
    assert len(common) > 10
    weights = np.array([(yw == c).sum() for c in common], dtype=np.float64)
    dists = []
    for c in common:
        mw, mb = xw[yw == c].mean(0), xb[yb == c].mean(0)
        dists.append(1.0 - mw @ mb / (np.linalg.norm(mw) * np.linalg.norm(mb)))
    expected_cos = float((weights * np.array(dists)).sum() / weights.sum())
    trace = np.trace(np.cov(xb.T, bias=True))
    expected_shift = np.linalg.norm(xw.mean(0) - xb.mean(0)) / math.sqrt(trace)

    reference = compute_drift(sorted_window, sorted_base, top_k=50)
    for tile_bytes in (8 * d, 8 * d * 3, 1 << 20):
        monkeypatch.setattr(rows, "TILE_BYTES", tile_bytes)
        for w, b in ((window, base), (sorted_window, base), (window, sorted_base)):
            report = compute_drift(w, b, top_k=50)
            assert report.drift_class_mean_cos == pytest.approx(expected_cos, rel=1e-9)
            assert report.drift_mean_shift == pytest.approx(expected_shift, rel=1e-9)
            for key, value in reference.as_dict().items():
                if value is None:
                    assert report.as_dict()[key] is None, key
                else:
                    assert report.as_dict()[key] == pytest.approx(value, rel=1e-12), key
            assert [t.class_id for t in report.top_classes] == [
                t.class_id for t in reference.top_classes
            ]
            for got, want in zip(report.top_classes, reference.top_classes, strict=True):
                assert got.contribution == pytest.approx(want.contribution, rel=1e-12)
