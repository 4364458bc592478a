"""`collapse-monitor analyze` as a user runs it: a subprocess over files on disk.

The JSON it prints is compared key by key to the brute-force oracle (tests/unit/brute_force.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brute_force import (
    ALL_KEYS,
    METRIC_KEYS,
    PAIRWISE_KEYS,
    STDERR_KEYS,
    assert_matches,
    brute_force_metrics,
)
from safetensors.numpy import save_file


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "analyze", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_json(*args: str | Path) -> dict[str, Any]:
    proc = run_cli(*args, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    assert set(out) == set(ALL_KEYS), sorted(set(out) ^ set(ALL_KEYS))
    return out


def dataset(
    seed: int, *, n: int = 613, d: int = 10, vocab: int = 3000, used: int = 45
) -> dict[str, np.ndarray]:
    """Features over `used` scattered vocabulary ids (a few singletons), a classifier over the
    whole vocabulary (huge rows off the used ids), its bias, and a held-out evaluation set."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab, size=used, replace=False)
    y = ids[rng.integers(2, used, size=n)]
    y = np.concatenate([y, ids[:2]])  # two singleton classes
    true_means = 1.5 * rng.normal(size=(vocab, d))
    X = true_means[y] + rng.normal(size=(y.shape[0], d))
    W = 30.0 * rng.normal(size=(vocab, d))
    W[ids] = true_means[ids] + 0.5 * rng.normal(size=(used, d))
    b = 50.0 + rng.normal(size=vocab)
    b[ids] = 0.2 * rng.normal(size=used)
    y_eval = ids[rng.integers(0, used, size=401)]
    X_eval = true_means[y_eval] + 1.3 * rng.normal(size=(y_eval.shape[0], d))
    return {
        "features": X,
        "labels": y.astype(np.int64),
        "classifier": W,
        "bias": b,
        "eval_features": X_eval,
        "eval_labels": y_eval.astype(np.int64),
    }


def write(
    tmp: Path, data: dict[str, np.ndarray], safetensors: tuple[str, ...] = ()
) -> dict[str, Path]:
    paths = {}
    for name, arr in data.items():
        if name in safetensors:
            path = tmp / f"{name}.safetensors"
            save_file({"tensor": np.ascontiguousarray(arr)}, str(path))
        else:
            path = tmp / f"{name}.npy"
            np.save(path, arr)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------- JSON output
def test_json_matches_reference_with_classifier(tmp_path: Path) -> None:
    data = dataset(1)
    data["features"] = data["features"].astype(np.float32)  # a typical dump dtype
    p = write(tmp_path, data, safetensors=("classifier",))
    got = run_json(
        "--features",
        p["features"],
        "--labels",
        p["labels"],
        "--classifier",
        p["classifier"],
        "--bias",
        p["bias"],
    )
    X = data["features"].astype(np.float64)
    ref = brute_force_metrics(X, data["labels"], classifier=data["classifier"], bias=data["bias"])
    assert got["class_count"] == ref["class_count"]
    assert got["sample_count"] == X.shape[0]
    assert_matches(got, ref, METRIC_KEYS)
    for key in STDERR_KEYS:
        assert got[key] is None, key


def test_json_without_classifier_min_count_and_no_second_moment(tmp_path: Path) -> None:
    data = dataset(2, n=500, d=7, vocab=200, used=60)
    del data["classifier"], data["bias"], data["eval_features"], data["eval_labels"]
    p = write(tmp_path, data, safetensors=("features",))
    got = run_json(
        "--features",
        p["features"],
        "--labels",
        p["labels"],
        "--min-count",
        "3",
        "--no-second-moment",
    )
    ref = brute_force_metrics(data["features"], data["labels"], min_count=3)
    for key in ("nc3_duality_mean_cos", "nc3_uniform_duality_cv", "nc4_ncc_agreement"):
        assert got[key] is None, key
    assert got["nc1_trace_ratio"] is None
    assert got["effective_rank"] is None
    keys = tuple(k for k in METRIC_KEYS if k not in ("nc1_trace_ratio", "effective_rank"))
    assert_matches(got, ref, keys)


