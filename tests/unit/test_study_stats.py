"""The study's inference: partial correlations, the run-clustered bootstrap, run metadata and
the scale-free CDNV, each against a computation written independently here (float64)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.errors import InvalidInput
from monitor.metrics import compute_metrics
from monitor.offline.study import class_mean_sq_norm, derived_values
from monitor.offline.study_meta import read_meta
from monitor.offline.study_stats import (
    analyse,
    bootstrap_interval,
    cluster_plan,
    control_matrix,
    partial_pearson,
    partial_spearman,
    plain_pearson,
    plain_spearman,
)
from monitor.stats import CollapseStats


def precision_partial(data: np.ndarray) -> float:
    """Partial correlation of columns 0 and 1 given the others: -P01 / sqrt(P00 P11), with P
    the inverse of the correlation matrix (the textbook identity, no regression involved)."""
    p = np.linalg.inv(np.corrcoef(data, rowvar=False))
    return float(-p[0, 1] / math.sqrt(p[0, 0] * p[1, 1]))


def ranks(column: np.ndarray) -> np.ndarray:
    """Average ranks by counting: rank = #smaller + (#equal + 1) / 2."""
    return np.array(
        [np.sum(column < v) + (np.sum(column == v) + 1) / 2 for v in column], dtype=np.float64
    )


def test_partial_r_matches_the_closed_form_of_the_3x3_correlation_matrix() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=40)
    x = 2.0 * z + rng.normal(size=40)
    y = -1.5 * z + 0.5 * x + rng.normal(size=40)
    r = np.corrcoef(np.column_stack([x, y, z]), rowvar=False)
    want = (r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))
    assert partial_pearson(x, y, z[:, None]) == pytest.approx(want, abs=1e-12)
    # The controls change the answer: plain r is far from the partial here.
    assert abs(r[0, 1] - want) > 0.1


def test_partial_r_and_rho_with_two_controls_match_the_precision_matrix() -> None:
    rng = np.random.default_rng(2)
    params, tokens = rng.uniform(4, 7, 30), rng.uniform(5, 7, 30)
    x = params + tokens + rng.normal(scale=0.5, size=30)
    y = -params - 0.5 * tokens + 0.3 * x + rng.normal(scale=0.5, size=30)
    controls = np.column_stack([params, tokens])
    want = precision_partial(np.column_stack([x, y, controls]))
    assert partial_pearson(x, y, controls) == pytest.approx(want, abs=1e-12)
    ranked = np.column_stack([ranks(c) for c in (x, y, params, tokens)])
    assert partial_spearman(x, y, controls) == pytest.approx(precision_partial(ranked), abs=1e-12)


def test_partial_is_none_when_the_controls_explain_a_side_or_too_few_points() -> None:
    z = np.arange(6.0)
    controls = z[:, None]
    assert partial_pearson(3.0 * z + 1.0, np.sin(z), controls) is None
    assert (
        partial_pearson(np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 3.0]), controls[:3]) is None
    )


def brute_force_interval(
    x: np.ndarray, y: np.ndarray, runs: list[str], seed: int, resamples: int, rank: bool
) -> tuple[float, float]:
    """The cluster bootstrap spelled out: a dict of runs, a loop, np.corrcoef, np.percentile."""
    by_run: dict[str, list[tuple[float, float]]] = {}
    for xi, yi, run in zip(x, y, runs, strict=True):
        by_run.setdefault(run, []).append((xi, yi))
    labels = list(by_run)  # first-appearance order, as the plan numbers them
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picked = rng.integers(0, len(labels), len(labels))
        pts = np.array([p for c in picked for p in by_run[labels[int(c)]]])
        a, b = (ranks(pts[:, 0]), ranks(pts[:, 1])) if rank else (pts[:, 0], pts[:, 1])
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        values.append(np.corrcoef(a, b)[0, 1])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def test_cluster_bootstrap_matches_a_brute_force_loop() -> None:
    rng = np.random.default_rng(3)
    runs = [f"run{g}" for g in range(5) for _ in range(3)]
    runs = runs[3:] + runs[:3]  # not in sorted order: numbering follows first appearance
    x = rng.normal(size=15)
    y = 0.6 * x + rng.normal(size=15)
    plan = cluster_plan(runs, resamples=300, seed=11)
    controls = np.empty((15, 0))
    for stat, rank in ((plain_pearson, False), (plain_spearman, True)):
        got = bootstrap_interval(stat, x, y, controls, plan)
        assert got is not None
        low, high = brute_force_interval(x, y, runs, seed=11, resamples=300, rank=rank)
        assert (got.low, got.high) == (
            pytest.approx(low, abs=1e-12),
            pytest.approx(high, abs=1e-12),
        )
        assert got.valid == 300


def test_checkpoint_bootstrap_is_too_narrow_when_checkpoints_of_a_run_move_together() -> None:
    """Eight runs of ten near-identical checkpoints, run effects independent in x and y: the
    truth is r = 0, there are 8 independent points, not 80. Resampling checkpoints gives an
    interval that excludes 0; resampling runs one that covers it, several times wider."""
    rng = np.random.default_rng(0)
    runs = [f"r{g}" for g in range(8) for _ in range(10)]
    a, b = rng.normal(size=8), rng.normal(size=8)
    x = np.repeat(a, 10) + rng.normal(scale=0.05, size=80)
    y = np.repeat(b, 10) + rng.normal(scale=0.05, size=80)
    controls = np.empty((80, 0))
    by_run = bootstrap_interval(plain_pearson, x, y, controls, cluster_plan(runs, 1000, 5))
    by_ckpt = bootstrap_interval(
        plain_pearson, x, y, controls, cluster_plan([str(i) for i in range(80)], 1000, 5)
    )
    assert by_run is not None
    assert by_ckpt is not None
    assert by_run.low < 0.0 < by_run.high
    assert not by_ckpt.low < 0.0 < by_ckpt.high
    assert (by_run.high - by_run.low) > 2.5 * (by_ckpt.high - by_ckpt.low)


