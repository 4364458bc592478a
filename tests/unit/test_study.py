"""`collapse-monitor study` over two tiny real checkpoints, and its correlation functions.

The correlations are checked against hand-written float64 formulas; the study's validation loss
against a direct computation with the model's logits; its CSV against its JSON.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model
from monitor.data import read_corpus
from monitor.errors import InvalidInput
from monitor.metrics import REPORT_KEYS
from monitor.offline.correlation import (
    average_ranks,
    choose_scale,
    correlate,
    pearson,
    spearman,
)
from monitor.offline.study import (
    DERIVED_KEYS,
    STUDY_KEYS,
    checkpoint_names,
    resolve_checkpoints,
    token_windows,
)

SPEC = TinyModelSpec(vocab_size=300, n_embd=32, n_layer=1, n_head=2, max_steps=2, max_seconds=30)


# --- correlation: brute-force references ---------------------------------------------------


def ref_pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def ref_ranks(x: list[float]) -> list[float]:
    # rank = (number below) + (number equal + 1) / 2: the average of the tied ranks.
    return [sum(b < a for b in x) + (sum(b == a for b in x) + 1) / 2 for a in x]


def test_pearson_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(1)
    for n in (3, 7, 40):
        x = rng.normal(size=n).tolist()
        y = (0.3 * np.asarray(x) + rng.normal(size=n)).tolist()
        assert pearson(x, y) == pytest.approx(ref_pearson(x, y), abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([1.0], [2.0]) is None


def test_ranks_average_ties_and_spearman_matches_ranks_then_pearson() -> None:
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3]).tolist() == [3.0, 1.0, 3.0, 3.0]
    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, size=30).astype(float).tolist()  # many ties
    y = rng.integers(0, 5, size=30).astype(float).tolist()
    assert average_ranks(x).tolist() == ref_ranks(x)
    assert spearman(x, y) == pytest.approx(ref_pearson(ref_ranks(x), ref_ranks(y)), abs=1e-12)


def test_spearman_is_one_under_monotone_transforms() -> None:
    x = np.random.default_rng(3).uniform(0.1, 5.0, size=25)
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert spearman(x, -np.log(x)) == pytest.approx(-1.0)
    assert pearson(x, np.exp(3 * x)) < 0.99  # not linear: Pearson is below 1


def test_scale_choice_and_log_scale_r2() -> None:
    assert choose_scale([1e-3, 5e-3, 2e-1]) == "log10"
    assert choose_scale([1.0, 9.0]) == "linear"  # under a decade
    assert choose_scale([-1.0, 100.0]) == "linear"  # not all positive
    metric = [1e-4, 1e-3, 3e-3, 1e-2, 1e-1]
    loss = [2.0 + 0.5 * math.log10(m) for m in metric]  # exactly linear in log10(metric)
    c = correlate("nc1_cdnv", [*metric, None], [*loss, 9.0], expected_sign=1)
    assert (c.n, c.scale) == (5, "log10")  # the None point is dropped with its loss
    assert c.r2 == pytest.approx(1.0)
    assert c.spearman_rho == pytest.approx(1.0)
    assert c.agrees is True
    lin = [3.0, 1.0, 2.0, 5.0]
    worse = [1.0, 4.0, 2.0, 0.5]
    c = correlate("nc4_ncc_agreement", lin, worse, expected_sign=1)
    assert c.scale == "linear"
    assert c.pearson_r == pytest.approx(ref_pearson(lin, worse))
    assert c.r2 == pytest.approx(ref_pearson(lin, worse) ** 2)
    assert c.agrees is False
    few = correlate("x", [1.0, 2.0], [1.0, 2.0])
    assert few.n == 2
    assert few.pearson_r is None
    assert few.spearman_rho is None


# --- inputs ----------------------------------------------------------------------------------


def test_windows_are_disjoint_evenly_spread_and_bounded() -> None:
    stream = torch.arange(1000)
    w = token_windows(stream, 64, 256)  # budget: 4 windows of the 15 that fit
    assert w.shape == (4, 64)
    starts = w[:, 0].tolist()
    assert starts[0] == 0
    assert starts[-1] == 14 * 64
    assert all(b - a >= 64 for a, b in itertools.pairwise(starts))
    assert token_windows(torch.arange(10), 64, 1000).tolist() == [list(range(10))]
    with pytest.raises(InvalidInput):
        token_windows(torch.arange(1), 64, 1000)


def test_checkpoint_folders_expand_and_names_are_unique(tmp_path: Path) -> None:
    for run in ("a", "b"):
        (tmp_path / run / "final").mkdir(parents=True)
        (tmp_path / run / "final" / "config.json").write_text("{}")
    found = resolve_checkpoints([tmp_path / "a", tmp_path / "b" / "final"])
    assert found == [tmp_path / "a" / "final", tmp_path / "b" / "final"]
    assert checkpoint_names(found) == ["a/final", "b/final"]
    with pytest.raises(InvalidInput, match="not a checkpoint"):
        resolve_checkpoints([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"no config\.json"):
        resolve_checkpoints([tmp_path / "empty"])


# --- the command end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study")
    build_tiny_model(root / "ckpt" / "short", SPEC)
    build_tiny_model(root / "ckpt" / "long", TinyModelSpec(**{**SPEC.__dict__, "max_steps": 12}))
    train, val = root / "train.txt", root / "val.txt"
    train.write_text("\n".join(" ".join(d.split()) for d in read_corpus("train")) + "\n")
    val.write_text("\n".join(" ".join(d.split()) for d in read_corpus("heldout")) + "\n")
    return {"root": root, "ckpt": root / "ckpt", "train": train, "val": val}


def run_study_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "study", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


def direct_val_loss(path: Path, lines: list[str]) -> tuple[float, int]:
    """Every text + EOS, cut into consecutive 256-token windows, CE of each next token."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok: Any = AutoTokenizer.from_pretrained(path)
    model: Any = GPT2LMHeadModel.from_pretrained(path).eval()
    ids: list[int] = []
    for line in lines:
        ids += [*tok.encode(line, add_special_tokens=False), tok.eos_token_id]
    length = 256
    total, count = 0.0, 0
    for w in range(len(ids) // length):
        window = torch.tensor([ids[w * length : (w + 1) * length]])
        with torch.no_grad():
            logits = model(input_ids=window).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(length - 1):
            total -= float(logp[t, window[0, t + 1]])
            count += 1
    return total / count, count


@pytest.mark.slow
def test_study_writes_consistent_tables_plots_and_true_val_loss(
    family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    meta = tmp_path / "meta.csv"
    meta.write_text("checkpoint,run,tokens_seen\nshort,one-run,2048\nlong,one-run,12288\n")
    proc = run_study_cli(
        "--checkpoints", family["ckpt"],
        "--corpus", family["train"],
        "--eval-corpus", family["val"],
        "--out", out,
        "--meta", meta,
        "--max-tokens", "4096",
        "--max-eval-tokens", "1000000",
        "--format", "json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "study.json").read_text())
    assert doc["schema_version"] == 2
    assert doc["controls"] == ["log10_parameters", "log10_tokens_seen"]
    assert doc["bootstrap"] == {
        "cluster": "run", "runs": 1, "resamples": 2000, "level": 0.95, "seed": 0
    }  # fmt: skip
    rows = doc["checkpoints"]
    assert [r["name"] for r in rows] == ["long", "short"]  # sorted folder listing
    for name in ("study.csv", "correlations.csv", "overview.png", "nc1_cdnv.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with (out / "study.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["name"] for t in table] == ["long", "short"]
    for row, line in zip(rows, table, strict=True):
        assert float(line["val_loss"]) == row["val_loss"]
        assert (line["run"], int(line["tokens_seen"])) == (row["run"], row["tokens_seen"])
        for key in REPORT_KEYS:
            want = row["metrics"][key]
            assert (line[key] == "") if want is None else float(line[key]) == want, key
        for key in DERIVED_KEYS:
            assert float(line[key]) == row["derived"][key], key
        # nc1_cdnv2 * the squared class-mean scale, as docs/metrics.md defines it.
        assert row["derived"]["nc1_cdnv2_scale_free"] == pytest.approx(
            row["metrics"]["nc1_cdnv2"] * row["derived"]["class_mean_sq_norm"], rel=1e-12
        )
    assert {r["name"]: r["tokens_seen"] for r in rows} == {"short": 2048, "long": 12288}

    val_lines = family["val"].read_text().splitlines()
    for row in rows:
        loss, count = direct_val_loss(Path(row["path"]), val_lines)
        assert row["eval_tokens"] == count
        assert row["val_loss"] == pytest.approx(loss, rel=1e-5)
        # Metrics come from the train corpus: every labelled position of the 4096-token budget.
        assert row["metrics"]["sample_count"] == row["train_tokens"] == 16 * 255
        assert row["metrics"]["nc1_cdnv"] is not None
        assert row["metrics"]["nc1_cdnv"] > 0
        assert 0.0 <= row["metrics"]["nc4_ncc_agreement"] <= 1.0
    short, long = rows[1], rows[0]
    assert long["val_loss"] < short["val_loss"]  # 12 steps beat 2 steps
    # Two checkpoints cannot give a correlation: reported as null, not as a number.
    corr = {c["metric"]: c for c in doc["correlations"]}
    assert corr["nc1_cdnv"]["n"] == 2
    assert corr["nc1_cdnv"]["r2"] is None
    assert corr["nc1_cdnv"]["runs"] == 1
    assert corr["nc1_cdnv"]["pearson_ci"] is None
    assert corr["nc1_cdnv"]["partial_r"] is None
    assert set(corr) == set(STUDY_KEYS)
    with (out / "correlations.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[:6] == ["metric", "n", "runs", "scale", "pearson_r", "pearson_ci_low"]
    assert "partial_rho_ci_high" in header


def test_table_output_names_every_checkpoint_and_metric(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from monitor.cli import app

    args = [
        "study",
        "--checkpoints", family["ckpt"] / "short",
        "--checkpoints", family["ckpt"] / "long",
        "--corpus", family["train"],
        "--eval-corpus", family["val"],
        "--out", tmp_path,
        "--max-tokens", "512",
        "--max-eval-tokens", "512",
        "--no-plots",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "correlation with validation loss" in result.output
    for word in ("short", "long", "nc1_cdnv2", "nc4_ncc_agreement", "effective_rank"):
        assert word in result.output, word
    assert not list(tmp_path.glob("*.png"))  # --no-plots
    assert (tmp_path / "study.csv").exists()


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(family: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = {
        "not a checkpoint directory": ["--checkpoints", tmp_path / "nope"],
        "no non-blank lines": ["--checkpoints", family["ckpt"], "--corpus", empty],
    }
    for message, args in cases.items():
        base: dict[str, Any] = {
            "--checkpoints": family["ckpt"],
            "--corpus": family["train"],
            "--eval-corpus": family["val"],
            "--out": tmp_path / "o",
        }
        for flag, value in zip(args[::2], args[1::2], strict=True):
            base[str(flag)] = value
        proc = run_study_cli(*[x for kv in base.items() for x in kv])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert message in lines[0], proc.stderr
        assert not (tmp_path / "o").exists()


def test_help_documents_the_inference_and_the_json_schema() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "study", "--help"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for word in ("--meta", "--resamples", "--bootstrap-seed", "partial_r_ci", "schema_version 2",
                 "nc1_cdnv2_scale_free", "resample whole runs"):  # fmt: skip
        assert word in text, word
