"""`collapse-monitor demo` end to end, as a user runs it (a subprocess, stdout not a terminal).

The model is a real tiny GPT-2 trained for a few seconds here (enough for class geometry);
the demo's own traffic, probe, store, evaluator, alert rules and /metrics are all real. The
checks read only what a user sees: the log lines, the /metrics page and the report files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ROOT, stop_process, wait_for

from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.slow

# A small model that still learns some geometry in a few seconds of CPU.
SPEC = TinyModelSpec(
    vocab_size=300, n_embd=32, n_layer=1, n_head=2, seq_len=64, max_steps=80, max_seconds=20
)
CLI = str(Path(sys.executable).with_name("collapse-monitor"))
LINE = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("demo-model"), SPEC)


@dataclass
class Run:
    """A running demo whose stdout lines are collected by a reader thread."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def events(self) -> list[str]:
        """Log lines without their elapsed-time prefix."""
        return [m.group(2) for m in (LINE.match(x) for x in list(self.lines)) if m]

    def find(self, prefix: str) -> int | None:
        return next((i for i, e in enumerate(self.events()) if e.startswith(prefix)), None)

    def url(self) -> str:
        found = [e.split(" ", 1)[1] for e in self.events() if e.startswith("metrics: ")]
        assert found, "the demo never printed its metrics URL"
        return found[0]


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(*args: str) -> Run:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLLAPSE_CACHE_DIR": str(tmp_path)}
        proc = subprocess.Popen(
            [CLI, "demo", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # stop_process signals the group
        )
        run = Run(proc)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                run.lines.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        stop_process(run.proc)  # type: ignore[arg-type]  # text-mode Popen


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The /metrics page as {sample name: {labels: value}}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def report_paths(run: Run) -> list[Path]:
    return [Path(e.split(" ", 1)[1]) for e in run.events() if e.startswith("report: ")]


def assert_report(run: Run, out: Path) -> None:
    paths = report_paths(run)
    assert any(p.suffix == ".html" for p in paths), run.lines
    assert any(p.suffix == ".png" for p in paths), run.lines
    for path in paths:
        assert path.resolve().parent == out.resolve()
        assert path.is_file(), path
        assert path.stat().st_size > 0, path
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_injected_collapse_fires_and_recovery_resolves(
    tiny_model: Path, tmp_path: Path, start_demo: Callable[..., Run]
) -> None:
    out = tmp_path / "report"
    run = start_demo(
        "--duration", "60", "--model", str(tiny_model), "--port", "0", "--out", str(out)
    )
    wait_for(lambda: run.find("metrics: ") is not None, 60, "the demo's metrics URL")
    url = run.url()
    assert re.fullmatch(r"http://127\.0\.0\.1:[0-9]+/metrics", url)

    # While the alert fires, the exported gauges must show why: MMD far above its threshold.
    wait_for(lambda: run.find("ALERT FIRING") is not None, 90, "an alert", interval=0.2)
    page = scrape(url)
    assert page["collapse_store_up"][()] == 1.0
    mmd = page["collapse_drift_mmd"]
    threshold = page["collapse_drift_mmd_threshold"]
    key = next(iter(mmd))
    assert dict(key)["model"] == "demo"
    assert mmd[key] > threshold[key] > 0
    assert page["collapse_nc1_cdnv"][key] > 0
    assert page["collapse_samples_ingested_total"][(("model", "demo"),)] > 0

    assert run.proc.wait(timeout=120) == 0, "\n".join(run.lines)
    events = run.events()
    order = [run.find(p) for p in ("phase warmup", "baseline pinned", "phase steady")]
    inject, recover = run.find("phase inject"), run.find("phase recover")
    assert inject is not None, run.lines
    assert recover is not None, run.lines
    steps = [i for i in order if i is not None]
    assert len(steps) == 3, run.lines
    assert steps == sorted(steps)
    assert steps[-1] < inject < recover
    fired = {e.split()[2]: i for i, e in enumerate(events) if e.startswith("ALERT FIRING")}
    resolved = {e.split()[2]: i for i, e in enumerate(events) if e.startswith("ALERT RESOLVED")}
    assert fired, "\n".join(run.lines)
    # Nothing fires before the injection; every alert that fired resolved after the recovery.
    assert min(fired.values()) > inject, "\n".join(run.lines)
    for alert in fired:
        assert alert in resolved, f"{alert} never resolved:\n" + "\n".join(run.lines)
        assert resolved[alert] > recover
        assert resolved[alert] > fired[alert]
    assert_report(run, out)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_no_injection_stays_quiet_and_a_signal_stops_cleanly(
    stop: signal.Signals, tiny_model: Path, tmp_path: Path, start_demo: Callable[..., Run]
) -> None:
    out = tmp_path / "report"
    run = start_demo(
        "--duration",
        "45",
        "--no-inject",
        "--model",
        str(tiny_model),
        "--port",
        "0",
        "--out",
        str(out),
    )
    wait_for(lambda: run.find("phase steady") is not None, 90, "the baseline", interval=0.2)
    steady_since = time.monotonic()
    wait_for(lambda: run.find("metrics: ") is not None, 5, "the metrics URL")
    page = scrape(run.url())
    assert "collapse_drift_mmd" in page or "collapse_nc1_cdnv" in page
    time.sleep(max(0.0, 15 - (time.monotonic() - steady_since)))  # 15 s of steady traffic
    assert run.proc.poll() is None, "\n".join(run.lines)
    os.killpg(run.proc.pid, stop)
    assert run.proc.wait(timeout=60) == 130, "\n".join(run.lines)
    assert run.find("interrupted") is not None
    assert run.find("ALERT FIRING") is None, "\n".join(run.lines)
    assert_report(run, out)
