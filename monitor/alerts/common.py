"""What thresholds and rules share: durations, severities and the shape of one rendered rule.

Its own module so the settings of the pipeline alerts (`pipeline_alerts`) and the main
thresholds and rules modules can all use it without importing each other.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from monitor.metrics.catalogue import PREFIX as PREFIX  # re-exported: one prefix for all

Severity = Literal["warning", "critical"]
DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
# Labels an alert keeps from its series, so that kube-prometheus-stack can route it (an
# AlertmanagerConfig matches on `namespace`): the target's namespace and job, and `cluster`
# where relabelings set one. PromQL leaves a label that no series has absent, so aggregating by
# them is safe everywhere; replicas of one exporter differ only in instance and pod, which go.
SCOPE = "cluster, namespace, job"
BY_SERIES = f"{SCOPE}, model, window"
BY_MODEL = f"{SCOPE}, model"
# Labels a static rule label (`rule_labels`, the chart's additionalRuleLabels) may not set:
# the alert's identity, which the rules and the direct client derive themselves.
RESERVED_LABELS = frozenset({"alertname", "severity", "model", "window"})


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration such as `1h30m` (predict_linear takes seconds)."""
    if not re.fullmatch(DURATION, text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", text))


def number(value: float) -> str:
    """A bound as PromQL text: shortest exact float form (`1.5`, `1e-05`)."""
    return repr(float(value))


def rule(
    runbook_base_url: str,
    alert: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    """One alerting rule; its runbook is the heading of the alert's name in the runbook page."""
    return {
        "alert": alert,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{runbook_base_url}#{alert.lower()}",
        },
    }
