"""Alerts keep the labels kube-prometheus-stack routes on, and carry static rule labels.

The rendered rules run in the real `promtool test rules` over series as a Prometheus Operator
scrape labels them (`namespace`, `job`, and `cluster` where relabelled; `instance` and `pod`
per replica): two namespaces run the same model name, each with two exporter replicas. Each
alert must come once per namespace, with `namespace`, `job`, `cluster` and the static
`rule_labels`, and without `instance`/`pod`. The expected label sets are built by
`alert_labels` with the direct client's extra labels, the function its alerts use, so the
two paths agree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml  # type: ignore[import-untyped]
from cli_main import group_app
from typer.testing import CliRunner

from monitor.alerts.rules import DEFAULT_RELEASE, alert_labels, render_rules, to_yaml
from monitor.alerts.thresholds import default_alerting, load_alerting
from monitor.cli.alerts import register
from monitor.config import Settings
from monitor.errors import InvalidInput

RULE_LABELS = {"team": "ml", "tier": "gold"}
# Two deployments of model `m`: ml-a relabels a cluster, ml-b has none (absent stays absent).
SCOPES = [
    {"cluster": "eu", "namespace": "ml-a", "job": "cm-exporter"},
    {"namespace": "ml-b", "job": "cm-exporter"},
]
REPLICAS = [
    {"instance": "10.0.0.1:9464", "pod": "x-1"},
    {"instance": "10.0.0.2:9464", "pod": "x-2"},
]


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def _everywhere(metric: str, values: str, **labels: str) -> list[dict[str, str]]:
    """The series on each replica of each deployment."""
    return [_series(metric, values, **s, **r, **labels) for s in SCOPES for r in REPLICAS]


def _expected(rule: dict[str, Any], scope: dict[str, str], value: float, **ids: str) -> Any:
    labels = alert_labels(rule["alert"], ids.get("model"), ids.get("window"),
                          rule["labels"]["severity"], {**scope, **RULE_LABELS})  # fmt: skip
    del labels["alertname"]

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
        text = text.replace('{{ $value | printf "%.3g" }}', f"{value:.3g}")
        return text.replace('{{ $value | printf "%.0f" }}', f"{value:.0f}")

    notes = {k: render(v) for k, v in rule["annotations"].items()}
    return {"exp_labels": labels, "exp_annotations": notes}


def test_alerts_keep_the_scope_once_per_deployment(tmp_path: Path) -> None:
    alerting = load_alerting({"rule_labels": RULE_LABELS})
    rules = render_rules(alerting)
    by_name = {
        (r["alert"], r["labels"]["severity"]): r for g in rules["groups"] for r in g["rules"]
    }
    for rule in by_name.values():
        assert rule["labels"] == {"severity": rule["labels"]["severity"], **RULE_LABELS}

    def each(alert: str, severity: str, value: float, **ids: str) -> list[Any]:
        return [_expected(by_name[(alert, severity)], s, value, **ids) for s in SCOPES]

    cdnv, aniso = "CollapseCDNVRisingVsBaseline", "CollapseAnisotropyHigh"
    down, stopped, rejected = (
        "CollapseStoreDown",
        "CollapseIngestionStopped",
        "CollapseRejectionRateHigh",
    )
    ing, rej = "collapse_samples_ingested_total", "collapse_samples_rejected_total"
    cases = [
        # `unless on (...)` joins the ratio with its stderr on the same labels: 2 = 10 stderrs
        {"input_series": [*_everywhere("collapse_drift_nc1_cdnv_ratio", "2+0x30", model="m",
                                       window="1h"),
                          *_everywhere("collapse_drift_nc1_cdnv_ratio_stderr", "0.1+0x30",
                                       model="m", window="1h")],
         "alert_rule_test": [{"eval_time": "20m", "alertname": cdnv,
                              "exp_alerts": each(cdnv, "warning", 2, model="m", window="1h")}]},
        # `and on (...)` joins the bound with the window's sample count on the same labels
        {"input_series": [*_everywhere("collapse_anisotropy_mean_cos", "0.99+0x40", model="m",
                                       window="1h"),
                          *_everywhere("collapse_window_samples", "500+0x40", model="m",
                                       window="1h")],
         "alert_rule_test": [{"eval_time": "35m", "alertname": aniso,
                              "exp_alerts": each(aniso, "warning", 0.99, model="m",
                                                 window="1h")}]},
        {"input_series": _everywhere("collapse_store_up", "0+0x10"),
         "alert_rule_test": [{"eval_time": "5m", "alertname": down,
                              "exp_alerts": each(down, "critical", 0)}]},
        # ingestion stops in both; ml-b's store is down, so its stop is the store alert's page
        {"input_series": [*_everywhere(ing, "0+100x30 3000+0x60", model="m"),
                          *[_series("collapse_store_up", "1+0x90", **SCOPES[0], **r)
                            for r in REPLICAS],
                          *[_series("collapse_store_up", "0+0x90", **SCOPES[1], **r)
                            for r in REPLICAS]],
         "alert_rule_test": [{"eval_time": "90m", "alertname": stopped,
                              "exp_alerts": [_expected(by_name[(stopped, "warning")], SCOPES[0],
                                                       0, model="m")]}]},
        # a sum over reasons, of replicas deduplicated first: 60/(1000+60), not 120/(2000+120)
        {"input_series": [*_everywhere(ing, "0+1000x30", model="m"),
                          *_everywhere(rej, "0+60x30", model="m", reason="bad_input")],
         "alert_rule_test": [{"eval_time": "25m", "alertname": rejected,
                              "exp_alerts": each(rejected, "warning", 60 / 1060, model="m")}]},
    ]  # fmt: skip
    (tmp_path / "rules.yml").write_text(to_yaml(rules))
    doc = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", **case} for case in cases]}  # fmt: skip
    (tmp_path / "test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package `prometheus` (.ci/run)"
    done = subprocess.run([promtool, "test", "rules", "test.yml"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_aggregation_and_join_keeps_the_scope() -> None:
    """No rule aggregates or joins on a label set without namespace and job (one without
    labels at all, `absent()`, is the exporter-absent rule: there is no series to keep)."""
    for group in render_rules(default_alerting())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            clauses = re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
            assert clauses or rule["alert"] == "CollapseExporterAbsent", expr
            for clause in clauses:
                labels = [x.strip() for x in clause.split(",")]
                assert labels[:3] == ["cluster", "namespace", "job"], f"{rule['alert']}: {expr}"
                assert "instance" not in labels
                assert "pod" not in labels
            assert not re.search(r"\b(max|min|sum)\s*\(", expr), expr  # nothing aggregated bare


@pytest.mark.parametrize(
    "labels",
    [
        {"severity": "page"},
        {"alertname": "x"},
        {"model": "x"},
        {"window": "1h"},
        {"a-b": "x"},
        {"__x": "y"},
        {"team": ""},
    ],
)
def test_static_labels_refused(labels: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        load_alerting({"rule_labels": labels})
    with pytest.raises(ValueError, match="label"):
        Settings(alert_labels=labels)


def test_direct_client_labels_from_settings() -> None:
    """Settings.alert_labels reach the evaluator's verdicts under the rules' static labels."""
    from monitor.alerts.verdicts import VerdictTracker
    from monitor.snapshot import Snapshot

    settings = Settings(
        alert_labels={"namespace": "ml", "job": "cm-exporter", "prometheus": "mon/k8s",
                      "team": "overridden"},
        alerting={"rule_labels": {"team": "ml"}, "absolute": [], "predictive": [], "drift": [],
                  "relative": [{"alert": "CollapseX", "metric": "drift_nc1_cdnv_ratio",
                                "max": 1.5, "for": "0s"}]},
    )  # fmt: skip
    snapshot = Snapshot(model="m", window="1h", window_seconds=3600, timestamp=100.0,
                        status="ok", reason=None, duration_seconds=0.1, sample_count=10,
                        class_count=2, metrics={"drift_nc1_cdnv_ratio": 2.0})  # fmt: skip
    (alert,) = VerdictTracker(settings.alert_thresholds()).firing([snapshot])
    assert alert.labels == {"alertname": "CollapseX", "severity": "warning", "model": "m",
                            "window": "1h", "namespace": "ml", "job": "cm-exporter",
                            "prometheus": "mon/k8s", "team": "ml"}  # fmt: skip


def _app() -> typer.Typer:
    return group_app(register)


def test_cli_labels_and_default_release() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["rules", "render", "--label", "team=ml", "--label", "x=a=b"])
    assert result.exit_code == 0, result.output
    rules = [r for g in yaml.safe_load(result.output)["groups"] for r in g["rules"]]
    assert all(r["labels"]["team"] == "ml" and r["labels"]["x"] == "a=b" for r in rules)
    result = runner.invoke(_app(), ["rules", "render", "--format", "prometheusrule"])
    assert yaml.safe_load(result.output)["metadata"]["labels"]["release"] == DEFAULT_RELEASE
    for bad in ("team", "=ml", "severity=page"):
        result = runner.invoke(_app(), ["rules", "render", "--label", bad])
        assert isinstance(result.exception, InvalidInput), bad
