"""A relative bound's `min_z`: the rendered PromQL (run by the real promtool) and the evaluator's
`VerdictTracker` judge the same cases the same way.

The expected verdicts are written out by hand from the rule's definition (beyond the bound AND
`|ratio - 1| / stderr >= min_z`, or beyond the bound with no stderr series of that model and
window), not computed by the code under test.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from monitor.alerts.rules import alert_labels, render_rules, to_yaml
from monitor.alerts.thresholds import AlertingSettings, RelativeBound, load_alerting
from monitor.alerts.verdicts import VerdictTracker
from monitor.errors import InvalidInput
from monitor.snapshot import Snapshot

# The label set every rule aggregates by (monitor.alerts.common).
S = "cluster, namespace, job, model, window"

RISING, FALLING = "CollapseCDNVRisingVsBaseline", "CollapseNCCAgreementFallingVsBaseline"
CDNV, NCC = "drift_nc1_cdnv_ratio", "drift_nc4_ncc_agreement_ratio"
ALERTING = load_alerting(
    {
        "absolute": [],
        "predictive": [],
        "drift": [],
        "relative": [
            {"alert": RISING, "metric": CDNV, "max": 1.5, "min_z": 3, "for": "0s"},
            {"alert": FALLING, "metric": NCC, "min": 0.8, "min_z": 2, "for": "0s"},
        ],
    }
)


@dataclass(frozen=True)
class Case:
    """One (model, window): its ratio, its stderr (None = no series) and whether it fires."""

    model: str
    window: str
    metric: str
    ratio: float
    stderr: float | None
    fires: bool


CASES = [
    # rising CDNV, bound 1.5, min_z 3
    Case("significant", "1h", CDNV, 2.0, 0.1, True),  # z = 10
    Case("noisy", "1h", CDNV, 2.0, 0.5, False),  # beyond, z = 2: sampling noise
    Case("unmeasured", "1h", CDNV, 2.0, None, True),  # no stderr: the bound alone
    Case("inside", "1h", CDNV, 1.4, 0.01, False),  # z = 40 but within the bound
    Case("edge", "1h", CDNV, 1.75, 0.25, True),  # z = 3 exactly: >= fires
    Case("exact", "1h", CDNV, 2.0, 0.0, True),  # a zero stderr: infinitely significant
    Case("split", "1h", CDNV, 2.0, None, True),  # stderr only on another window
    Case("split", "24h", CDNV, 1.2, 1.0, False),
    # falling NC4 agreement, bound 0.8, min_z 2
    Case("significant", "15m", NCC, 0.5, 0.05, True),  # z = 10
    Case("noisy", "15m", NCC, 0.7, 0.2, False),  # z = 1.5
    Case("unmeasured", "15m", NCC, 0.7, None, True),
    Case("edge", "15m", NCC, 0.5, 0.25, True),  # z = 2 exactly
]
ALERT_OF = {CDNV: RISING, NCC: FALLING}
MINUTES = 10


def _expected() -> set[tuple[str, str, str]]:
    return {(ALERT_OF[c.metric], c.model, c.window) for c in CASES if c.fires}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install the Debian package `prometheus` (.ci/run)")
    return path


def _series(metric: str, value: float, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"collapse_{metric}{{{inner}}}", "values": f"{value}+0x{MINUTES}"}


def _input_series() -> list[dict[str, str]]:
    series = []
    for c in CASES:
        for instance in ("a", "b"):  # two exporter replicas: still one alert per series
            labels = {"model": c.model, "window": c.window, "instance": instance}
            series.append(_series(c.metric, c.ratio, **labels))
            if c.stderr is not None:
                series.append(_series(f"{c.metric}_stderr", c.stderr, **labels))
    return series


def _exp_alerts(alert: str) -> list[dict[str, Any]]:
    found = []
    for c in CASES:
        if c.fires and ALERT_OF[c.metric] == alert:
            labels = alert_labels(alert, c.model, c.window, "warning")
            del labels["alertname"]
            found.append({"exp_labels": labels})
    return found


def _promtool_test(folder: Path, alerting: AlertingSettings) -> subprocess.CompletedProcess[str]:
    """promtool evaluates `alerting`'s rendered rules over the cases, expecting `_expected()`."""
    folder.mkdir()
    rules = render_rules(alerting)
    for group in rules["groups"]:  # annotations are not under test here
        for rule in group["rules"]:
            rule["annotations"] = {}
    (folder / "rules.yml").write_text(to_yaml(rules))
    checks = [
        {"eval_time": f"{MINUTES - 5}m", "alertname": alert, "exp_alerts": _exp_alerts(alert)}
        for alert in (RISING, FALLING)
    ]
    doc = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _input_series(), "alert_rule_test": checks}],
    }
    (folder / "test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run(
        [_promtool(), "test", "rules", "test.yml"],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=120,
    )


def _plain() -> AlertingSettings:
    """The same bounds without `min_z`."""
    relative = [b.model_copy(update={"min_z": None}) for b in ALERTING.relative]
    return AlertingSettings(absolute=[], predictive=[], drift=[], relative=relative)


def test_promtool_fires_only_on_significant_or_unmeasured_ratios(tmp_path: Path) -> None:
    done = _promtool_test(tmp_path / "min_z", ALERTING)
    assert done.returncode == 0, done.stdout + done.stderr
    # The check can fail: without min_z the noisy ratios fire too, and promtool says so.
    done = _promtool_test(tmp_path / "plain", _plain())
    assert done.returncode != 0
    assert "noisy" in done.stdout + done.stderr


