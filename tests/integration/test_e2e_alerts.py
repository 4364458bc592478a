"""End to end: traffic -> Redis -> evaluator -> exporter -> Prometheus rules -> Alertmanager.

A collapse is injected (class means pulled together, as a corrupted layer would), the alert
reaches Alertmanager's API, and after recovery it resolves. The direct Alertmanager path is
checked the same way, and shown to merge with the rule engine's alert.

Prometheus is configured as kube-prometheus-stack's is: `external_labels` (a cluster and the
`prometheus` label the operator adds), and the exporter scraped as two replicas of one job
with a `namespace` target label. The rule's alert keeps namespace and job, gains the external
labels, and comes once; the direct client, given those labels as `alert_labels`, merges with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from minute_stack import MinuteStack, model_m
from servers import (
    AlertmanagerServer,
    PrometheusServer,
    RedisServer,
    free_port,
    http_json,
    stop_process,
    wait_for,
)

from monitor.alerts.alertmanager import AlertmanagerClient
from monitor.alerts.rules import render_rules, to_yaml
from monitor.alerts.thresholds import load_alerting
from monitor.alerts.verdicts import VerdictTracker
from monitor.config import Settings
from monitor.pipeline.baselines import pin_window

pytestmark = pytest.mark.slow

ALERT = "CollapseCDNVRisingVsBaseline"
ALERTING = load_alerting(
    {
        "absolute": [],
        "predictive": [],
        "drift": [],
        "relative": [
            {"alert": ALERT, "metric": "drift_nc1_cdnv_ratio", "max": 1.5, "for": "1s"},
        ],
    }
)


EXTERNAL = {"cluster": "eu-1", "prometheus": "monitoring/k8s"}
SCOPE = {"namespace": "ml", "job": "cm-exporter"}


def kube_prometheus_config(prometheus: PrometheusServer, port: int) -> None:
    """External labels, and one exporter scraped as two replicas of job cm-exporter."""
    config = json.loads(prometheus.config.read_text())
    config["global"]["external_labels"] = EXTERNAL
    replicas = [f"127.0.0.1:{port}", f"localhost:{port}"]
    config["scrape_configs"] = [{"job_name": SCOPE["job"], "static_configs": [
        {"targets": replicas, "labels": {"namespace": SCOPE["namespace"]}}]}]  # fmt: skip
    prometheus.config.write_text(json.dumps(config))


def active(alertmanager: AlertmanagerServer) -> list[dict[str, object]]:
    alerts = http_json(f"{alertmanager.url}/api/v2/alerts?active=true")
    return [a for a in alerts if a["labels"].get("alertname") == ALERT]


def test_rule_alert_fires_on_collapse_and_resolves(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    alertmanager = AlertmanagerServer(tmp_path)
    rules = tmp_path / "rules.yml"
    rules.write_text(to_yaml(render_rules(ALERTING)))
    exporter_port = free_port()
    redis_server.start()
    alertmanager.start()
    stack = MinuteStack(redis_server.url, [model_m(tmp_path)])
    prometheus = PrometheusServer(
        tmp_path,
        [f"127.0.0.1:{exporter_port}"],
        [rules],
        alertmanager=f"127.0.0.1:{alertmanager.port}",
    )
    kube_prometheus_config(prometheus, exporter_port)
    exporter = stack.start_exporter(exporter_port, tmp_path / "exporter.log")
    try:
        prometheus.start()
        t0 = stack.t0
        stack.feed(spread=1.0, at=t0, tag="base")
        pin_window(stack.runtime.store, stack.runtime.registry, "m", "ref", "1m", 60)
        healthy = stack.evaluate(t0)
        assert healthy.ok
        ratio = healthy.metrics["drift_nc1_cdnv_ratio"]
        assert ratio == pytest.approx(1.0, rel=1e-9)

        query = f"{prometheus.url}/api/v1/query?query=collapse_drift_nc1_cdnv_ratio"

        def scraped_ratio() -> float | None:
            result = http_json(query)["data"]["result"]
            return float(result[0]["value"][1]) if len(result) == 2 else None  # both replicas

        wait_for(lambda: scraped_ratio() is not None, 30, "prometheus scraping the exporter")
        time.sleep(3)  # a few rule evaluations on healthy values
        assert active(alertmanager) == []

        stack.feed(spread=0.3, at=t0 + 100, tag="collapsed")
        collapsed = stack.evaluate(t0 + 100)
        assert collapsed.metrics["drift_nc1_cdnv_ratio"] > 1.5
        wait_for(lambda: len(active(alertmanager)) == 1, 60, "the alert in Alertmanager")
        time.sleep(2)  # two replicas, yet one alert
        (alert,) = active(alertmanager)
        own = {"alertname": ALERT, "severity": "warning", "model": "m", "window": "1m"}
        assert alert["labels"] == {**own, **SCOPE, **EXTERNAL}

        # Without the labels Prometheus adds, a direct verdict is another alert: the control.
        # (instant(): the verdict holds now, without waiting `for` over evaluations)
        verdicts = VerdictTracker(ALERTING.instant()).firing([collapsed])
        assert len(verdicts) == 1
        bare = AlertmanagerClient(alertmanager.url)
        assert bare.update(verdicts)
        wait_for(lambda: len(active(alertmanager)) == 2, 15, "the unlabelled direct alert")
        assert bare.update([])
        wait_for(lambda: len(active(alertmanager)) == 1, 15, "the unlabelled alert resolved")

        # With alert_labels = external labels + namespace/job it merges: one alert.
        settings = Settings(alerting=ALERTING.instant(), alert_labels={**SCOPE, **EXTERNAL})
        verdicts = VerdictTracker(settings.alert_thresholds()).firing([collapsed])
        assert [v.labels for v in verdicts] == [alert["labels"]]
        client = AlertmanagerClient(alertmanager.url)
        assert client.update(verdicts)
        time.sleep(1)
        assert [a["labels"] for a in active(alertmanager)] == [alert["labels"]]
        # Both paths now hold it; both stand down on recovery (a direct resolve while the rule
        # still fires would end the merged alert until Prometheus re-sends it: resend_delay).

        stack.feed(spread=1.0, at=t0 + 200, tag="recovered")
        recovered = stack.evaluate(t0 + 200)
        assert recovered.metrics["drift_nc1_cdnv_ratio"] < 1.5
        recovered_ratio = recovered.metrics["drift_nc1_cdnv_ratio"]
        assert client.update(VerdictTracker(settings.alert_thresholds()).firing([recovered]))
        wait_for(lambda: scraped_ratio() == pytest.approx(recovered_ratio), 30, "new value scraped")
        wait_for(lambda: active(alertmanager) == [], 60, "the alert resolved")
    finally:
        stop_process(exporter)
        prometheus.stop()
        alertmanager.stop()
        redis_server.stop()


def test_direct_alerts_fire_and_resolve_without_prometheus(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    alertmanager = AlertmanagerServer(tmp_path)
    redis_server.start()
    alertmanager.start()
    try:
        stack = MinuteStack(redis_server.url, [model_m(tmp_path)])
        tracker = VerdictTracker(ALERTING)
        client = AlertmanagerClient(alertmanager.url)
        t0 = stack.t0
        stack.feed(spread=1.0, at=t0, tag="base")
        pin_window(stack.runtime.store, stack.runtime.registry, "m", "ref", "1m", 60)
        client.update(tracker.firing([stack.evaluate(t0)]))
        stack.feed(spread=0.3, at=t0 + 100, tag="collapsed")
        client.update(tracker.firing([stack.evaluate(t0 + 100)]))  # condition starts to hold
        stack.feed(spread=0.3, at=t0 + 105, tag="still")
        client.update(tracker.firing([stack.evaluate(t0 + 105)]))  # held for 5 s > for: 1s
        wait_for(lambda: len(active(alertmanager)) == 1, 15, "the direct alert")
        stack.feed(spread=1.0, at=t0 + 200, tag="recovered")
        client.update(tracker.firing([stack.evaluate(t0 + 200)]))
        wait_for(lambda: active(alertmanager) == [], 15, "the direct alert resolved")
    finally:
        alertmanager.stop()
        redis_server.stop()
