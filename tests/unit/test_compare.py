"""`collapse-monitor compare`: the regression gate between two model versions.

A real tiny GPT-2 (built in a few seconds from the bundled corpus) is the reference; the
candidates are the same checkpoint (must pass with zero change), the checkpoint with its final
layer norm crushed onto two dimensions (a planted collapse: must fail with exit 3, naming the
keys), and checkpoints that are not comparable (exit 2). Metric values in the JSON are checked
against a float64 brute force over hidden states collected here with plain transformers calls.
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
from brute_force import brute_force_metrics
from typer.testing import CliRunner

from monitor.capture.tinymodel import TinyModelSpec, ensure_tiny_model, train_tokenizer
from monitor.cli import app
from monitor.data import read_corpus
from monitor.errors import InvalidInput
from monitor.offline.compare import SCHEMA_VERSION, Status, judge, judge_metric
from monitor.offline.tolerances import (
    DEFAULT_ABSOLUTE,
    DEFAULT_RELATIVE,
    Tolerances,
    load_tolerances,
)

# Trained long enough (about 10 s) for a real spread of directions: effective rank near 4.
# Bounded by steps, not seconds (600 s is only a guard): a time bound gave a less trained model
# when an earlier test had left torch on one thread, and this file's values depend on it.
SPEC = TinyModelSpec(
    vocab_size=300, n_embd=32, n_layer=2, n_head=2, max_steps=200, max_seconds=600, eval_every=100
)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """reference, a corrupted copy, a wider-vocabulary copy, and a copy with another tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("compare")
    # Built once per session (tests/integration/test_compare_baseline.py uses the same recipe).
    ref = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-models", SPEC)
    out = {"reference": ref}

    def variant(name: str, change: Any, tokenizer: Any = None) -> None:
        model = AutoModelForCausalLM.from_pretrained(ref)
        with torch.no_grad():
            change(model)
        model.save_pretrained(root / name)
        (tokenizer or AutoTokenizer.from_pretrained(ref)).save_pretrained(root / name)
        out[name] = root / name

    def crush_final_norm(model: Any) -> None:
        # Keep two dimensions of the final layer norm: every state the LM head sees now lies
        # in a plane (plus the norm's bias), a collapse of the representation.
        weight = model.transformer.ln_f.weight
        keep = torch.zeros_like(weight)
        keep[:2] = 1.0
        weight.mul_(keep)

    variant("collapsed", crush_final_norm)
    variant("wider_vocab", lambda m: m.resize_token_embeddings(SPEC.vocab_size + 16))
    other = train_tokenizer(read_corpus("train")[:40], 280, SPEC.n_positions)
    torch.manual_seed(0)
    config = AutoModelForCausalLM.from_pretrained(ref).config
    config.n_embd = 48  # another width, same tokenizer: comparable metric by metric
    wider = AutoModelForCausalLM.from_config(config)
    wider.save_pretrained(root / "wider")
    AutoTokenizer.from_pretrained(ref).save_pretrained(root / "wider")
    out["wider"] = root / "wider"
    variant("other_tokenizer", lambda m: None, tokenizer=other)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out sentences, one per line (the models never trained on them)."""
    lines = [s for doc in read_corpus("heldout") for s in doc.split(". ") if len(s) > 20]
    path = tmp_path_factory.mktemp("corpus") / "heldout.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["compare", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def compare_json(models: dict[str, Path], corpus: Path, candidate: str, *extra: str | Path) -> Any:
    code, out, err = invoke(
        "--reference", models["reference"], "--candidate", models[candidate],
        "--corpus", corpus, "--format", "json", *extra,
    )  # fmt: skip
    assert code in (0, 3), err
    doc = json.loads(out)
    assert doc["exit_code"] == code
    return doc


def by_key(doc: Any) -> dict[str, Any]:
    return {m["key"]: m for m in doc["metrics"]} | {d["key"]: d for d in doc["drift"]}


# --------------------------------------------------------------------------- judging (pure)
def test_judge_follows_bad_directions_and_tolerances() -> None:
    tol = Tolerances(relative={"nc1_cdnv": 0.25, "effective_rank": 0.2}, absolute={})
    # CDNV: rising is bad; 1.0 -> 1.3 is +30% > 25%, 1.0 -> 1.2 is within, falling is fine.
    assert judge_metric("nc1_cdnv", 1.0, 1.3, tol).status is Status.regressed
    assert judge_metric("nc1_cdnv", 1.0, 1.2, tol).status is Status.ok
    assert judge_metric("nc1_cdnv", 1.0, 0.1, tol).status is Status.ok
    # Effective rank: falling is bad; 10 -> 7.9 is -21%.
    worse = judge_metric("effective_rank", 10.0, 7.9, tol)
    assert worse.status is Status.regressed
    assert worse.relative_change == pytest.approx(-0.21)
    assert worse.bad_direction == "decrease"
    assert judge_metric("effective_rank", 10.0, 8.1, tol).status is Status.ok
    assert judge_metric("effective_rank", 10.0, 30.0, tol).status is Status.ok
    # A negative reference: the relative change is taken against |reference|.
    assert judge_metric("nc1_cdnv", -2.0, -1.0, tol).relative_change == pytest.approx(0.5)
    # No tolerance: reported, never failing.
    free = judge_metric("nc1_cdnv2", 1.0, 100.0, tol)
    assert free.status is Status.unchecked
    assert free.relative_change == pytest.approx(99.0)
    # Missing values: candidate lost a computable metric -> regressed; no reference -> skipped.
    assert judge_metric("nc1_cdnv", 1.0, None, tol).status is Status.regressed
    assert judge_metric("nc1_cdnv", None, 1.0, tol).status is Status.skipped
    # Reference exactly 0: any move in the bad direction fails.
    zero = judge_metric("nc1_cdnv", 0.0, 1e-9, tol)
    assert zero.status is Status.regressed
    assert zero.relative_change is None
    assert judge_metric("nc1_cdnv", 0.0, 0.0, tol).status is Status.ok


def test_judge_drift_against_absolute_maxima() -> None:
    tol = Tolerances(relative={}, absolute={"drift_mmd": 0.05, "drift_mean_shift": 1.0})
    _, checks = judge({}, {}, {"drift_mmd": 0.051, "drift_mean_shift": 0.5}, tol)
    status = {c.key: c.status for c in checks}
    assert status["drift_mmd"] is Status.regressed
    assert status["drift_mean_shift"] is Status.ok
    assert status["drift_class_mean_cos"] is Status.unchecked
    _, checks = judge({}, {}, {"drift_mmd": None}, tol)
    assert {c.key: c.status for c in checks}["drift_mmd"] is Status.skipped


# --------------------------------------------------------------------------- tolerance files
def test_tolerance_file_merges_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "tol.yaml"
    path.write_text("nc1_cdnv: 0.5\nnc2_equiangularity_std: null\ndrift_mean_shift: 2\n")
    tol = load_tolerances(path)
    assert tol.relative["nc1_cdnv"] == 0.5
    assert "nc2_equiangularity_std" not in tol.relative
    assert tol.relative["effective_rank"] == DEFAULT_RELATIVE["effective_rank"]
    assert tol.absolute == {**DEFAULT_ABSOLUTE, "drift_mean_shift": 2.0}
    js = tmp_path / "tol.json"
    js.write_text(json.dumps({"drift_mmd": None}))
    assert "drift_mmd" not in load_tolerances(js).absolute
    assert load_tolerances(None) == Tolerances()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.yaml", "nc1_cdvn: 0.2\n", "unknown or untolerable metric key 'nc1_cdvn'"),
        ("t.yaml", "class_count: 1\n", "untolerable metric key 'class_count'"),
        ("t.yaml", "nc1_cdnv: -0.1\n", "nc1_cdnv: must be a finite number >= 0"),
        ("t.yaml", "nc1_cdnv: .nan\n", "must be a finite number"),
        ("t.yaml", "nc1_cdnv: lots\n", "nc1_cdnv: expected a number or null"),
        ("t.yaml", "nc1_cdnv: true\n", "expected a number or null"),
        ("t.yaml", "- nc1_cdnv\n", "expected a mapping"),
        ("t.yaml", "nc1_cdnv: [0.1\n", "not valid YAML"),
        ("t.json", "{nc1_cdnv: 0.1}", "not valid JSON"),
    ],
)
def test_tolerance_file_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[")) as info:
        load_tolerances(path)
    assert info.value.reason == "bad_tolerances"
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInput, match=r"(?i)no such file"):
        load_tolerances(tmp_path / "missing.yaml")


def test_tolerance_file_error_is_one_line_exit_2(
    models: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "tol.yaml"
    bad.write_text("nc1_cdvn: 0.2\n")
    code, out, err = invoke(
        "--reference", models["reference"], "--candidate", models["reference"],
        "--corpus", corpus, "--tolerances", bad,
    )  # fmt: skip
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert "nc1_cdvn" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the gate
def test_identical_models_pass_with_zero_change(models: dict[str, Path], corpus: Path) -> None:
    doc = compare_json(models, corpus, "reference")
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["passed"] is True
    assert doc["exit_code"] == 0
    assert doc["regressions"] == []
    assert doc["reference"]["sample_count"] == doc["candidate"]["sample_count"] > 1000
    for m in doc["metrics"]:
        assert m["reference"] == m["candidate"], m  # same forward, same statistics
        if m["reference"] is not None and m["reference"] != 0:
            assert m["relative_change"] == 0.0
        assert m["status"] in ("ok", "unchecked"), m
    drift = by_key(doc)
    assert abs(drift["drift_mmd"]["value"]) < 1e-2  # unbiased estimate of 0
    assert drift["drift_mean_shift"]["value"] == 0.0
    assert drift["drift_label_js"]["value"] == 0.0
    checked = {m["key"] for m in doc["metrics"] if m["tolerance"] is not None}
    assert checked == set(DEFAULT_RELATIVE)


def test_planted_collapse_fails_with_exit_3(models: dict[str, Path], corpus: Path) -> None:
    doc = compare_json(models, corpus, "collapsed")
    assert doc["exit_code"] == 3
    assert doc["passed"] is False
    got = by_key(doc)
    # Two dimensions left: the total covariance has rank <= 2, and classes blur together.
    assert got["effective_rank"]["candidate"] <= 2.0 + 1e-6
    # The reference keeps more directions than the two the collapse leaves.
    assert got["effective_rank"]["reference"] > 3.0
    assert got["nc1_cdnv"]["candidate"] > 1.25 * got["nc1_cdnv"]["reference"]
    assert got["drift_mmd"]["value"] > 0.05
    assert got["nc2_equiangularity_std"]["relative_change"] > 0.25
    expected = {"effective_rank", "nc1_cdnv", "nc2_equiangularity_std", "drift_mmd"}
    assert expected <= set(doc["regressions"])
    for key in doc["regressions"]:
        assert got[key]["status"] == "regressed"
    assert all(
        (m["status"] == "regressed") == (m["key"] in doc["regressions"]) for m in doc["metrics"]
    )


def test_tolerances_decide_the_verdict(
    models: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    """The same collapsed candidate passes once the failing checks are turned off."""
    loose = tmp_path / "loose.json"
    off = {"effective_rank": None, "nc2_equiangularity_std": None, "nc4_ncc_agreement": None}
    loose.write_text(json.dumps({**off, "nc1_cdnv": 1000, "drift_mmd": 2.5}))
    doc = compare_json(models, corpus, "collapsed", "--tolerances", loose)
    assert doc["regressions"] == []
    assert doc["exit_code"] == 0
    assert doc["tolerances"] == {"relative": {"nc1_cdnv": 1000.0}, "absolute": {"drift_mmd": 2.5}}
    got = by_key(doc)
    assert got["effective_rank"]["status"] == "unchecked"
    assert got["nc1_cdnv"]["status"] == "ok"
    assert got["drift_mmd"]["status"] == "ok"


def test_max_tokens_bounds_both_runs(models: dict[str, Path], corpus: Path) -> None:
    doc = compare_json(models, corpus, "reference", "--max-tokens", "300")
    assert doc["corpus"]["positions"] == 300
    assert doc["reference"]["sample_count"] == doc["candidate"]["sample_count"] == 300
    assert by_key(doc)["sample_count"]["candidate"] == 300


def test_metrics_match_float64_brute_force(models: dict[str, Path], corpus: Path) -> None:
    """Hidden states collected one line at a time (no padding, no monitor code) give, in
    float64 brute force, the reference and candidate values the JSON reports."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    doc = compare_json(models, corpus, "collapsed")
    got = by_key(doc)
    lines = [ln for ln in corpus.read_text().splitlines() if ln.strip()]
    for side in ("reference", "candidate"):
        path = models["reference" if side == "reference" else "collapsed"]
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        feats, labels = [], []
        for line in lines:
            ids = tok(line, add_special_tokens=False)["input_ids"][: SPEC.n_positions]
            if len(ids) < 2:
                continue
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            feats.append(out.hidden_states[-1][0, :-1].double().numpy())
            labels.extend(ids[1:])
        x, y = np.concatenate(feats), np.asarray(labels)
        head = model.get_output_embeddings().weight.detach().double().numpy()
        want = brute_force_metrics(x, y, classifier=head)
        assert got["sample_count"][side] == x.shape[0]
        for key in ("nc1_cdnv", "nc2_equiangularity_std", "effective_rank"):
            assert math.isclose(got[key][side], want[key], rel_tol=1e-4), (side, key)
        # NC4 counts argmax ties the same way only up to float noise: allow two samples.
        assert abs(got["nc4_ncc_agreement"][side] - want["nc4_ncc_agreement"]) <= 2 / x.shape[0]


