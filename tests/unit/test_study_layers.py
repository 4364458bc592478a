"""`study --layers`: head-free metrics of every hidden state, checked against a float64 brute force.

The reference collects the hidden states with plain `transformers` calls
(`output_hidden_states=True`) over consecutive windows of the whole token stream (the study's
windows when its budget exceeds the corpus), and computes the metrics with `brute_force.py`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from brute_force import brute_force_metrics
from typer.testing import CliRunner

from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model
from monitor.config import Settings
from monitor.data import read_corpus

SPEC = TinyModelSpec(vocab_size=300, n_embd=32, n_layer=2, n_head=2, max_steps=3, max_seconds=30)
CONTEXT = 64
# Head-free keys with a value on this corpus (the *_stderr keys are None: pairs are exact).
CHECKED = (
    "nc1_cdnv", "nc1_cdnv2", "nc1_cdnv_unbiased", "nc1_cdnv2_unbiased", "nc1_trace_ratio",
    "nc2_equinorm_cv", "nc2_equiangularity_mean", "nc2_equiangularity_std",
    "nc2_log_energy_mean", "nc2_log_energy_std", "anisotropy_mean_cos", "effective_rank",
    "class_count", "sample_count", "mean_noise_ratio",
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layers")
    build_tiny_model(root / "ckpt", SPEC)
    train, val = root / "train.txt", root / "val.txt"
    train.write_text("\n".join(" ".join(d.split()) for d in read_corpus("train")[:20]) + "\n")
    val.write_text("\n".join(" ".join(d.split()) for d in read_corpus("heldout")) + "\n")
    return {"ckpt": root / "ckpt", "train": train, "val": val}


def run_cli(setup: dict[str, Path], out: Path, *extra: str) -> str:
    from monitor.cli import app

    args = [
        "study", "--checkpoints", str(setup["ckpt"]), "--corpus", str(setup["train"]),
        "--eval-corpus", str(setup["val"]), "--out", str(out), "--max-tokens", "1000000",
        "--max-eval-tokens", "512", "--context", str(CONTEXT), "--resamples", "0",
        "--no-plots", "--device", "cpu", *extra,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def reference_states(path: Path, lines: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Every hidden state (float64) at positions 0..T-2 of consecutive windows, and labels."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok: Any = AutoTokenizer.from_pretrained(path)
    model: Any = GPT2LMHeadModel.from_pretrained(path).eval()
    ids: list[int] = []
    for line in lines:
        ids += [*tok.encode(line, add_special_tokens=False), tok.eos_token_id]
    windows = torch.tensor(ids[: len(ids) // CONTEXT * CONTEXT]).reshape(-1, CONTEXT)
    with torch.no_grad():
        states = model(input_ids=windows, output_hidden_states=True).hidden_states
    feats = [s[:, :-1].reshape(-1, s.shape[-1]).double().numpy() for s in states]
    return feats, windows[:, 1:].reshape(-1).numpy()


def mean_sq_norm(x: np.ndarray, y: np.ndarray, min_count: int) -> float:
    ids = [c for c in np.unique(y) if np.sum(y == c) >= min_count]
    means = np.stack([x[y == c].mean(axis=0) for c in ids])
    centred = means - means.mean(axis=0)
    return float(np.mean(np.sum(centred**2, axis=1)))


@pytest.mark.slow
def test_layers_match_a_brute_force_over_plain_hidden_states(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    text = run_cli(setup, tmp_path, "--layers")
    assert "per layer" in text
    doc = json.loads((tmp_path / "study.json").read_text())
    assert doc["options"]["layers"] is True
    (row,) = doc["checkpoints"]
    layers = row["layers"]
    assert [x["layer"] for x in layers] == list(range(SPEC.n_layer + 1))
    # GPT-2's last hidden state is after ln_f: the LM head's input; no other layer is.
    assert [x["head_input"] for x in layers] == [False] * SPEC.n_layer + [True]
    for layer in layers:
        assert not any(k.startswith(("nc3_", "nc4_")) for k in layer["metrics"])

    feats, labels = reference_states(Path(row["path"]), setup["train"].read_text().splitlines())
    assert len(feats) == SPEC.n_layer + 1
    min_count = Settings().min_count
    for layer, x in zip(layers, feats, strict=True):
        want = brute_force_metrics(x, labels, min_count=min_count)
        got = layer["metrics"]
        assert got["sample_count"] == labels.size == row["train_tokens"]
        for key in CHECKED:
            assert want[key] is not None, key
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), (layer["layer"], key)
        scale2 = mean_sq_norm(x, labels, min_count)
        assert layer["derived"]["class_mean_sq_norm"] == pytest.approx(scale2, rel=1e-5)
    # The head-input layer is the states the main metrics measure (through the probe).
    for key in CHECKED:
        assert layers[-1]["metrics"][key] == pytest.approx(row["metrics"][key], rel=1e-6), key
    # Embeddings and the last block differ: the layers are not one state repeated.
    assert layers[0]["metrics"]["nc1_cdnv"] != pytest.approx(layers[-1]["metrics"]["nc1_cdnv"])

    with (tmp_path / "layers.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [int(t["layer"]) for t in table] == list(range(SPEC.n_layer + 1))
    for line, layer in zip(table, layers, strict=True):
        assert float(line["nc1_cdnv2"]) == layer["metrics"]["nc1_cdnv2"]
        assert "nc4_ncc_agreement" not in line  # the head-free keys only
    corr = doc["layer_correlations"]
    assert {c["layer"] for c in corr} == set(range(SPEC.n_layer + 1))
    assert all(c["n"] == 1 and c["spearman_rho"] is None for c in corr)  # one checkpoint
    assert (tmp_path / "layer_correlations.csv").read_text().startswith("layer,metric,n,")


def test_without_layers_the_json_has_no_layers(setup: dict[str, Path], tmp_path: Path) -> None:
    text = run_cli(setup, tmp_path)
    assert "per layer" not in text
    doc = json.loads((tmp_path / "study.json").read_text())
    assert doc["options"]["layers"] is False
    assert "layer_correlations" not in doc
    assert all("layers" not in row for row in doc["checkpoints"])
    assert not (tmp_path / "layers.csv").exists()
