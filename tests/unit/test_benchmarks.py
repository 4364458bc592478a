"""The benchmark scripts that claim numbers: their exact baselines are right, and gpu.sh runs.

bench_mmd's exact MMD is checked against a brute-force float64 computation written here from
the definition (every pair, no tiles, no factorised kernel); the product's RFF estimate is
checked against that same brute force. gpu.sh's --dry-run must run every step on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_mmd  # noqa: E402


def brute_force_mmd2(x: np.ndarray, y: np.ndarray, sigmas: list[float]) -> float:
    """Unbiased MMD^2 with k = mean of Gaussians, from every pairwise distance (i != j)."""

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
        return np.mean([np.exp(-d2 / (2.0 * s * s)) for s in sigmas], axis=0)

    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_x = kxx.sum() - np.trace(kxx)
    off_y = kyy.sum() - np.trace(kyy)
    return float(off_x / (n * (n - 1)) + off_y / (m * (m - 1)) - 2.0 * kxy.sum() / (n * m))


def test_bench_mmd_quick_matches_brute_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mmd.json"
    assert bench_mmd.main(["--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| N | case | method |" in table
    assert "out of memory" in table
    result = json.loads(out.read_text())
    sigmas, args = result["sigmas"], result["args"]
    # The product's bandwidths: half, once and twice a median distance, which for N(0, I_d)
    # rows is about sqrt(2 d).
    assert sigmas[0] * 2 == pytest.approx(sigmas[1]) == pytest.approx(sigmas[2] / 2)
    assert sigmas[1] == pytest.approx(np.sqrt(2 * args["dim"]), rel=0.15)

    exact_rows = [r for r in result["rows"] if r["method"] == "exact" and r["mmd2"] is not None]
    assert {(r["n"], r["case"]) for r in exact_rows} == {
        (n, c) for n in (300, 1_000) for c in ("same", "shifted")
    }
    cpu = torch.device("cpu")
    for row in exact_rows:
        shift = args["shift"] if row["case"] == "shifted" else 0.0
        x = bench_mmd.make_samples(row["n"], args["dim"], 1, 0.0, cpu).double().numpy()
        y = bench_mmd.make_samples(row["n"], args["dim"], 2, shift, cpu).double().numpy()
        # The shifted sample really is shifted by `shift` (and the other one is not).
        assert y.mean() - x.mean() == pytest.approx(shift, abs=0.05)
        expected = brute_force_mmd2(x, y, sigmas)
        assert row["mmd2"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        if row["case"] == "shifted":
            # The product's RFF estimate with the most features is close to the exact value.
            rff = [
                r
                for r in result["rows"]
                if (r["n"], r["case"], r["method"]) == (row["n"], "shifted", "rff")
            ]
            best = max(rff, key=lambda r: r["features"])
            assert best["features"] == 4_096
            assert best["mmd2"] == pytest.approx(expected, rel=0.05)
    # Where exact did not run its time is an estimate, marked as such.
    estimated = [r for r in result["rows"] if r["method"] == "exact" and r["mmd2"] is None]
    assert estimated
    assert all(r["estimated"] and r["seconds"] > 0 for r in estimated)


def test_kernel_sum_symmetric_tiles_match_full_tiles() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    sigmas = (0.7, 1.4, 2.8)
    full = bench_mmd.kernel_sum(x, x, sigmas, tile=8, symmetric=False)
    assert bench_mmd.kernel_sum(x, x, sigmas, tile=8, symmetric=True) == pytest.approx(
        full, rel=1e-12
    )
    d2 = torch.cdist(x, x) ** 2
    direct = sum(float(torch.exp(-d2 / (2 * s * s)).sum()) for s in sigmas) / 3
    assert full == pytest.approx(direct, rel=1e-10)


def test_gpu_sh_dry_run_runs_every_step_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    env = {**os.environ, "GPU_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # five steps of at most 60 s each
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text == proc.stdout
    for step in (
        "pytest -m gpu",
        "bench_update",
        "bench_evaluate",
        "bench_mmd",
        "bench_scale_eval",
    ):
        assert f"| {step} | 0 |" in text, text[:2000]
    assert "Card: none (dry run on the CPU)" in text
    assert "- metrics, K = 3,000, d = 64:" in text  # the LLM-scale row's headline, at toy size
    # The gpu-marked tests exist and are what the GPU run executes.
    assert "tests collected" in text
    assert " 0/" not in text


def test_gpu_sh_refuses_unknown_arguments() -> None:
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def brute_force_pairs(m: np.ndarray, var: np.ndarray) -> dict[str, float]:
    """Every pair c < c' from differences (no Gram identity), with the engine's exclusions."""
    cdnv, cdnv2, cos, log_energy = [], [], [], []
    k = len(m)
    for i in range(k):
        for j in range(i + 1, k):
            d2 = float(((m[i] - m[j]) ** 2).sum())
            if d2 > 0:
                cdnv.append((var[i] + var[j]) / (2 * d2))
                cdnv2.append((var[i] + var[j]) / (2 * d2 * d2))
            ni, nj = np.linalg.norm(m[i]), np.linalg.norm(m[j])
            if ni > 0 and nj > 0:
                cos.append(float(m[i] @ m[j] / (ni * nj)))
                chord2 = float(((m[i] / ni - m[j] / nj) ** 2).sum())  # 0 for equal directions
                if chord2 > 0:
                    log_energy.append(-0.5 * np.log(chord2))
    return {
        "nc1_cdnv": float(np.mean(cdnv)),
        "nc1_cdnv2": float(np.mean(cdnv2)),
        "nc2_equiangularity_mean": float(np.mean(cos)),
        "nc2_equiangularity_std": float(np.std(cos)),
        "nc2_log_energy_mean": float(np.mean(log_energy)),
        "nc2_log_energy_std": float(np.std(log_energy)),
    }


@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("tile", [2, 3, 64])
def test_exact_pairs_with_masked_pairs_in_every_tile_position(tile: int, duplicate: bool) -> None:
    """The pair walk's shortcuts (no masks when a tile has nothing to mask, no cancellation
    pass when no pair is near it) against brute force, with a duplicated mean, a zero mean and
    a near-duplicate (cancellation) pair lying in off-diagonal tiles."""
    from monitor.metrics.pairwise import PairInputs, exact_pair_metrics

    rng = np.random.default_rng(5)
    m = rng.normal(size=(13, 4)) * 3.0
    if duplicate:
        m[9] = m[2]  # coinciding means: no CDNV for the pair
    m[7] = 0.0  # a mean at the origin: left out of the angles
    m[12] = m[5] + 1e-5  # near-duplicate: the Gram identity would cancel in ||m_5 - m_12||^2
    var = rng.uniform(0.5, 2.0, size=13)
    got = exact_pair_metrics(
        PairInputs(torch.from_numpy(m), torch.from_numpy(var), torch.from_numpy((m * m).sum(1))),
        tile=tile,
    )
    expected = brute_force_pairs(m, var)
    for key, value in expected.items():
        if duplicate and "log_energy" in key:
            # The log energy of two equal directions is infinite; whether the engine's
            # 2 - 2 cos rounds to exactly 0 (and drops the pair) depends on the GEMM.
            continue
        # The log energy of the near-duplicate pair is -log of a chord of ~1e-6, which the
        # engine's and this cosine round differently; CDNV is recomputed exactly.
        rel = 1e-5 if "log_energy" in key else 1e-9
        assert got[key].value == pytest.approx(value, rel=rel), key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_bench_store_scale_tiny_runs_every_phase(tmp_path: Path) -> None:
    """The store benchmark's smoke run (as run_all --quick runs it): real Redis, workers and
    beat, the old store in a child; every phase reports, and the counts add up."""
    out = tmp_path / "store.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_store_scale.py", "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phrase in (
        "sustained ingest + compaction",
        "arrival -> snapshot `24h`",
        "largest Redis value",
        "Redis memory of the model (after growth",
        "`window_stats` of a window of K = 2,000 classes",
        "| window K | classes the batches touch",
    ):
        assert phrase in proc.stdout, phrase
    result = json.loads(out.read_text())
    sent = result["throughput"]["samples"]
    assert result["throughput"]["memory"]["window_counts"] == {"15m": sent, "1h": sent, "24h": sent}
    new, old = result["growth"]["stages"], result["before"]["stages"]
    assert [s["classes"] for s in new] == [s["classes"] for s in old] == [100, 400]
    assert result["read"]["classes"] == 2_000
    assert len(result["latency"]["to_last"]) == result["latency"]["batches"]
