"""`--format json|table` of the pipeline commands, against a real redis-server.

The commands run in this process through the real entry point (`monitor.cli.main`), with the
settings in the environment as an operator sets them. The JSON is checked against numbers known
independently of the code (the saved arrays); the table against the same facts as text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from cli_main import run_main as run
from servers import RedisServer

from monitor.cli.common import ExitCode

VOCAB, DIM = 50, 8
MODELS = [{"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True}]


def test_pipeline_commands_print_json_and_tables(
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("COLLAPSE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLLAPSE_MODELS", json.dumps(MODELS))
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 20, size=400)
    features = rng.normal(size=(400, DIM)) + 3.0 * rng.normal(size=(VOCAB, DIM))[labels]
    np.save(tmp_path / "h.npy", features.astype(np.float32))
    np.save(tmp_path / "y.npy", labels)
    files = ["--features", str(tmp_path / "h.npy"), "--labels", str(tmp_path / "y.npy")]

    code, out, err = run(capsys, "baseline", "pin", "--model", "m", "--name", "ref", *files)
    assert code == ExitCode.OK, err
    stamp = json.loads(out)  # json is the default: the stamp
    assert (stamp["model"], stamp["baseline"]) == ("m", "ref")
    assert (stamp["sample_count"], stamp["class_count"], stamp["dim"]) == (
        400, len(np.unique(labels)), DIM,
    )  # fmt: skip
    code, out, err = run(capsys, "baseline", "pin", "--model", "m", "--name", "ref2", *files,
                         "--format", "table")  # fmt: skip
    assert code == ExitCode.OK, err
    assert "sample_count" in out
    assert "400" in out
    assert "ref2" in out

    assert isinstance(stamp["created"], float)  # the epoch stays, an ISO-8601 form joins it
    assert stamp["created_iso"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                 time.gmtime(int(stamp["created"])))  # fmt: skip
    code, out, _ = run(capsys, "baseline", "list", "--model", "m", "--format", "json")
    assert code == ExitCode.OK
    listed = json.loads(out)
    assert sorted(listed) == ["ref", "ref2"]
    created = listed["ref"]["created"]
    assert isinstance(created, float)
    assert abs(created - time.time()) < 300
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(created)))
    assert listed["ref"]["created_iso"] == iso
    code, out, _ = run(capsys, "baseline", "list", "--model", "m")
    assert code == ExitCode.OK
    assert "ref2" in out
    assert "features:h.npy" in out
    assert iso in out  # people read UTC times, not epochs
    assert str(int(created)) not in out

    # An unknown model is bad input, as everywhere else: one line, exit code 2.
    code, out, err = run(capsys, "status", "--model", "nope", "--format", "json")
    assert (code, out) == (ExitCode.BAD_INPUT, "")
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert "'nope'" in err

    code, out, err = run(capsys, "replay", "--model", "m", *files, "--format", "json")
    assert code == ExitCode.OK, err
    assert json.loads(out) == {"model": "m", "queued": 400, "kind": "samples"}
    code, out, _ = run(capsys, "replay", "--model", "m", *files)
    assert (code, out.strip()) == (ExitCode.OK, "queued 400 samples for m")

    code, out, err = run(capsys, "status", "--model", "m", "--format", "json")
    assert code == ExitCode.OK, err
    (model,) = json.loads(out)["models"]
    assert model["model"] == "m"
    assert sorted(model["baselines"]) == ["ref", "ref2"]
    code, out, _ = run(capsys, "status", "--model", "m")
    assert code == ExitCode.OK
    assert "window" in out
    assert "counters:" in out

    code, out, err = run(capsys, "evaluate", "--model", "m", "--format", "json")
    assert code == ExitCode.OK, err
    snapshots = json.loads(out)
    assert {s["window"] for s in snapshots} == {"15m", "1h", "24h"}  # the default windows
    assert all(s["model"] == "m" for s in snapshots)
    code, out, _ = run(capsys, "evaluate", "--model", "m")
    assert code == ExitCode.OK
    assert "m 15m" in out
    assert "m 24h" in out

    code, out, err = run(capsys, "baseline", "unpin", "--model", "m", "--name", "nope")
    assert code == ExitCode.BAD_INPUT
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