def _snapshots() -> list[Snapshot]:
    by_series: dict[tuple[str, str], dict[str, float | int | None]] = {}
    for c in CASES:
        metrics = by_series.setdefault((c.model, c.window), {})
        metrics[c.metric] = c.ratio
        if c.stderr is not None:
            metrics[f"{c.metric}_stderr"] = c.stderr
    return [
        Snapshot(m, w, 3600, 1000.0, "ok", None, 0.1, 5000, 50, metrics)
        for (m, w), metrics in by_series.items()
    ]


def test_verdict_tracker_judges_the_same_cases_alike() -> None:
    fired = VerdictTracker(ALERTING).firing(_snapshots())
    got = {(a.labels["alertname"], a.labels["model"], a.labels["window"]) for a in fired}
    assert got == _expected()
    assert all(a.labels["severity"] == "warning" for a in fired)


def test_without_min_z_the_bound_alone_decides() -> None:
    fired = VerdictTracker(_plain()).firing(_snapshots())
    got = {(a.labels["alertname"], a.labels["model"], a.labels["window"]) for a in fired}
    beyond = {
        (ALERT_OF[c.metric], c.model, c.window)
        for c in CASES
        if (c.metric == CDNV and c.ratio > 1.5) or (c.metric == NCC and c.ratio < 0.8)
    }
    assert got == beyond
    assert got > _expected()  # the noisy cases are what min_z silences
    (group,) = [g for g in render_rules(_plain())["groups"] if g["name"].endswith(".collapse")]
    for rule in group["rules"]:
        assert "unless" not in rule["expr"]
        assert "_stderr" not in rule["expr"]


def test_significance_arithmetic_matches_ieee_promql() -> None:
    bound = RelativeBound(alert=RISING, metric=CDNV, max=1.5, min_z=3)
    assert bound.stderr_metric == "drift_nc1_cdnv_ratio_stderr"
    assert bound.significant(2.0, None)
    assert bound.significant(2.0, 0.0)  # x / 0 = +Inf >= 3
    assert not bound.significant(2.0, -0.0)  # x / -0 = -Inf < 3, as in PromQL
    assert bound.significant(2.0, math.nan)  # NaN < 3 is false: not suppressed
    assert not bound.significant(2.0, math.inf)  # z = 0
    assert bound.significant(1.0, 0.0)  # 0 / 0 = NaN: not suppressed
    assert RelativeBound(alert=RISING, metric=CDNV, max=1.5).significant(2.0, 10.0)


def test_rendered_expression_shape() -> None:
    (group,) = [g for g in render_rules(ALERTING)["groups"] if g["name"].endswith(".collapse")]
    rising = next(r for r in group["rules"] if r["alert"] == RISING)
    assert rising["expr"] == (
        f"max by ({S}) (collapse_drift_nc1_cdnv_ratio) > 1.5 unless on ({S}) "
        f"(abs(max by ({S}) (collapse_drift_nc1_cdnv_ratio) - 1) / "
        f"min by ({S}) (collapse_drift_nc1_cdnv_ratio_stderr) < 3.0)"
    )
    assert "3 standard errors" in rising["annotations"]["description"]


@pytest.mark.parametrize("bad", [0, -1, "x"])
def test_min_z_must_be_positive(bad: object) -> None:
    with pytest.raises(InvalidInput):
        load_alerting({"relative": [{"alert": RISING, "metric": CDNV, "max": 2, "min_z": bad}]})


def test_absolute_bounds_skip_windows_with_too_few_samples() -> None:
    """The tracker's side of `min_samples` (promtool's is in test_alert_rules: model tiny)."""
    rank = "CollapseEffectiveRankLow"
    alerting = load_alerting(
        {
            "relative": [],
            "predictive": [],
            "drift": [],
            "absolute": [
                {"alert": rank, "metric": "effective_rank", "min": 2, "min_samples": 100,
                 "for": "0s", "severity": "critical"},
            ],
        }
    )  # fmt: skip
    snaps = [
        Snapshot(m, "15m", 900, 1000.0, "ok", None, 0.1, n, 2, {"effective_rank": 1.5})
        for m, n in (("few", 99), ("enough", 100))
    ]
    fired = VerdictTracker(alerting).firing(snaps)
    assert [a.labels["model"] for a in fired] == ["enough"]
    expr = render_rules(alerting)["groups"][0]["rules"][0]["expr"]
    assert expr.endswith(f"and on ({S}) (max by ({S}) (collapse_window_samples) >= 100.0)")


def test_drift_needs_the_effect_size_on_both_paths() -> None:
    drift = "CollapseDriftAboveThreshold"
    alerting = load_alerting(
        {"relative": [], "predictive": [], "absolute": [],
         "drift": [{"alert": drift, "min_mmd": 0.01, "for": "0s"}]}
    )  # fmt: skip
    cases = {  # model: (mmd, threshold, fires)
        "shifted": (0.05, 0.01, True),
        "busy": (0.008, 0.001, False),  # 8 thresholds, but below the effect size
        "noisy": (0.05, 0.1, False),  # above the effect size, within sampling noise
        "edge": (0.01, 0.001, False),  # the effect size is a strict bound, as in PromQL
    }
    snaps = [
        Snapshot(m, "1h", 3600, 1000.0, "ok", None, 0.1, 5000, 50,
                 {"drift_mmd": v, "drift_mmd_threshold": t})
        for m, (v, t, _) in cases.items()
    ]  # fmt: skip
    fired = {a.labels["model"] for a in VerdictTracker(alerting).firing(snaps)}
    assert fired == {m for m, (_, _, fires) in cases.items() if fires}
    (group,) = [g for g in render_rules(alerting)["groups"] if g["name"].endswith(".drift")]
    assert group["rules"][0]["expr"] == (
        f"(max by ({S}) (collapse_drift_mmd) > max by ({S}) "
        f"(collapse_drift_mmd_threshold)) and (max by ({S}) (collapse_drift_mmd) > 0.01)"
    )