def test_eval_set_switches_nc4(tmp_path: Path) -> None:
    data = dataset(3)
    p = write(tmp_path, data)
    common = ["--features", p["features"], "--labels", p["labels"]]
    common += ["--classifier", p["classifier"], "--bias", p["bias"]]
    got = run_json(
        *common, "--eval-features", p["eval_features"], "--eval-labels", p["eval_labels"]
    )
    ref = brute_force_metrics(
        data["features"],
        data["labels"],
        classifier=data["classifier"],
        bias=data["bias"],
        eval_features=data["eval_features"],
    )
    ref_train = brute_force_metrics(
        data["features"], data["labels"], classifier=data["classifier"], bias=data["bias"]
    )
    assert ref["nc4_ncc_agreement"] != ref_train["nc4_ncc_agreement"]
    assert_matches(got, ref, METRIC_KEYS)
    assert got["nc4_ncc_agreement_stderr"] is None


def test_max_exact_classes_switches_to_sampled_pairs(tmp_path: Path) -> None:
    data = dataset(6, n=900, d=12, vocab=400, used=80)
    p = write(tmp_path, data)
    got = run_json(
        "--features",
        p["features"],
        "--labels",
        p["labels"],
        "--max-exact-classes",
        "20",
        "--pair-samples",
        "4000",
        "--seed",
        "1",
    )
    ref = brute_force_metrics(data["features"], data["labels"])
    assert got["class_count"] == ref["class_count"] > 20
    for key in PAIRWISE_KEYS:
        se = got[f"{key}_stderr"]
        assert isinstance(se, float), (key, se)
        assert se > 0.0, (key, se)
        assert abs(got[key] - ref[key]) <= 5.0 * se, (key, got[key], ref[key], se)
    assert_matches(got, ref, tuple(k for k in METRIC_KEYS if k not in PAIRWISE_KEYS))


# --------------------------------------------------------------------------- table output
def test_table_format_prints_every_key(tmp_path: Path) -> None:
    data = dataset(4, n=300, vocab=100, used=20)
    p = write(tmp_path, data)
    proc = run_cli(
        "--features",
        p["features"],
        "--labels",
        p["labels"],
        "--classifier",
        p["classifier"],
        "--bias",
        p["bias"],
        "--format",
        "table",
    )
    assert proc.returncode == 0, proc.stderr
    missing = [key for key in METRIC_KEYS if key not in proc.stdout]
    assert not missing, (missing, proc.stdout)


# ----------------------------------------------------------------------------- bad input
def _bad_case(tmp: Path, case: str) -> list[str | Path]:
    data = dataset(5, n=200, vocab=80, used=15)
    del data["eval_features"], data["eval_labels"]
    if case == "nan_features":
        data["features"][17, 3] = np.nan
    elif case == "wrong_length_labels":
        data["labels"] = data["labels"][:-5]
    elif case == "label_out_of_range":
        data["labels"][9] = data["classifier"].shape[0]  # V: outside the classifier's vocabulary
    elif case == "negative_label":
        data["labels"][9] = -1
    p = write(tmp, data)
    args: list[str | Path] = ["--features", p["features"], "--labels", p["labels"]]
    args += ["--classifier", p["classifier"], "--bias", p["bias"]]
    if case == "missing_file":
        args[1] = tmp / "does_not_exist.npy"
    return [*args, "--format", "json"]


@pytest.mark.parametrize(
    "case",
    ["nan_features", "wrong_length_labels", "missing_file", "label_out_of_range", "negative_label"],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    proc = run_cli(*_bad_case(tmp_path, case))
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err, "no error message on stderr"
    assert "\n" not in err, f"error is not a single line:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "", f"output despite the error: {proc.stdout!r}"
