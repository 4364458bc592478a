"""Rendered alerting rules, checked by the real `promtool` (Debian package `prometheus`).

For each alert the test feeds input series that make it fire and series that keep it quiet,
and promtool evaluates the rules over them (`promtool test rules`). Expected labels come from
`alert_labels`, the function the direct Alertmanager client uses, so a mismatch between the two
paths fails here. Without promtool the test FAILS: a rules file nobody checked is not tested.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml  # type: ignore[import-untyped]
from cli_main import group_app
from typer.testing import CliRunner

from monitor.alerts.rules import (
    alert_labels,
    alert_names,
    render_prometheus_rule,
    render_rules,
    to_yaml,
)
from monitor.alerts.thresholds import (
    MIN_MMD,
    MIN_WINDOW_SAMPLES,
    AlertingSettings,
    default_alerting,
    load_alerting,
)
from monitor.cli.alerts import register
from monitor.errors import InvalidInput

# The label set every rule aggregates by (monitor.alerts.common).
S = "cluster, namespace, job, model, window"
SM = "cluster, namespace, job, model"
ROOT = Path(__file__).resolve().parents[2]
Case = dict[str, Any]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install the Debian package `prometheus` (.ci/run)")
    return path


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def _flat(value: float, minutes: int) -> str:
    return f"{value}+0x{minutes}"


class Expect:
    """Expected alerts, with annotations rendered the way Prometheus renders the templates."""

    def __init__(self, rules: dict[str, Any]) -> None:
        self.rules = {
            (r["alert"], r["labels"]["severity"]): r for g in rules["groups"] for r in g["rules"]
        }

    def __call__(
        self, alert: str, severity: str, value: float, model: str = "bad", window: str = "1h"
    ) -> dict[str, Any]:
        rule = self.rules[(alert, severity)]
        labels = alert_labels(alert, model or None, window or None, severity)
        del labels["alertname"]
        notes = {k: self._render(v, labels, value) for k, v in rule["annotations"].items()}
        return {"exp_labels": labels, "exp_annotations": notes}

    @staticmethod
    def _render(text: str, labels: dict[str, str], value: float) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
        text = text.replace('{{ $value | printf "%.3g" }}', f"{value:.3g}")
        return text.replace('{{ $value | printf "%.0f" }}', f"{value:.0f}")


def _case(series: list[dict[str, str]], *checks: tuple[str, str, list[Any]]) -> Case:
    """One promtool test group: input series, then (eval time, alert, expected alerts)."""
    tests = [{"eval_time": t, "alertname": a, "exp_alerts": x} for t, a, x in checks]
    return {"input_series": series, "alert_rule_test": tests}


def _bounded_case(
    expect: Expect, alert: str, metric: str, good: float, bad: tuple[float, list[str]],
    for_minutes: int, worse: tuple[float, list[str]] | None = None,
    min_samples: int | None = None,
) -> Case:  # fmt: skip
    """Quiet before `for` has passed and for a healthy value; firing after, for each tier.

    With `min_samples`, every model's window holds that many samples, and a model `tiny`
    with a bad value read from fewer samples stays quiet."""
    n = for_minutes + 30
    series = [
        _series(metric, _flat(good, n), model="good", window="1h", instance="a"),
        _series(metric, _flat(bad[0], n), model="bad", window="1h", instance="a"),
        _series(metric, _flat(bad[0], n), model="bad", window="1h", instance="b"),  # replica
    ]
    firing = [expect(alert, sev, bad[0]) for sev in bad[1]]
    if worse is not None:
        series.append(_series(metric, _flat(worse[0], n), model="worse", window="1h"))
        firing += [expect(alert, sev, worse[0], model="worse") for sev in worse[1]]
    if min_samples is not None:
        count = "collapse_window_samples"
        series += [_series(count, _flat(min_samples, n), model=m, window="1h")
                   for m in ("good", "bad", "worse")]  # fmt: skip
        few = _flat(min_samples - 1, n)
        series += [_series(metric, _flat(bad[0], n), model="tiny", window="1h"),
                   _series(count, few, model="tiny", window="1h")]  # fmt: skip
    return _case(series, (f"{for_minutes - 5}m", alert, []), (f"{for_minutes + 5}m", alert, firing))


def _trend_case(
    expect: Expect, alert: str, bound_alert: str, metric: str, start: float, slope: float
) -> Case:
    """A steady trend of the day window fires the early warning at 90m while the bound itself
    stays uncrossed; the same trend in a short window (volume swings pose as trends) does not."""
    predicted = start + slope * 90 + slope * 6 * 60
    series = [
        _series(metric, f"{start}{slope:+}x120", model="bad", window="24h"),
        _series(metric, _flat(start, 120), model="good", window="24h"),
        _series(metric, f"{start}{-slope / 2:+}x120", model="recovering", window="24h"),
        _series(metric, f"{start}{slope:+}x120", model="short", window="1h"),  # not the day
    ]
    firing = [expect(alert, "warning", predicted, window="24h")]
    return _case(series, ("20m", alert, []), ("90m", alert, firing), ("90m", bound_alert, []))


def _pipeline_cases(e: Expect) -> list[Case]:
    ingested, rejected = "collapse_samples_ingested_total", "collapse_samples_rejected_total"
    up, ts = "collapse_store_up", "collapse_snapshot_timestamp_seconds"
    stale = "CollapseSnapshotStale"
    stopped, ing_alert = "0+100x30 3000+0x60", "CollapseIngestionStopped"  # stops at 30m
    rej_alert, down, absent = (
        "CollapseRejectionRateHigh",
        "CollapseStoreDown",
        "CollapseExporterAbsent",
    )
    return [
        _case([_series(ts, "0+60x30", model="good", window="1h"),
               _series(ts, "0+60x10 600+0x20", model="bad", window="1h")],
              ("12m", stale, []), ("30m", stale, [e(stale, "warning", 1200)])),
        _case([{"series": up, "values": "1+0x90"},
               _series(ingested, stopped, model="bad", instance="a"),
               _series(ingested, stopped, model="bad", instance="b"),
               _series(ingested, "0+100x90", model="good"),
               _series(ingested, "0+0x90", model="idle")],  # never had traffic: quiet
              ("50m", ing_alert, []), ("90m", ing_alert, [e(ing_alert, "warning", 0, window="")])),
        _case([{"series": up, "values": "0+0x90"}, _series(ingested, stopped, model="bad")],
              ("90m", ing_alert, [])),  # the store alert speaks for it: no second page
        _case([_series(ingested, "0+1000x30", model="bad"),
               _series(rejected, "0+60x30", model="bad", reason="bad_input", instance="a"),
               _series(rejected, "0+60x30", model="bad", reason="bad_input", instance="b"),
               _series(rejected, "0+60x30", model="bad", reason="too_large"),
               _series(ingested, "0+1000x30", model="good"),
               _series(rejected, "0+10x30", model="good", reason="bad_input"),
               _series(rejected, "0+30x30", model="_unknown", reason="unknown_model"),
               _series(ingested, "0+0x30", model="trickle"),
               _series(rejected, "0+0.1x30", model="trickle", reason="bad_input")],
              ("5m", rej_alert, []),
              ("25m", rej_alert, [e(rej_alert, "warning", 120 / 1120, window=""),
                                  e(rej_alert, "warning", 1, model="_unknown", window="")])),
        _case([{"series": up + '{instance="a"}', "values": "1+0x5 0+0x20"}],
              ("7m", down, []), ("10m", down, [e(down, "critical", 0, model="", window="")])),
        _case([{"series": up + '{instance="a"}', "values": "0+0x20"},
               {"series": up + '{instance="b"}', "values": "1+0x20"}],
              ("10m", down, []), ("15m", absent, [])),  # one replica cut off: no page
        _case([_series("collapse_queue_depth", "0+0x20", queue="embed")],
              ("5m", absent, []),
              ("15m", absent, [e(absent, "critical", 1, model="", window="")])),
    ]  # fmt: skip


def _compaction_cases(e: Expect) -> list[Case]:
    """Compaction stops (lag and pending climb) against a healthy sawtooth and short bursts."""
    lag, lag_alert = "collapse_compaction_lag_seconds", "CollapseCompactionLagging"
    pending, grow = "collapse_pending_partials", "CollapsePendingPartialsGrowing"
    sawtooth = " ".join(["5 35"] * 20)  # compaction every 30 s drains what arrived meanwhile
    return [
        _case([_series(lag, "0+60x40", model="bad", instance="a"),  # stopped at 0: above 300 s
               _series(lag, "0+60x40", model="bad", instance="b"),  # from 6m, pending 10m
               _series(lag, sawtooth, model="good"),
               _series(lag, "0+0x5 3600 3600 0+0x32", model="backfill")],  # old ts, compacted
              ("7m", lag_alert, []), ("15m", lag_alert, []),
              ("20m", lag_alert, [e(lag_alert, "warning", 1200, window="")])),
        _case([_series(pending, "0+100x60", model="bad", instance="a"),  # above 1000 from 11m
               _series(pending, "0+100x60", model="bad", instance="b"),
               _series(pending, "0+0x10 5000-1000x5 0+0x45", model="burst"),  # drained in 5m
               _series(pending, " ".join(["600 1400"] * 30), model="busy"),  # no trend
               _series(pending, "5000-50x60", model="draining"),  # catching up after a stall
               _series(pending, "100+5x60", model="ramping")],  # more traffic, small backlog
              ("12m", grow, []), ("20m", grow, []),
              ("30m", grow, [e(grow, "warning", 3000, window="")])),
    ]  # fmt: skip


def _failure_cases(e: Expect) -> list[Case]:
    """Dead letters fire on any increase; ingestion, compaction and evaluation failures fire
    only when they keep coming for longer than their range, never on one burst."""
    dead, dl_alert = "collapse_dead_letters_total", "CollapseDeadLetters"
    cases = [
        _case([_series(dead, "0+0x5 1+0x40", model="bad", reason="retries_exhausted",
                       instance="a"),  # one dead letter at 6m, seen by two replicas
               _series(dead, "0+0x5 1+0x40", model="bad", reason="retries_exhausted",
                       instance="b"),
               _series(dead, "7+0x45", model="old", reason="task_error"),  # long ago: quiet
               _series(dead, "0+0x45", model="good", reason="undecodable_message"),
               _series(dead, "0+0x20 3+0x25", model="_unknown", reason="undecodable_message")],
              ("5m", dl_alert, []),
              ("8m", dl_alert, [e(dl_alert, "warning", 1, window="")]),
              ("25m", dl_alert, [e(dl_alert, "warning", 3, model="_unknown", window="")]),
              ("40m", dl_alert, [])),  # resolved 15m after the last one
    ]  # fmt: skip
    for counter, alert, reasons, per_minute in (
        ("collapse_ingest_failures_total", "CollapseIngestionFailing", ("oom", "timeout"), 30),
        ("collapse_compaction_failures_total", "CollapseCompactionFailing", (None,), 20),
        ("collapse_evaluation_failures_total", "CollapseEvaluationFailing", (None,), 20),
    ):
        series = []
        for i, reason in enumerate(reasons):
            extra = {"reason": reason} if reason else {}
            rate = 2 if i == 0 else 1  # per minute; the firing value is their 10m sum
            series += [
                _series(counter, f"0+{rate}x60", model="bad", instance="a", **extra),
                _series(counter, f"0+{rate}x60", model="bad", instance="b", **extra),
            ]
            series += [
                _series(counter, "0+0x10 5+0x50", model="burst", **extra),  # 10m true
                _series(counter, "0+0x60", model="good", **extra),
            ]
        firing = [e(alert, "warning", per_minute, window="")]
        cases.append(
            _case(
                series,
                ("12m", alert, []),
                ("20m", alert, firing),
                ("25m", alert, firing),
                ("45m", alert, firing),
            )
        )
    return cases


def _cases(rules: dict[str, Any]) -> list[Case]:
    e = Expect(rules)
    w, c = ["warning"], ["warning", "critical"]
    mmd, thr = "collapse_drift_mmd", "collapse_drift_mmd_threshold"
    drift_alert = "CollapseDriftAboveThreshold"
    drift = _case(
        [_series(mmd, _flat(0.02, 30), model="bad", window="1h"),
         _series(thr, _flat(0.01, 30), model="bad", window="1h"),
         _series(mmd, _flat(0.005, 30), model="good", window="1h"),
         _series(thr, _flat(0.01, 30), model="good", window="1h"),
         _series(mmd, _flat(0.5, 30), model="uncalibrated", window="1h"),  # no threshold
         _series(mmd, _flat(MIN_MMD * 0.6, 30), model="busy", window="24h"),  # 3x its
         _series(thr, _flat(MIN_MMD * 0.2, 30), model="busy", window="24h")],  # threshold, but
        # below the effect size: a busy window whose traffic differs a little from the baseline
        ("10m", drift_alert, []), ("20m", drift_alert, [e(drift_alert, "warning", 0.02)]),
    )  # fmt: skip
    r = "collapse_drift_"
    return [
        _bounded_case(e, "CollapseCDNVRisingVsBaseline", r + "nc1_cdnv_ratio", 1.2, (2.0, w), 15,
                      worse=(4.0, c)),
        _bounded_case(e, "CollapseNCCAgreementFallingVsBaseline", r + "nc4_ncc_agreement_ratio",
                      0.95, (0.7, w), 15, worse=(0.3, c)),
        _bounded_case(e, "CollapseInterferenceRisingVsBaseline",
                      r + "nc2_equiangularity_std_ratio", 1.1, (1.6, w), 30),
        _bounded_case(e, "CollapseEffectiveRankFallingVsBaseline", r + "effective_rank_ratio",
                      0.9, (0.6, w), 15, worse=(0.3, c)),
        _bounded_case(e, "CollapseAnisotropyHigh", "collapse_anisotropy_mean_cos", 0.6,
                      (0.97, w), 30, min_samples=MIN_WINDOW_SAMPLES),
        _bounded_case(e, "CollapseEffectiveRankLow", "collapse_effective_rank", 50,
                      (1.2, ["critical"]), 15, min_samples=MIN_WINDOW_SAMPLES),
        _trend_case(e, "CollapseCDNVRisingTrend", "CollapseCDNVRisingVsBaseline",
                    r + "nc1_cdnv_ratio", 1.0, 0.002),
        _trend_case(e, "CollapseNCCAgreementFallingTrend", "CollapseNCCAgreementFallingVsBaseline",
                    r + "nc4_ncc_agreement_ratio", 1.0, -0.001),
        _trend_case(e, "CollapseEffectiveRankFallingTrend",
                    "CollapseEffectiveRankFallingVsBaseline", r + "effective_rank_ratio", 1.0,
                    -0.001),
        _trend_case(e, "CollapseAnisotropyRisingTrend", "CollapseAnisotropyHigh",
                    "collapse_anisotropy_mean_cos", 0.5, 0.002),
        drift,
        *_pipeline_cases(e),
        *_compaction_cases(e),
        *_failure_cases(e),
    ]  # fmt: skip


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "collapse-rules.yml"
    path.write_text(to_yaml(render_rules(default_alerting())))
    return path


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_promtool_check_rules(rules_file: Path) -> None:
    done = _run(_promtool(), "check", "rules", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_fire_and_stay_quiet(rules_file: Path) -> None:
    rules = yaml.safe_load(rules_file.read_text())
    cases = _cases(rules)
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"]}
    assert tested == set(alert_names(default_alerting())), "every alert needs a promtool case"
    for case in cases:  # each alert has a quiet check and a firing check
        exps = [t["exp_alerts"] for t in case["alert_rule_test"]]
        assert any(not x for x in exps)
    doc = {
        "rule_files": [rules_file.name],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in cases],
    }
    test_file = rules_file.parent / "collapse-rules.test.yml"
    test_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = _run(_promtool(), "test", "rules", str(test_file), cwd=rules_file.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_rule_manifest_wraps_the_same_groups() -> None:
    alerting = default_alerting()
    manifest = render_prometheus_rule(
        alerting, "cm-rules", "monitoring", {"team": "ml"}, release="kps"
    )
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == ("cm-rules", "monitoring")
    assert (meta["labels"]["release"], meta["labels"]["team"]) == ("kps", "ml")
    assert manifest["spec"]["groups"] == render_rules(alerting)["groups"]
    assert yaml.safe_load(to_yaml(manifest)) == manifest
    with pytest.raises(InvalidInput):
        render_prometheus_rule(alerting, "Bad_Name", None, None)


def test_every_rule_is_labelled_annotated_and_documented() -> None:
    alerting = default_alerting()
    runbooks = (ROOT / "docs" / "operations.md").read_text()
    headings = set(re.findall(r"^#{2,4} (Collapse\w+)\s*$", runbooks, flags=re.M))
    for group in render_rules(alerting)["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            assert re.fullmatch(r"Collapse[A-Z][A-Za-z0-9]+", name)
            assert rule["labels"]["severity"] in ("warning", "critical")
            notes = rule["annotations"]
            assert notes["runbook_url"].endswith(f"operations.md#{name.lower()}")
            assert notes["summary"]
            assert notes["description"]
            assert name in headings, f"docs/operations.md has no runbook heading {name}"


def test_alert_labels_match_the_rules() -> None:
    assert alert_labels("CollapseCDNVRisingVsBaseline", "m", "1h", "warning") == {
        "alertname": "CollapseCDNVRisingVsBaseline", "severity": "warning", "model": "m",
        "window": "1h",
    }  # fmt: skip
    assert alert_labels("CollapseStoreDown", None, None, "critical") == {
        "alertname": "CollapseStoreDown", "severity": "critical",
    }  # fmt: skip
    with pytest.raises(InvalidInput):
        alert_labels("CollapseX", "m", "1h", "page")


def test_thresholds_load_from_dict_json_and_yaml(tmp_path: Path) -> None:
    custom = {
        "runbook_base_url": "https://runbooks.example/ops.md",
        "evaluation_interval_seconds": 30,
        "absolute": [
            {"alert": "CollapseCDNVHigh", "metric": "collapse_nc1_cdnv", "max": 0.05,
             "for": "10m", "severity": "critical", "matchers": {"model": "gpt2"}},
        ],
    }  # fmt: skip
    alerting = load_alerting(custom)
    assert alerting.absolute[0].metric == "nc1_cdnv"
    assert alerting.relative == default_alerting().relative
    (tmp_path / "a.json").write_text(json.dumps(custom))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(custom))
    assert load_alerting(tmp_path / "a.json") == alerting == load_alerting(tmp_path / "a.yaml")
    assert AlertingSettings.model_validate_json(alerting.model_dump_json(by_alias=True)) == alerting
    text = to_yaml(render_rules(alerting))
    assert f'max by ({S}) (collapse_nc1_cdnv{{model="gpt2"}}) > 0.05' in text
    assert "> 90.0\n" in text  # stale after 3 x 30 s
    assert "https://runbooks.example/ops.md#collapsecdnvhigh" in text


def _pipeline_rule(alerting: AlertingSettings, name: str) -> dict[str, Any] | None:
    found = [r for g in render_rules(alerting)["groups"] for r in g["rules"] if r["alert"] == name]
    return found[0] if found else None


def test_compaction_rules_follow_their_settings() -> None:
    lag, grow = "CollapseCompactionLagging", "CollapsePendingPartialsGrowing"
    default = default_alerting()
    rule = _pipeline_rule(default, lag)
    assert rule is not None
    assert rule["expr"] == f"max by ({SM}) (collapse_compaction_lag_seconds) > 300.0"
    assert (rule["for"], rule["labels"]["severity"]) == ("10m", "warning")
    rule = _pipeline_rule(default, grow)
    assert rule is not None
    assert rule["expr"] == (
        "(max by (cluster, namespace, job, model) (collapse_pending_partials) > 1000.0)"
        " and (max by (cluster, namespace, job, model) (deriv(collapse_pending_partials[15m])) > 0)"
    )
    assert (rule["for"], rule["labels"]["severity"]) == ("15m", "warning")
    custom = load_alerting({"pipeline": {
        "compaction_lag": {"max_seconds": 120, "for": "5m", "severity": "critical"},
        "pending_growth": {"range": "30m", "min_count": 50, "for": "20m"},
    }})  # fmt: skip
    rule = _pipeline_rule(custom, lag)
    assert rule is not None
    assert rule["expr"].endswith("> 120.0")
    assert (rule["for"], rule["labels"]["severity"]) == ("5m", "critical")
    assert "more than 120 s for 5m" in rule["annotations"]["description"]
    rule = _pipeline_rule(custom, grow)
    assert rule is not None
    assert "(collapse_pending_partials) > 50.0)" in rule["expr"]
    assert "deriv(collapse_pending_partials[30m])" in rule["expr"]
    assert (rule["for"], rule["labels"]["severity"]) == ("20m", "warning")
    description = rule["annotations"]["description"]
    assert "above 50, and their number has trended up over 30m for 20m" in description
    off = load_alerting({"pipeline": {"compaction_lag": {"enabled": False},
                                      "pending_growth": {"enabled": False}}})  # fmt: skip
    assert _pipeline_rule(off, lag) is None
    assert _pipeline_rule(off, grow) is None
    assert alert_names(off) == [n for n in alert_names(default) if n not in (lag, grow)]
    for bad in ({"max_seconds": 0}, {"for": "5 m"}):
        with pytest.raises(InvalidInput):
            load_alerting({"pipeline": {"compaction_lag": bad}})
    for bad in ({"min_count": -1}, {"range": "soon"}):
        with pytest.raises(InvalidInput):
            load_alerting({"pipeline": {"pending_growth": bad}})


def test_failure_rules_follow_their_settings() -> None:
    names = ("CollapseDeadLetters", "CollapseIngestionFailing", "CollapseCompactionFailing",
             "CollapseEvaluationFailing")  # fmt: skip
    default = default_alerting()
    found = [_pipeline_rule(default, n) for n in names]
    assert all(r is not None for r in found)
    dead, ingest, compaction, evaluation = (r for r in found if r is not None)
    assert dead["expr"] == (
        f"sum by ({SM}) (max by ({SM}, reason) (increase(collapse_dead_letters_total[15m]))) > 0"
    )
    assert (dead["for"], dead["labels"]["severity"]) == ("0s", "warning")
    assert ingest["expr"] == (
        "sum by (cluster, namespace, job, model) (max by (cluster, namespace, job, model, reason) "
        "(increase(collapse_ingest_failures_total[10m]))) > 0.0"
    )
    assert compaction["expr"] == (
        f"max by ({SM}) (increase(collapse_compaction_failures_total[10m])) > 0.0"
    )
    assert "collapse_evaluation_failures_total[10m]" in evaluation["expr"]
    for rule in (ingest, compaction, evaluation):
        assert (rule["for"], rule["labels"]["severity"]) == ("15m", "warning")
    custom = load_alerting({"pipeline": {
        "dead_letters": {"range": "1h", "severity": "critical"},
        "ingestion_failures": {"range": "5m", "min_count": 10, "for": "20m"},
        "evaluation_failures": {"enabled": False},
    }})  # fmt: skip
    rule = _pipeline_rule(custom, "CollapseDeadLetters")
    assert rule is not None
    assert "[1h]" in rule["expr"]
    assert rule["labels"]["severity"] == "critical"
    assert "in the last 1h" in rule["annotations"]["description"]
    rule = _pipeline_rule(custom, "CollapseIngestionFailing")
    assert rule is not None
    assert rule["expr"].endswith("[5m]))) > 10.0")
    assert rule["for"] == "20m"
    assert _pipeline_rule(custom, "CollapseEvaluationFailing") is None
    assert alert_names(custom) == [n for n in alert_names(default) if n != names[3]]
    for bad in ({"range": "soon"}, {"min_count": -1}, {"for": "5 m"}, {"unknown": 1}):
        with pytest.raises(InvalidInput):
            load_alerting({"pipeline": {"compaction_failures": bad}})


@pytest.mark.parametrize(
    "bad",
    [
        {"absolute": [{"alert": "cdnv_high", "metric": "nc1_cdnv", "max": 1}]},
        {"absolute": [{"alert": "CollapseX", "metric": "nc1_cdnv"}]},
        {"relative": [{"alert": "CollapseX", "metric": "nc1_cdnv", "max": 2}]},
        {"predictive": [{"alert": "CollapseX", "metric": "nc1_cdnv", "max": 2, "horizon": "6 h"}]},
        {"drift": [{"alert": "CollapseD"}, {"alert": "CollapseD"}]},
        {"unknown_key": 1},
    ],
)
def test_bad_thresholds_are_one_line_invalid_input(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        load_alerting(bad)
    assert "\n" not in str(info.value)


def _app() -> typer.Typer:
    return group_app(register)


def test_cli_render_formats_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["rules", "render", "--format", "prometheusrule",
                                    "--release", "kps", "--namespace", "mon"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load(result.output)
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["labels"]["release"] == "kps"
    out = tmp_path / "rules.yml"
    config = tmp_path / "t.yaml"
    config.write_text("pipeline:\n  store_down:\n    for: 5m\n")  # severity stays critical
    result = runner.invoke(_app(), ["rules", "render", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (store,) = [r for g in yaml.safe_load(out.read_text())["groups"] for r in g["rules"]
                if r["alert"] == "CollapseStoreDown"]  # fmt: skip
    assert (store["for"], store["labels"]["severity"]) == ("5m", "critical")
    config.write_text("relative: [{alert: CollapseX, metric: nope, max: 2}]\n")
    result = runner.invoke(_app(), ["rules", "render", "--config", str(config)])
    assert isinstance(result.exception, InvalidInput)  # main() turns it into one line, exit 2
    result = runner.invoke(_app(), ["rules", "render", "--format", "nope"])
    assert result.exit_code == 2


def test_main_cli_renders_rules_and_fails_in_one_line(tmp_path: Path) -> None:
    entry = ["-m", "monitor.cli"]
    done = _run(sys.executable, *entry, "rules", "render", "--format", "prometheusrule")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["kind"] == "PrometheusRule"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = _run(sys.executable, *entry, "rules", "render", "--config", str(bad))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_instant_drops_only_the_hold_of_snapshot_rules() -> None:
    from monitor.alerts.thresholds import default_alerting

    alerting = default_alerting()
    now = alerting.instant()
    for kind in ("absolute", "relative", "drift"):
        before, after = getattr(alerting, kind), getattr(now, kind)
        assert before, kind  # the defaults have rules of each kind, so this checks something
        assert [b.for_ for b in after] == ["0s"] * len(before)
        assert [b.model_copy(update={"for_": "0s"}) for b in before] == after
    assert now.predictive == alerting.predictive  # trends stay with Prometheus, untouched