def test_other_width_compares_metrics_without_drift(models: dict[str, Path], corpus: Path) -> None:
    doc = compare_json(models, corpus, "wider")
    assert (doc["reference"]["dim"], doc["candidate"]["dim"]) == (32, 48)
    assert doc["candidate"]["sample_count"] == doc["reference"]["sample_count"]
    drift = {d["key"]: d for d in doc["drift"]}
    assert drift["drift_mmd"]["value"] is None
    assert drift["drift_mmd"]["status"] == "skipped"
    assert "drift_mmd" not in doc["regressions"]
    assert any("hidden widths differ" in note for note in doc["notes"])
    assert all(m["candidate"] is not None for m in doc["metrics"])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ("wider_vocab", "vocabulary sizes differ"),
        ("other_tokenizer", "split the corpus differently"),
    ],
)
def test_incomparable_models_exit_2(
    models: dict[str, Path], corpus: Path, candidate: str, message: str
) -> None:
    code, _out, err = invoke(
        "--reference", models["reference"], "--candidate", models[candidate], "--corpus", corpus
    )
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_inputs_exit_2(models: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--reference", tmp_path / "nope", "--candidate", models["reference"]], "no model"),
        (["--reference", models["reference"], "--candidate", tmp_path / "nope"], "no model"),
        (["--reference", models["reference"], "--candidate", tmp_path], "cannot load model"),
        (["--reference", models["reference"], "--candidate", models["reference"]], "no non-blank"),
        (["--candidate", models["reference"]], "exactly one of"),
        (["--candidate", models["reference"], "--reference-baseline", "x"], "go together"),
    ]
    for args, message in cases:
        corpus_arg = empty if message == "no non-blank" else corpus
        code, _, err = invoke(*args, "--corpus", corpus_arg)
        assert code == 2, (args, err)
        assert message in err, (args, err)
    code, _, err = invoke(
        "--reference", models["reference"], "--candidate", models["reference"],
        "--corpus", tmp_path / "absent.txt",
    )  # fmt: skip
    assert code == 2
    assert "no such file" in err.lower()


def test_table_output_names_the_regression(models: dict[str, Path], corpus: Path) -> None:
    code, out, _ = invoke(
        "--reference", models["reference"], "--candidate", models["collapsed"], "--corpus", corpus
    )
    assert code == 3
    assert "nc1_cdnv" in out
    assert "effective_rank" in out
    assert out.strip().splitlines()[-1].startswith("REGRESSION: ")


@pytest.mark.slow
def test_console_script_exit_codes(models: dict[str, Path], corpus: Path) -> None:
    """The installed entry point, as CI runs it: 3 on the planted collapse, JSON on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "compare", "--reference", str(models["reference"]),
         "--candidate", str(models["collapsed"]), "--corpus", str(corpus), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["regressions"]


def test_change_column_is_a_factor_only_where_it_means_one() -> None:
    from monitor.cli.compare import _change

    assert _change(0.296, 0.6) == "+29.6%"
    assert _change(109.3, 2.065) == "110x"  # 227.7 / 2.065
    # -0.01 -> 0.2 is +2100% of |reference|; "22x" would claim 0.2 / -0.01 = -20.
    assert _change(21.0, -0.01) == "+2100.0%"
    assert _change(None, 1.0) == ""
