"""`collapse-monitor report` against a real redis-server, over snapshots the real evaluator wrote.

Traffic goes through the ingestor into Redis, a baseline is pinned from a window, the evaluator
writes a healthy snapshot and then three of collapsing traffic (class means pulled together),
and the command, run as a user runs it (a subprocess with COLLAPSE_* settings), writes the page.
What the page must say is read from Redis directly, not from the report code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from minute_stack import DIM, VOCAB, WINDOW, MinuteStack, model_m
from servers import ROOT, RedisServer

from monitor.pipeline.baselines import pin_window
from monitor.snapshot import Snapshot

pytestmark = pytest.mark.slow

ALERTING = {
    "absolute": [],
    "predictive": [],
    "relative": [],
    "drift": [{"alert": "CollapseDriftAboveThreshold", "for": "0s"}],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("report")
    models = [model_m(tmp, second_moment=True), {"name": "quiet", "vocab_size": VOCAB, "dim": DIM}]
    server = RedisServer(tmp)
    server.start()
    try:
        stack = MinuteStack(server.url, models, COLLAPSE_ALERTING=json.dumps(ALERTING))
        t0 = stack.t0
        stack.feed(1.0, t0, "base")
        pin_window(stack.runtime.store, stack.runtime.registry, "m", "launch", WINDOW, 60)
        assert stack.evaluate(t0).ok
        for k, spread in enumerate((0.5, 0.4, 0.3)):
            at = t0 + 100 + 70 * k  # each window sees only its own traffic
            stack.feed(spread, at, f"collapse{k}")
            assert stack.evaluate(at).ok
        yield server, stack.env
    finally:
        server.stop()


def run_report(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "report", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=ROOT,
    )  # fmt: skip


def stored(server: RedisServer) -> list[dict[str, Any]]:
    """The history as Redis holds it (newest first), read without the store code."""
    keys = [k for k in server.client().keys("*") if b"history" in k]
    assert len(keys) == 1, keys
    return [json.loads(doc) for doc in server.client().lrange(keys[0], 0, -1)]


def test_report_from_redis_draws_history_alerts_and_pca(
    stack: tuple[RedisServer, dict[str, str]], tmp_path: Path
) -> None:
    server, env = stack
    history = stored(server)
    assert len(history) == 4
    latest = history[0]
    fired = [d["timestamp"] for d in history if d["metrics"]["drift_mmd"] is not None
             and d["metrics"]["drift_mmd"] > d["metrics"]["drift_mmd_threshold"]]  # fmt: skip
    assert fired, "the collapsed traffic must cross the drift threshold"
    proc = run_report(env, "--model", "m", "--window", "1m", "--out", tmp_path, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["snapshots"] == 4
    assert doc["firing"] == (
        ["CollapseDriftAboveThreshold"] if latest["timestamp"] in fired else []
    )
    names = {Path(p).name for p in doc["pngs"]}
    # NC4 is counted at ingestion by capture; this traffic carries no counts, so no nc4.png.
    assert {"nc1.png", "nc3.png", "drift.png", "class_means_pca.png"} <= names
    assert "nc4.png" not in names
    page = Path(doc["html"]).read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") == len(doc["pngs"])
    assert not re.search(r"https?://", page)
    # The latest snapshot's values, as Redis holds them, in the summary table.
    for key in ("nc1_cdnv", "drift_mmd", "effective_rank"):
        value = f"{latest['metrics'][key]:.6g}"
        assert f"<td>{key}</td><td class='num'>{value}</td>" in page, key
    assert "launch" in page  # the baseline the evaluator compared against
    first_fire = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min(fired)))
    assert first_fire in page  # the alert period starts at the first crossing
    for entry in latest["top_drift"][:3]:
        assert str(entry["class_id"]) in page


def test_count_limits_the_history(
    stack: tuple[RedisServer, dict[str, str]], tmp_path: Path
) -> None:
    proc = run_report(stack[1], "--model", "m", "--window", "1m", "--count", "2",
                      "--out", tmp_path, "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshots"] == 2


@pytest.mark.parametrize(
    ("model", "window", "message"),
    [("nope", "1m", "model 'nope' is unknown"), ("quiet", "1m", "no snapshots of 'quiet'"),
     ("m", "24h", "no snapshots of 'm' for window '24h'")],
)  # fmt: skip
def test_unknown_model_or_no_snapshots_is_exit_2(
    stack: tuple[RedisServer, dict[str, str]], tmp_path: Path, model: str, window: str,
    message: str,
) -> None:  # fmt: skip
    proc = run_report(stack[1], "--model", model, "--window", window, "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert not (tmp_path / "o").exists()


def test_snapshots_round_trip_as_the_report_reads_them(
    stack: tuple[RedisServer, dict[str, str]],
) -> None:
    """The documents the report parses are the evaluator's (a schema change would show here)."""
    for doc in stored(stack[0]):
        snap = Snapshot.from_json(json.dumps({**doc}))
        assert snap.model == "m"
        assert snap.window == "1m"
