"""Alert quality, shortened from benchmarks/alert_quality.py: the shipped default rules, judged
by the evaluator's own `VerdictTracker` on the real `Evaluator` and an embedded store in
simulated time, stay quiet through healthy traffic with 10x volume swings and a shifting class
mix, and catch the demo's collapse at 25% strength within two evaluation intervals.

The trend rules are judged by the benchmark's `TrendJudge`; its `predict_linear` is checked
here against the real promtool's on the same samples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from alert_judge import predict_linear  # noqa: E402
from alert_quality import NOON  # noqa: E402
from alert_sim import Scale, run_healthy, run_trial  # noqa: E402
from alert_world import DAY, T0, Failure, World  # noqa: E402

from monitor.alerts.thresholds import default_alerting  # noqa: E402

pytestmark = pytest.mark.slow

# The benchmark's model and traffic, shortened: 500 classes in d = 32 at a quarter of the
# benchmark's states per second per class (2,000 classes at 2 to 20 states/s), so the windows
# are as sparse; 5-minute batches; half a healthy day (midnight to noon: the whole 10x swing).
SCALE = Scale(classes=500, dim=32, low_rate=0.5, days=0.5, horizon=3, batch_seconds=300)
EVAL_FROM = T0 + DAY - 2 * 3600  # the healthy run is evaluated from 22:00 on the baseline day


@pytest.fixture
def one_thread() -> Iterator[None]:
    """As the benchmark runs: small tensors, and no OpenMP spinning on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _world() -> World:
    return World(SCALE.classes, SCALE.dim, SCALE.seed, low_rate=SCALE.low_rate,
                 swing=SCALE.swing, batch_seconds=SCALE.batch_seconds)  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "decayed"])
def test_healthy_swings_stay_quiet_and_a_quarter_collapse_fires_within_two_intervals(
    tmp_path: Path, one_thread: None, mode: str
) -> None:
    """Both window modes: decayed windows have no traffic stderrs (every min_z gate open)."""
    alerting = default_alerting()
    world = _world()
    scale = replace(SCALE, window_mode=mode)
    healthy = run_healthy(
        world, scale, tmp_path, alerting, evaluate_from=EVAL_FROM, forks_at=[NOON]
    )
    # the run really was in its mode: ratio stderrs in exact snapshots, none in decayed ones
    traced = [v for _, _, m in healthy.trace for k, v in m.items() if k.endswith("_stderr")]
    assert any(v is not None for v in traced) == (mode == "exact")
    counts = [m["sample_count"] for t, w, m in healthy.trace if w == "15m" and t > T0 + DAY]
    assert len(counts) == SCALE.days * DAY / SCALE.interval
    assert max(counts) / min(counts) > 5  # midnight to noon: the volume swing really happened
    assert healthy.episodes == [], healthy.episodes
    trial = run_trial(healthy, Failure("collapse", 0.25), NOON)
    assert trial.before == []
    assert trial.detections, "the 25% collapse was not detected"
    assert min(trial.detections.values()) <= 2, trial.detections


def test_predict_linear_is_prometheus_arithmetic(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install the Debian package `prometheus` (.ci/run)")
    rng = np.random.default_rng(5)
    values = [round(1.0 + 0.01 * i + float(rng.normal(0, 0.02)), 4) for i in range(90)]
    at, horizon = 89 * 60.0, 21600.0
    points = [(60.0 * i, v) for i, v in enumerate(values) if 60.0 * i >= at - 3600]
    expected = predict_linear(points, at, horizon)
    flat = predict_linear([(0.0, 1.5), (60.0, 1.5), (120.0, 1.5)], 120.0, horizon)
    assert flat == 1.5
    doc = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'x{a="1"}', "values": " ".join(str(v) for v in values)},
                ],
                "promql_expr_test": [
                    {
                        "expr": "predict_linear(x[1h], 21600)",
                        "eval_time": "89m",
                        "exp_samples": [{"labels": '{a="1"}', "value": expected}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "t.yml").write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [promtool, "test", "rules", "t.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc["tests"][0]["promql_expr_test"][0]["exp_samples"][0]["value"] = expected + 0.01
    (tmp_path / "t.yml").write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [promtool, "test", "rules", "t.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode != 0  # and promtool does tell the numbers apart
