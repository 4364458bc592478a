"""Alerting: thresholds configured once (`thresholds`), rendered into Prometheus rules
(`rules`: a rules file or a PrometheusRule manifest), and an optional direct Alertmanager
client (`alertmanager`) whose labels are the rules' labels, so both paths deduplicate.

Nothing heavy is imported here: the CLI and the Helm tooling render rules without torch.
"""

from __future__ import annotations

from monitor.alerts.thresholds import AlertingSettings, default_alerting, load_alerting

__all__ = ["AlertingSettings", "default_alerting", "load_alerting"]
