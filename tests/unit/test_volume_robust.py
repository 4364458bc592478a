"""Volume-robust estimators (issue 15): `nc1_cdnv_unbiased`, `nc1_cdnv2_unbiased`,
`mean_noise_ratio` and the volume guards of the drift ratios.

The references are float64 numpy over the raw samples (a loop over class pairs), independent
of the tiled walks. The acceptance of METRICS.md runs one fixed model at N = 2,000 and
N = 250,000 samples; `volume_table()` prints every metric key of that model at both volumes
(the numbers in docs/metrics.md):

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/unit'); \
        import test_volume_robust as t; t.volume_table()"
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monitor import exporter
from monitor.alerts.rules import render_rules
from monitor.alerts.thresholds import MIN_Z, TREND_WINDOW, default_alerting
from monitor.metrics import compute_metrics, pairwise
from monitor.metrics.catalogue import gauge_name
from monitor.metrics.drift import (
    DRIFT_KEYS,
    RATIO_KEYS,
    RATIO_SOURCE,
    RATIO_STDERR_KEYS,
    bucket_sums,
    compute_drift,
)
from monitor.metrics.report import (
    ALERT_STDERR_KEYS,
    COLLAPSE_KEYS,
    ESTIMATED_KEYS,
    GEOMETRY_KEYS,
    REPORT_KEYS,
    TRAFFIC_STDERR_KEYS,
)
from monitor.stats import CollapseStats, RFFConfig

UNBIASED = ("nc1_cdnv_unbiased", "nc1_cdnv2_unbiased")


# ------------------------------------------------------------------------ brute force
@dataclass(frozen=True)
class ClassRef:
    n: int
    mean: np.ndarray
    var: float  # sigma_c^2, biased: mean of ||h - mu_c||^2


def class_refs(x: np.ndarray, y: np.ndarray, min_count: int) -> dict[int, ClassRef]:
    out = {}
    for c in np.unique(y):
        rows = x[y == c]
        if len(rows) >= min_count:
            mu = rows.mean(axis=0)
            out[int(c)] = ClassRef(len(rows), mu, float(((rows - mu) ** 2).sum(axis=1).mean()))
    return out


def unbiased_reference(
    x: np.ndarray, y: np.ndarray, min_count: int, resolution: float
) -> dict[str, Any]:
    """Both keys by a loop over pairs of classes with n >= max(2, min_count); a pair is kept
    when D~ > resolution * (s~_c^2/n_c + s~_c'^2/n_c'). Also counts the pairs dropped."""
    refs = [r for r in class_refs(x, y, min_count).values() if r.n >= 2]
    cdnv, cdnv2 = [], []
    dropped_nonpositive = dropped_unresolved = 0
    for a in range(len(refs)):
        for b in range(a + 1, len(refs)):
            p, q = refs[a], refs[b]
            sp, sq = p.var * p.n / (p.n - 1), q.var * q.n / (q.n - 1)
            noise = sp / p.n + sq / q.n
            d_tilde = float(((p.mean - q.mean) ** 2).sum()) - noise
            if d_tilde <= 0:
                dropped_nonpositive += 1
            if d_tilde <= resolution * noise:
                dropped_unresolved += d_tilde > 0
                continue
            cdnv.append((sp + sq) / (2 * d_tilde))
            cdnv2.append((sp + sq) / (2 * d_tilde**2))
    return {
        "nc1_cdnv_unbiased": math.fsum(cdnv) / len(cdnv) if cdnv else None,
        "nc1_cdnv2_unbiased": math.fsum(cdnv2) / len(cdnv2) if cdnv2 else None,
        "kept": len(cdnv),
        "nonpositive": dropped_nonpositive,
        "unresolved": dropped_unresolved,
        "values": np.array(cdnv),
    }


def noise_ratio_reference(x: np.ndarray, y: np.ndarray, min_count: int) -> float | None:
    refs = class_refs(x, y, min_count)
    centre = np.mean([r.mean for r in refs.values()], axis=0)  # mu_G over C'
    usable = [r for r in refs.values() if r.n >= 2]
    if len(usable) < 2:
        return None
    noise = math.fsum(r.var * r.n / (r.n - 1) / r.n for r in usable)
    spread = math.fsum(float(((r.mean - centre) ** 2).sum()) for r in usable)
    return noise / spread


def stats_of(x: np.ndarray, y: np.ndarray, vocab: int, **kw: Any) -> CollapseStats:
    s = CollapseStats(vocab, x.shape[1], **kw)
    s.update(torch.from_numpy(x), torch.from_numpy(y))
    return s


def tricky_data(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """40 classes in d = 6: counts 1 to 30, pairs of classes whose samples are copies of each
    other's shifted by far less than their spread (D~ < 0 for sure) or by a little more
    (0 < D~ < the noise), pairs with one population mean or nearly one (D~ around 0), and five
    classes seen once."""
    rng = np.random.default_rng(seed)
    k, d = 40, 6
    means = rng.normal(scale=2.0, size=(k, d))
    means[1] = means[0]
    means[3] = means[2] + 0.05
    means[5] = means[4] + 0.3
    means[7] = means[6]
    counts = rng.integers(2, 31, size=k)
    counts[[0, 1, 2, 3]] = 2
    counts[[6, 7, 8, 9]] = 3
    counts[35:] = 1
    y = np.repeat(np.arange(k), counts)
    spread = rng.uniform(0.5, 1.5, size=k)
    x = means[y] + spread[y, None] * rng.normal(size=(len(y), d))
    x[y == 1] = x[y == 0] + 1e-3
    x[y == 7] = x[y == 6] - 1e-3
    # Class 9 = class 8 moved so that D~ is 0.1 x the noise of the pair: resolved only with a
    # cut below 0.1.
    rows = x[y == 8]
    noise = 2 * ((rows - rows.mean(0)) ** 2).sum() / (len(rows) - 1) / len(rows)
    x[y == 9] = rows + math.sqrt(1.1 * noise / d)
    return x, y, k


# ------------------------------------------------------------ (b) walks vs brute force
@pytest.mark.parametrize("min_count", [1, 2, 3])
@pytest.mark.parametrize("resolution", [pairwise.RESOLUTION, 0.0, 1.0])
def test_exact_walk_matches_brute_force(
    min_count: int, resolution: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise, "RESOLUTION", resolution)
    x, y, k = tricky_data(0)
    ref = unbiased_reference(x, y, min_count, resolution)
    assert ref["nonpositive"] > 0, "the data must have pairs with D~ <= 0"
    if resolution > 0:
        assert ref["unresolved"] > 0, "and pairs with 0 < D~ <= the noise"
    for tile in (7, 512):  # several tiles with diagonal and off-diagonal blocks, and one
        got = compute_metrics(stats_of(x, y, k), min_count=min_count, tile_size=tile).as_dict()
        for key in UNBIASED:
            assert got[key] == pytest.approx(ref[key], rel=1e-9), (key, tile)
            assert got[f"{key}_stderr"] is None
    if min_count == 1:
        assert got["class_count"] == k  # n_c = 1 classes are in C', not in these two keys


@pytest.mark.parametrize("resolution", [pairwise.RESOLUTION, 0.0, 1.0])
def test_sampled_walk_within_its_standard_error(
    resolution: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise, "RESOLUTION", resolution)
    x, y, k = tricky_data(1)
    ref = unbiased_reference(x, y, 1, resolution)
    assert ref["nonpositive"] > 0
    stats = stats_of(x, y, k)
    for seed in (0, 1):
        got = compute_metrics(
            stats, min_count=1, max_exact_classes=2, pair_samples=60_000, seed=seed
        ).as_dict()
        for key in UNBIASED:
            value, stderr = got[key], got[f"{key}_stderr"]
            assert value is not None, key
            assert stderr is not None, key
            assert stderr > 0, key
            assert abs(value - ref[key]) < 4 * stderr, (key, value, ref[key], stderr)
        # The pair-sampling error of a mean over the kept pairs: std / sqrt(kept draws),
        # about 60,000 x (kept pairs / all pairs) draws.
        kept_draws = 60_000 * ref["kept"] / (k * (k - 1) / 2)
        want = ref["values"].std() / math.sqrt(kept_draws)
        assert got["nc1_cdnv_unbiased_stderr"] == pytest.approx(want, rel=0.25)


def test_no_resolvable_pair_is_absent_not_zero() -> None:
    rng = np.random.default_rng(3)
    pair = rng.normal(size=(2, 4))
    # Class 1 repeats class 0's samples, shifted by far less than their spread: the plug-in
    # CDNV exists (and is huge), the unbiased one has no pair to average.
    x = np.concatenate([pair, pair + 1e-3, rng.normal(size=(1, 4))])
    y = np.array([0, 0, 1, 1, 2])
    got = compute_metrics(stats_of(x, y, 3), min_count=1).as_dict()
    assert got["nc1_cdnv"] is not None
    assert got["nc1_cdnv"] > 100
    assert unbiased_reference(x, y, 1, pairwise.RESOLUTION)["kept"] == 0
    assert got["nc1_cdnv_unbiased"] is None
    assert got["nc1_cdnv2_unbiased"] is None
    assert got["mean_noise_ratio"] is not None
    # One class with n >= 2 and one seen once: no pair has both counts >= 2.
    one = compute_metrics(stats_of(x[2:], y[2:], 3), min_count=1).as_dict()
    assert one["class_count"] == 2
    assert one["nc1_cdnv"] is not None
    assert one["nc1_cdnv_unbiased"] is None
    assert one["mean_noise_ratio"] is None


# ------------------------------------------------------------ (c) mean_noise_ratio
@pytest.mark.parametrize("min_count", [1, 2, 4])
def test_mean_noise_ratio_matches_brute_force(min_count: int) -> None:
    x, y, k = tricky_data(2)
    got = compute_metrics(stats_of(x, y, k), min_count=min_count).as_dict()
    want = noise_ratio_reference(x, y, min_count)
    assert want is not None
    assert got["mean_noise_ratio"] == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------- (a) acceptance of METRICS.md
V, DIM = 2_000, 64


@dataclass(frozen=True)
class Model:
    """One fixed model: class means, per-class isotropic variances independent of frequency,
    Zipf label frequencies over randomly ordered classes, and an LM head near the means."""

    means: np.ndarray  # (V, d)
    var: np.ndarray  # (V,) per-dimension variance
    probs: np.ndarray  # (V,)
    head: np.ndarray  # (V, d)

    def population(self) -> dict[str, float]:
        """CDNV and CDNV2 over all pairs of the population (no sampling at all)."""
        iu = np.triu_indices(V, 1)
        sq = (self.means**2).sum(1)  # distances ~ 128 >> their rounding: the Gram form is fine
        dist2 = (sq[:, None] + sq[None, :] - 2 * self.means @ self.means.T)[iu]
        trace = self.var * DIM
        num = (trace[:, None] + trace[None, :])[iu] / 2
        return {
            "nc1_cdnv": float((num / dist2).mean()),
            "nc1_cdnv2": float((num / dist2**2).mean()),
        }


def make_model(rank: int | None = None, scale: float = 1.0, dim: int = DIM) -> Model:
    """Class means `scale` N(0, I_d); with `rank`, in a random `rank`-dimensional subspace
    (same mean squared norm), as the class means of real models are far from isotropic.
    Scale 0.5 makes classes overlap (population CDNV about 2 instead of 0.5)."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(V, dim))
    probs = 1.0 / np.arange(1, V + 1)
    probs = (probs / probs.sum())[rng.permutation(V)]
    if rank is not None:
        basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # (rank, d), orthonormal rows
        means = rng.normal(size=(V, rank)) @ basis * math.sqrt(dim / rank)
    means = scale * means
    head = means + 0.5 * rng.normal(size=(V, dim))
    return Model(means, rng.uniform(0.5, 1.5, size=V), probs, head)


