"""`compare --reference-baseline`: a candidate judged against a baseline pinned in a real Redis.

The baseline is pinned with `baseline pin --corpus` (the service's own path); the candidate is
the same checkpoint (passes, zero change, same reference numbers as a mirror-mode run) or a copy
with a crushed final layer norm (exit 3).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import RedisServer
from typer.testing import CliRunner

from monitor.capture.tinymodel import TinyModelSpec, ensure_tiny_model
from monitor.cli import app
from monitor.data import read_corpus

pytestmark = pytest.mark.slow

# The same recipe as tests/unit/test_compare.py: one build per session, shared via basetemp.
SPEC = TinyModelSpec(
    vocab_size=300, n_embd=32, n_layer=2, n_head=2, max_steps=200, max_seconds=600, eval_every=100
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-models", SPEC)
    bad = tmp_path_factory.mktemp("collapsed")
    model = AutoModelForCausalLM.from_pretrained(ref)
    with torch.no_grad():
        keep = torch.zeros_like(model.transformer.ln_f.weight)
        keep[:2] = 1.0
        model.transformer.ln_f.weight.mul_(keep)
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(ref).save_pretrained(bad)
    return {"reference": ref, "collapsed": bad}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    lines = [s for doc in read_corpus("heldout") for s in doc.split(". ") if len(s) > 20]
    path = tmp_path / "val.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def env(redis_server: RedisServer, checkpoints: dict[str, Path]) -> dict[str, str]:
    models = [{"name": "tiny", "checkpoint": str(checkpoints["reference"]), "second_moment": True}]
    return {"COLLAPSE_REDIS_URL": redis_server.url, "COLLAPSE_MODELS": json.dumps(models)}


def cli(env: Mapping[str, str | None], *args: str | Path) -> tuple[int, str, str]:
    """In-process CLI run; a None value unsets that variable for the run."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


def compare(env: dict[str, str], candidate: Path, corpus: Path, *extra: str) -> tuple[int, Any]:
    code, out, err = cli(
        env, "compare", "--reference-baseline", "launch", "--model", "tiny",
        "--candidate", candidate, "--corpus", corpus, "--format", "json", *extra,
    )  # fmt: skip
    assert code in (0, 3), err
    return code, json.loads(out)


def by_key(doc: Any) -> dict[str, Any]:
    return {m["key"]: m for m in doc["metrics"]} | {d["key"]: d for d in doc["drift"]}


def test_candidate_against_pinned_baseline(
    env: dict[str, str], checkpoints: dict[str, Path], corpus: Path
) -> None:
    code, _, err = cli(
        env, "baseline", "pin", "--model", "tiny", "--name", "launch", "--corpus", corpus
    )
    assert code == 0, err

    code, same = compare(env, checkpoints["reference"], corpus)
    assert code == 0, same["regressions"]
    assert same["reference"]["kind"] == "baseline"
    assert same["reference"]["name"] == "tiny/launch"
    assert same["reference"]["sample_count"] == same["candidate"]["sample_count"] > 1000
    got = by_key(same)
    for key in ("nc1_cdnv", "nc2_equiangularity_std", "effective_rank"):
        assert got[key]["status"] == "ok"
        assert abs(got[key]["relative_change"]) < 1e-9, key
    # A pinned baseline keeps no samples and, pinned before any evaluation, no NC4 counts.
    assert got["nc4_ncc_agreement"]["status"] == "skipped"
    assert any("NC4" in note for note in same["notes"])
    # The candidate used the baseline's random Fourier features: MMD is an estimate of 0.
    assert abs(got["drift_mmd"]["value"]) < 1e-2
    assert got["drift_mmd"]["status"] == "ok"
    assert got["drift_mmd_threshold"]["value"] is not None  # calibrated from the pin's parts

    # The baseline's numbers are the ones a mirror-mode run computes for the same model.
    code, out, err = cli(
        {"COLLAPSE_REDIS_URL": None}, "compare", "--reference", checkpoints["reference"],
        "--candidate", checkpoints["reference"], "--corpus", corpus, "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    mirror = by_key(json.loads(out))
    for key in ("nc1_cdnv", "nc2_equiangularity_std", "effective_rank", "class_count"):
        assert got[key]["reference"] == pytest.approx(mirror[key]["reference"], rel=1e-9)

    # --no-second-moment against a baseline that has one: a choice, not a regression.
    code, lean = compare(env, checkpoints["reference"], corpus, "--no-second-moment")
    assert code == 0, lean["regressions"]
    assert by_key(lean)["effective_rank"]["status"] == "skipped"
    assert any("--no-second-moment" in note for note in lean["notes"])

    code, bad = compare(env, checkpoints["collapsed"], corpus)
    assert code == 3
    assert {"nc1_cdnv", "effective_rank", "drift_mmd"} <= set(bad["regressions"])


def test_baseline_mode_bad_input(
    env: dict[str, str], checkpoints: dict[str, Path], corpus: Path
) -> None:
    base = ["compare", "--candidate", checkpoints["reference"], "--corpus", corpus]
    code, _, err = cli(env, *base, "--reference-baseline", "never-pinned", "--model", "tiny")
    assert code == 2
    assert "no baseline 'never-pinned' pinned for 'tiny'" in err
    code, _, err = cli(env, *base, "--reference-baseline", "launch", "--model", "other")
    assert code == 2
    assert "not declared" in err
    no_redis = {"COLLAPSE_MODELS": env["COLLAPSE_MODELS"], "COLLAPSE_REDIS_URL": None}
    code, _, err = cli(no_redis, *base, "--reference-baseline", "launch", "--model", "tiny")
    assert code == 2, err
    assert "COLLAPSE_REDIS_URL" in err