def test_one_run_gives_no_interval() -> None:
    plan = cluster_plan(["a"] * 5, resamples=50)
    x = np.arange(5.0)
    assert plan.resamples == []
    assert bootstrap_interval(plain_pearson, x, x, np.empty((5, 0)), plan) is None


def test_analyse_uses_log10_inside_the_bootstrap_and_skips_null_rows() -> None:
    rng = np.random.default_rng(4)
    n = 24
    runs = [f"r{i // 3}" for i in range(n)]
    params = [10_000 * (1 + i % 4) for i in range(n)]
    tokens = [1000 * (1 + i % 3) for i in range(n)]
    metric = list(10.0 ** rng.uniform(-3, 0, n))
    loss = [math.log10(m) + rng.normal(scale=0.2) for m in metric]
    values: list[float | None] = list(metric)
    values[5] = None
    result = analyse({"m": values}, loss, runs, params, tokens, {"m": 1}, resamples=200, seed=3)
    assert result.controls == ("log10_parameters", "log10_tokens_seen")
    assert result.runs == 8
    (corr,) = result.correlations
    assert (corr.scale, corr.n, corr.runs) == ("log10", n - 1, 8)
    keep = [i for i in range(n) if values[i] is not None]
    lx, ly = np.log10(np.array(metric))[keep], np.array(loss)[keep]
    assert corr.pearson_r == pytest.approx(np.corrcoef(lx, ly)[0, 1], abs=1e-12)
    controls = np.log10(np.column_stack([params, tokens]).astype(float))[keep]
    assert corr.partial_r == pytest.approx(
        precision_partial(np.column_stack([lx, ly, controls])), abs=1e-12
    )
    # The interval is of the log10 statistic: it holds the full-sample r.
    assert corr.pearson_ci is not None
    assert corr.pearson_ci.low <= corr.pearson_r <= corr.pearson_ci.high
    assert corr.partial_r_ci is not None
    assert corr.partial_rho_ci is not None


def test_control_matrix_leaves_out_unknown_tokens() -> None:
    names, matrix = control_matrix([100, 1000], [10, None])
    assert names == ("log10_parameters",)
    assert matrix.tolist() == [[2.0], [3.0]]
    names, matrix = control_matrix([100, 1000], [10, 100])
    assert names == ("log10_parameters", "log10_tokens_seen")
    assert matrix[:, 1].tolist() == [1.0, 2.0]


def test_read_meta(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("checkpoint,run,tokens_seen\na,r1,100\nb,r1,\nc,r2,300\n")
    meta = read_meta(path, ["b", "a"])
    assert list(meta) == ["b", "a"]
    assert (meta["a"].run, meta["a"].tokens_seen, meta["b"].tokens_seen) == ("r1", 100, None)
    bad = {
        "checkpoint,run\na,r1\n": "header",
        "checkpoint,run,tokens_seen\na,r1,-4\nb,r1,1\n": "tokens_seen",
        "checkpoint,run,tokens_seen\na,r1,1\na,r2,1\n": "twice",
        "checkpoint,run,tokens_seen\na,r1,1\n": "no row for b",
        "checkpoint,run,tokens_seen\na,,1\nb,r,1\n": "need checkpoint,run",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(InvalidInput, match=message) as err:
            read_meta(path, ["a", "b"])
        assert err.value.reason == "invalid_meta"


def test_scale_free_cdnv2_does_not_change_when_the_features_are_scaled() -> None:
    gen = torch.Generator().manual_seed(0)
    k, d, n = 12, 6, 600
    labels = torch.randint(0, k, (n,), generator=gen)
    centres = torch.randn(k, d, generator=gen, dtype=torch.float64) * 3
    features = centres[labels] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    found = []
    for factor in (1.0, 7.0):
        stats = CollapseStats(k, d)
        stats.update(features * factor, labels)
        report = compute_metrics(stats, min_count=2, keys=["nc1_cdnv2"])
        scale2 = class_mean_sq_norm(stats, 2, torch.device("cpu"))
        found.append(
            (
                report.value("nc1_cdnv2"),
                scale2,
                derived_values({"nc1_cdnv2": report.value("nc1_cdnv2")}, scale2)[
                    "nc1_cdnv2_scale_free"
                ],
            )
        )
    # Brute force: the unweighted mean of the class means as the centre (METRICS.md).
    x = features.numpy()
    y = labels.numpy()
    means = np.stack([x[y == c].mean(axis=0) for c in range(k) if np.sum(y == c) >= 2])
    want = float(np.mean(np.sum((means - means.mean(axis=0)) ** 2, axis=1)))
    (c1, s1, f1), (c7, s7, f7) = found
    assert s1 == pytest.approx(want, rel=1e-12)
    assert s7 == pytest.approx(49.0 * want, rel=1e-12)
    assert c7 == pytest.approx(c1 / 49.0, rel=1e-9)  # CDNV2 is not scale-invariant
    assert f7 == pytest.approx(f1, rel=1e-9)  # the scale-free form is
    assert derived_values({"nc1_cdnv2": None}, s1)["nc1_cdnv2_scale_free"] is None