def chunks(model: Model, n: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A window's raw samples (features, labels) in chunks of 50,000."""
    rng = np.random.default_rng(seed)
    dim = model.means.shape[1]
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        y = rng.choice(V, size=m, p=model.probs)
        yield model.means[y] + np.sqrt(model.var[y])[:, None] * rng.normal(size=(m, dim)), y


def draw(
    model: Model, n: int, seed: int, *, keep: int = 0, **kw: Any
) -> tuple[CollapseStats, np.ndarray]:
    """A window of n samples (in chunks); returns its statistics and its first `keep` samples."""
    dim = model.means.shape[1]
    stats = CollapseStats(V, dim, **kw)
    kept = np.empty((0, dim))
    for x, y in chunks(model, n, seed):
        stats.update(torch.from_numpy(x), torch.from_numpy(y))
        if len(kept) < keep:
            kept = np.concatenate([kept, x[: keep - len(kept)]])
    return stats, kept


def unbiased_by_blocks(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Both unbiased keys from raw samples in float64, vectorised for the acceptance windows'
    2 million pairs (the pair loop above is checked against it): class means, and variances
    from samples centred on them (not from sums of squares, as the statistics keep them);
    squared distances from the means' differences (not a Gram matrix), 50 classes at a time."""
    order = np.argsort(y, kind="stable")
    xs = x[order]
    _, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    means = np.add.reduceat(xs, starts, axis=0) / counts[:, None]
    centred = ((xs - np.repeat(means, counts, axis=0)) ** 2).sum(axis=1)
    var = np.add.reduceat(centred, starts) / counts
    keep = counts >= 2
    means, n = means[keep], counts[keep]
    s2 = var[keep] * n / (n - 1)
    k, sums, sums2, kept = len(n), [], [], 0
    for lo in range(0, k, 50):
        rows = np.arange(lo, min(lo + 50, k))
        dist2 = ((means[rows, None, :] - means[None, :, :]) ** 2).sum(axis=2)
        noise = (s2 / n)[rows, None] + (s2 / n)[None, :]
        d_tilde = dist2 - noise
        ok = (np.arange(k)[None, :] > rows[:, None]) & (d_tilde > pairwise.RESOLUTION * noise)
        num = ((s2[rows, None] + s2[None, :]) / 2)[ok]
        sums.append(float((num / d_tilde[ok]).sum()))
        sums2.append(float((num / d_tilde[ok] ** 2).sum()))
        kept += int(ok.sum())
    return {"nc1_cdnv_unbiased": math.fsum(sums) / kept,
            "nc1_cdnv2_unbiased": math.fsum(sums2) / kept, "kept": kept}  # fmt: skip


def raw_window(model: Model, n: int, seed: int) -> tuple[CollapseStats, np.ndarray, np.ndarray]:
    """`draw`'s window (the same chunks, the same statistics) with its raw samples."""
    stats = CollapseStats(V, DIM, second_moment=True)
    parts = list(chunks(model, n, seed))
    for x, y in parts:
        stats.update(torch.from_numpy(x), torch.from_numpy(y))
    return stats, np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


@pytest.fixture(scope="module")
def volumes() -> dict[str, Any]:
    model = make_model()
    small, x_small, y_small = raw_window(model, 2_000, 1)
    large, x_large, y_large = raw_window(model, 250_000, 2)
    return {
        "model": model,
        "small": small,
        "large": large,
        "m_small": compute_metrics(small).as_dict(),
        "m_large": compute_metrics(large).as_dict(),
        # The float64 brute force over the same raw samples (which are not kept: 128 MB).
        "loop_small": unbiased_reference(x_small, y_small, 2, pairwise.RESOLUTION),
        "bf_small": unbiased_by_blocks(x_small, y_small),
        "bf_large": unbiased_by_blocks(x_large, y_large),
    }


def test_acceptance_unbiased_cdnv_does_not_follow_traffic_volume(volumes: dict[str, Any]) -> None:
    lo, hi = volumes["m_small"], volumes["m_large"]
    assert lo["sample_count"] == 2_000
    assert hi["sample_count"] == 250_000
    assert lo["class_count"] < 300 < 1_900 < hi["class_count"]  # Zipf: few classes kept at 2k
    # The problem: the plug-in keys of the same model move by a large factor with volume.
    assert hi["nc1_cdnv"] / lo["nc1_cdnv"] > 1.6
    assert hi["nc1_cdnv2"] / lo["nc1_cdnv2"] > 2.0
    # The fix: within 10% of each other, and of the population at high volume.
    pop = volumes["model"].population()
    assert lo["nc1_cdnv_unbiased"] == pytest.approx(hi["nc1_cdnv_unbiased"], rel=0.10)
    assert hi["nc1_cdnv_unbiased"] == pytest.approx(pop["nc1_cdnv"], rel=0.02)
    assert hi["nc1_cdnv2_unbiased"] == pytest.approx(pop["nc1_cdnv2"], rel=0.03)
    # CDNV2's squared denominator keeps a second-order bias, E[1/D~^2] > 1/E[D~]^2, at a few
    # samples per class: +12% here, the median of 40 windows of N = 2,000 (5th-95th
    # percentile +3% to +19%, `resolution_study`). METRICS.md's 10% holds for nc1_cdnv_unbiased
    # (median +3%, 95th percentile +7%), not for nc1_cdnv2_unbiased; docs/metrics.md says so.
    assert lo["nc1_cdnv2_unbiased"] == pytest.approx(hi["nc1_cdnv2_unbiased"], rel=0.20)
    assert lo["nc1_cdnv2_unbiased"] / lo["nc1_cdnv2"] > 2.0  # still far closer than plug-in
    # mean_noise_ratio says which window is the noisy one.
    assert lo["mean_noise_ratio"] > 0.2 > 0.05 > hi["mean_noise_ratio"]
    # The acceptance holds for the float64 brute force from the raw samples, which the walks
    # reproduce at both volumes (and the vectorised brute force is the pair loop's).
    loop, bf_lo, bf_hi = volumes["loop_small"], volumes["bf_small"], volumes["bf_large"]
    assert bf_lo["kept"] == loop["kept"] > 10_000
    assert bf_hi["kept"] > 1_900_000
    for key in UNBIASED:
        assert bf_lo[key] == pytest.approx(loop[key], rel=1e-12), key
        assert lo[key] == pytest.approx(bf_lo[key], rel=1e-9), key
        assert hi[key] == pytest.approx(bf_hi[key], rel=1e-9), key
    assert bf_lo["nc1_cdnv_unbiased"] == pytest.approx(bf_hi["nc1_cdnv_unbiased"], rel=0.10)


# --------------------------------------------------------------------- (d) drift
def _tiny(n: int, dim: int = 3) -> CollapseStats:
    rng = np.random.default_rng(n)
    return stats_of(rng.normal(size=(n, dim)), np.arange(n) % 4, 4)


def _values(noise: float | None, **kw: float) -> dict[str, float | None]:
    base: dict[str, float | None] = {
        "nc1_cdnv": 5.0,  # plug-in: never used by the ratio
        "nc1_cdnv_unbiased": 0.2,
        "nc2_equiangularity_std": 0.1,
        "nc4_ncc_agreement": 0.5,
        "effective_rank": 2.0,
        "mean_noise_ratio": noise,
    }
    base.update(kw)
    return base


@pytest.mark.parametrize("side", ["window", "base"])
def test_noise_guard_on_either_side(side: str) -> None:
    s = _tiny(40)
    quiet = _values(0.05)  # at the bound: compared
    guarded = ("drift_nc2_equiangularity_std_ratio", "drift_nc4_ncc_agreement_ratio")
    for noise, present in ((0.05, True), (0.0501, False), (None, False)):
        other = _values(noise, nc1_cdnv_unbiased=0.3, nc2_equiangularity_std=0.2,
                        nc4_ncc_agreement=0.25)  # fmt: skip
        win, base = (other, quiet) if side == "window" else (quiet, other)
        out = compute_drift(s, s, window_metrics=win, base_metrics=base).as_dict()
        for key in guarded:
            assert (out[key] is not None) is present, (noise, key)
        # The CDNV ratio has its correction and no guard; it divides the unbiased key.
        want = 0.3 / 0.2 if side == "window" else 0.2 / 0.3
        assert out["drift_nc1_cdnv_ratio"] == pytest.approx(want)
    loose = compute_drift(s, s, window_metrics=_values(0.3), base_metrics=quiet, max_mean_noise=0.5)
    assert loose.drift_nc2_equiangularity_std_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("side", ["window", "base"])
def test_samples_per_dimension_guard_on_either_side(side: str) -> None:
    big = _tiny(60)  # dim 3: 60 >= 10 x 3
    for n, present in ((30, True), (29, False)):
        small = _tiny(n)
        win, base = (small, big) if side == "window" else (big, small)
        out = compute_drift(win, base, window_metrics=_values(0.01), base_metrics=_values(0.01))
        assert (out.drift_effective_rank_ratio is not None) is present, n
    small = _tiny(15)
    win, base = (small, big) if side == "window" else (big, small)
    vals = _values(0.01)
    out = compute_drift(win, base, window_metrics=vals, base_metrics=vals, min_samples_per_dim=5)
    assert out.drift_effective_rank_ratio == pytest.approx(1.0)


def test_drift_between_volumes_of_one_model(volumes: dict[str, Any]) -> None:
    """A traffic dip (2,000 samples) against a baseline of 250,000 from the same model."""
    small, large = volumes["small"], volumes["large"]
    win, base = volumes["m_small"], volumes["m_large"]
    out = compute_drift(small, large, window_metrics=win, base_metrics=base)
    assert out.drift_nc1_cdnv_ratio == pytest.approx(1.0, abs=0.10)
    assert win["nc1_cdnv"] / base["nc1_cdnv"] < 0.6  # what the ratio used to compare
    # The noisy window's uncorrected ratios are withheld; effective rank has 31 samples/dim.
    assert out.drift_nc2_equiangularity_std_ratio is None
    assert out.drift_effective_rank_ratio is not None
    lax = compute_drift(small, large, window_metrics=win, base_metrics=base, max_mean_noise=1.0,
                        min_samples_per_dim=40.0)  # fmt: skip
    assert lax.drift_nc2_equiangularity_std_ratio is not None
    assert lax.drift_effective_rank_ratio is None  # 2,000 < 40 x 64


# --------------------------------------------------------------------- catalogue
def test_catalogue_names_the_new_keys() -> None:
    assert COLLAPSE_KEYS.index("nc1_cdnv_unbiased") == COLLAPSE_KEYS.index("nc1_cdnv2") + 1
    assert "mean_noise_ratio" in GEOMETRY_KEYS
    assert set(UNBIASED) <= set(ESTIMATED_KEYS)
    assert {f"{k}_stderr" for k in UNBIASED} <= set(REPORT_KEYS)
    assert tuple(f"{k}_traffic_stderr" for k in ALERT_STDERR_KEYS) == TRAFFIC_STDERR_KEYS
    assert tuple(f"drift_{k}_ratio_stderr" for k in RATIO_KEYS) == RATIO_STDERR_KEYS
    assert set(RATIO_SOURCE) == set(RATIO_KEYS)
    assert RATIO_SOURCE["nc1_cdnv"] == "nc1_cdnv_unbiased"
    for key in (*REPORT_KEYS, *DRIFT_KEYS, *TRAFFIC_STDERR_KEYS, *RATIO_STDERR_KEYS):
        assert exporter.METRIC_HELP.get(key, "").strip(), key
    # Names the evaluator fills in are not drift keys of compute_drift nor report keys.
    assert not set(RATIO_STDERR_KEYS) & set(DRIFT_KEYS)
    assert not set(TRAFFIC_STDERR_KEYS) & set(REPORT_KEYS)


# --------------------------------------------------------- default rules, docs/metrics.md
# Keys whose value does not follow the volume (corrected, or unbiased at any N), and the ratios
# compute_drift withholds when a side is too thin (the guards tested above).
VOLUME_FREE = {"nc1_cdnv_unbiased", "nc1_cdnv2_unbiased", "anisotropy_mean_cos", "drift_mmd",
               "drift_mmd_threshold", "drift_nc1_cdnv_ratio"}  # fmt: skip
GUARDED = {f"drift_{k}_ratio" for k in RATIO_KEYS} - VOLUME_FREE


def test_default_rules_compare_volume_robust_or_guarded_values() -> None:
    """Issue 15 goal 2: no shipped rule reads a key that follows traffic volume unguarded."""
    alerting = default_alerting()
    for rel in alerting.relative:
        assert rel.metric in VOLUME_FREE | GUARDED, rel.metric
        assert rel.min_z == MIN_Z, rel.alert  # and significance on every baseline ratio
    for trend in alerting.predictive:
        assert trend.metric in VOLUME_FREE | GUARDED, trend.metric
        assert trend.matchers == TREND_WINDOW, trend.alert  # the day window's steady volume
    for bound in alerting.absolute:  # effective rank falls at low N: judged from 100 samples
        assert bound.metric in VOLUME_FREE | {"effective_rank"}, bound.metric
        assert (bound.min_samples or 0) >= 100, bound.alert
    assert all(d.min_mmd is not None for d in alerting.drift)
    exprs = " ".join(r["expr"] for g in render_rules(alerting)["groups"] for r in g["rules"])
    allowed = VOLUME_FREE | GUARDED | {"effective_rank", "sample_count"}
    for key in (*REPORT_KEYS, *DRIFT_KEYS):
        if key not in allowed and not key.endswith("_stderr"):
            assert re.search(rf"\b{gauge_name(key)}\b", exprs) is None, key
    for key in ("drift_nc1_cdnv_ratio", "effective_rank", "sample_count"):  # the check bites
        assert re.search(rf"\b{gauge_name(key)}\b", exprs), key


def test_docs_say_how_every_key_depends_on_volume() -> None:
    """docs/metrics.md's volume table has one row per metric key (stderrs: one sentence)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    section = text.split("## How each metric depends on traffic volume and class count\n")[1]
    section = section.split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.M)
    keys = [k for k in (*REPORT_KEYS, *DRIFT_KEYS) if not k.endswith("_stderr")]
    assert sorted(rows) == sorted(keys)
    assert "`<key>_traffic_stderr` and `drift_<k>_ratio_stderr` shrink" in section


# ------------------------------------------------------------- docs/metrics.md numbers
def volume_table(seed: int = 1) -> None:
    """Every metric key of the acceptance model (isotropic class means) and of the same model
    with class means in an 8-dimensional subspace, at N = 2,000 and 250,000, with drift against
    a third, 250,000-sample window (10 buckets) as the baseline: markdown rows for
    docs/metrics.md. `nc4 at ingestion` = NC4 of the window's samples against the class means of
    an earlier window of the same volume (what the service counts). About a minute."""
    rff = RFFConfig(dim=DIM, features=256, bandwidths=(8.0, 16.0), seed=0)
    columns: list[dict[str, Any]] = []
    for rank in (None, 8):
        model = make_model(rank)
        head = torch.from_numpy(model.head)
        parts = [
            draw(model, 25_000, seed + 100 + b, keep=2_000, second_moment=True, rff=rff)
            for b in range(10)
        ]
        base_stats = CollapseStats.merged([p for p, _ in parts])
        base_eval = torch.from_numpy(np.concatenate([x for _, x in parts]))
        base = compute_metrics(base_stats, head, eval_features=base_eval).as_dict()
        buckets = [bucket_sums(p) for p, _ in parts]
        for n in (2_000, 250_000):
            stats, sample = draw(model, n, seed, keep=20_000, second_moment=True, rff=rff)
            prev, _ = draw(model, n, seed + 50)  # the previous evaluation, for NC4 at ingestion
            ev = torch.from_numpy(sample)
            m: dict[str, Any] = dict(compute_metrics(stats, head, eval_features=ev).as_dict())
            m["nc4 at ingestion"] = compute_metrics(prev, head, eval_features=ev).value(
                "nc4_ncc_agreement"
            )
            kw: dict[str, Any] = {"window_metrics": m, "base_metrics": base}
            m.update(compute_drift(stats, base_stats, base_buckets=buckets, **kw).as_dict())
            lax = compute_drift(
                stats, base_stats, max_mean_noise=math.inf, min_samples_per_dim=0.0, **kw
            ).as_dict()
            for key in ("nc2_equiangularity_std", "nc4_ncc_agreement"):
                m[f"drift_{key}_ratio unguarded"] = lax[f"drift_{key}_ratio"]
            columns.append({k: v for k, v in m.items() if not k.endswith("_stderr")})
    print("| key | isotropic, N = 2,000 | 250,000 | rank 8, N = 2,000 | 250,000 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key in columns[0]:
        cells = ["null" if c[key] is None else f"{c[key]:.4g}" for c in columns]
        print(f"| `{key}` | {' | '.join(cells)} |")
    model = make_model()
    for n in (3 * DIM, 10 * DIM, 30 * DIM, 4_000 * DIM):
        stats, _ = draw(model, n, seed, second_moment=True)
        print(f"effective_rank at N = {n // DIM} d: {compute_metrics(stats).effective_rank:.4g}")


def resolution_study(windows: int = 40) -> None:
    """How the cut RESOLUTION trades tails against bias: for six models, the 5th, 50th and 95th
    percentiles over `windows` windows of N = 2,000 of the relative difference (%) from one
    window of N = 250,000, for the plug-in CDNV and both unbiased keys. A few minutes."""
    models = [(None, 1.0, 64), (None, 0.5, 64), (8, 1.0, 64), (4, 1.0, 64), (8, 1.0, 256),
              (None, 0.5, 256)]  # fmt: skip
    keys = ("nc1_cdnv", *UNBIASED)
    saved = pairwise.RESOLUTION
    try:
        for rank, scale, dim in models:
            model = make_model(rank, scale, dim)
            large, _ = draw(model, 250_000, 1)
            small = [draw(model, 2_000, seed)[0] for seed in range(100, 100 + windows)]
            print(f"rank {rank}, scale {scale}, d = {dim}:")
            for cut in (0.0, 0.25, 0.5, 1.0):
                pairwise.RESOLUTION = cut
                ref = compute_metrics(large).as_dict()
                got = [compute_metrics(s).as_dict() for s in small]
                cells = []
                for key in keys:
                    rel = [100 * (float(g[key]) / float(ref[key]) - 1) for g in got]
                    q = np.percentile(rel, [5, 50, 95])
                    cells.append(f"{key} {q[0]:+.0f} / {q[1]:+.0f} / {q[2]:+.0f}")
                print(f"  RESOLUTION {cut}: " + "; ".join(cells), flush=True)
    finally:
        pairwise.RESOLUTION = saved
