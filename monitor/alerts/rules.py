"""Prometheus alerting rules from `AlertingSettings`: a rules file or a PrometheusRule manifest.

Why the expressions look the way they do:
- Every expression aggregates `by (cluster, namespace, job, model, window)` (pipeline: without
  `window`), so an alert keeps the labels kube-prometheus-stack routes on (an AlertmanagerConfig
  matches `namespace`) and drops `instance` and `pod`: two exporter replicas (stateless, same
  numbers) give one alert, not two. Joins (`and on`, `unless on`) use the same label set.
- Static `rule_labels` (the chart's additionalRuleLabels) go on every rule. The direct
  Alertmanager client builds the same set with `alert_labels`: the rule's own labels plus
  `client_labels` (what Prometheus adds: its external labels, and namespace/job from the
  scrape), so Alertmanager deduplicates the two paths without constraining Prometheus.
- Upper bounds take `max`, lower bounds `min` over replicas: the pessimistic reading.
- A metric that cannot be computed has no sample, so its rules stay quiet rather than firing on
  a fake 0; the pipeline rules (`monitor.alerts.pipeline_alerts`: stale snapshots, stopped
  ingestion, store down, exporter absent) are what catches a monitor that went blind, the
  compaction rules (lag, pending partials growing) one that falls behind, and the failure
  rules (dead letters, ingestion, compaction or evaluation failing) one that breaks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from monitor.alerts.common import BY_SERIES, PREFIX, duration_seconds, number, rule
from monitor.alerts.pipeline_alerts import pipeline_rules
from monitor.alerts.thresholds import (
    ALERT_NAME,
    AbsoluteBound,
    AlertingSettings,
    DriftBound,
    PredictiveBound,
    RelativeBound,
)
from monitor.errors import InvalidInput
from monitor.metrics.catalogue import BY_KEY, gauge_name

__all__ = [
    "DEFAULT_RELEASE",
    "alert_labels",
    "alert_names",
    "render_prometheus_rule",
    "render_rules",
    "to_yaml",
]

# The `release` label kube-prometheus-stack's default ruleSelector matches when it is installed
# as `kube-prometheus-stack`; the chart's monitoring.releaseLabel default is the same (tested).
DEFAULT_RELEASE = "kube-prometheus-stack"

SEVERITIES = ("warning", "critical")
VALUE = '{{ $value | printf "%.3g" }}'
WHERE = "{{ $labels.model }} ({{ $labels.window }})"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def _cap(text: str) -> str:
    """Sentence case that keeps acronyms (`CDNV`, `NC4`) intact, unlike str.capitalize."""
    return text[:1].upper() + text[1:]


_number = number


def _alert_text(metric: str) -> tuple[str, str]:
    """What the metric is called in an alert and why its bad side is bad (the catalogue's
    wording); a metric without one is named by its gauge and explains nothing."""
    info = BY_KEY.get(metric)
    if info is None or info.alert is None:
        return gauge_name(metric), ""
    return info.alert.subject, info.alert.meaning


def _selector(metric: str, matchers: Mapping[str, str]) -> str:
    if not matchers:
        return gauge_name(metric)
    parts = []
    for name, value in sorted(matchers.items()):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{name}="{escaped}"')
    return f"{gauge_name(metric)}{{{','.join(parts)}}}"


def _side(inner: str, agg: str, op: str, bound: float, noise: tuple[str, float] | None) -> str:
    """One side of a bound; with `noise` = (stderr selector, min_z), unless it is noise.

    `A > b unless on (model, window) (abs(A - 1) / S < z)`: a ratio past its bound fires
    unless its stderr series exists and says it is fewer than z standard errors from 1, so a
    missing stderr (turned off, too few buckets) leaves the plain bound in charge.
    """
    value = f"{agg} by ({BY_SERIES}) ({inner})"
    check = f"{value} {op} {_number(bound)}"
    if noise is None:
        return check
    stderr, min_z = noise
    z = f"abs({value} - 1) / min by ({BY_SERIES}) ({stderr})"
    return f"{check} unless on ({BY_SERIES}) ({z} < {_number(min_z)})"


def _bounded_expr(
    inner: str,
    low: float | None,
    high: float | None,
    noise: tuple[str, float] | None = None,
) -> str:
    checks = []
    if low is not None:
        checks.append(_side(inner, "min", "<", low, noise))
    if high is not None:
        checks.append(_side(inner, "max", ">", high, noise))
    return checks[0] if len(checks) == 1 else " or ".join(f"({c})" for c in checks)


def _bound_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"outside [{low:g}, {high:g}]"
    return f"below {low:g}" if low is not None else f"above {high:g}"


def _rule(
    alerting: AlertingSettings,
    alert: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    return rule(alerting.runbook_base_url, alert, expr, for_, severity, summary, description)


def _bounded_rule(
    alerting: AlertingSettings, bound: AbsoluteBound | RelativeBound | PredictiveBound
) -> dict[str, Any]:
    selector = _selector(bound.metric, bound.matchers)
    what, meaning = _alert_text(bound.metric)
    limit = _bound_text(bound.min, bound.max)
    if isinstance(bound, PredictiveBound):
        horizon = duration_seconds(bound.horizon)
        inner = f"predict_linear({selector}[{bound.range}], {_number(horizon)})"
        summary = f"{_cap(what)} heading {limit} within {bound.horizon} on {WHERE}"
        detail = (
            f"On the trend of the last {bound.range}, {what} of model {{{{ $labels.model }}}} "
            f"(window {{{{ $labels.window }}}}) reaches {VALUE} within {bound.horizon}, "
            f"{limit}. Early warning: the bound is not crossed yet."
        )
    else:
        inner = selector
        summary = f"{_cap(what)} {limit} on {WHERE}"
        detail = (
            f"{_cap(what)} of model {{{{ $labels.model }}}} (window "
            f"{{{{ $labels.window }}}}) is {VALUE}, {limit} for {bound.for_}."
        )
    expr = None
    if isinstance(bound, AbsoluteBound) and bound.min_samples is not None:
        samples = _selector("sample_count", bound.matchers)
        expr = (
            f"({_bounded_expr(inner, bound.min, bound.max)}) and on ({BY_SERIES}) "
            f"(max by ({BY_SERIES}) ({samples}) >= {_number(bound.min_samples)})"
        )
        detail = f"{detail} Judged on windows of at least {bound.min_samples} samples."
    noise = None
    if isinstance(bound, RelativeBound) and bound.min_z is not None:
        noise = (_selector(bound.stderr_metric, bound.matchers), bound.min_z)
        detail = (
            f"{detail} It is at least {bound.min_z:g} standard errors from 1 "
            f"({PREFIX}{bound.stderr_metric}), or no standard error is exported: not the "
            "sampling noise of a small window."
        )
    if meaning:
        detail = f"{detail} {meaning}"
    return _rule(
        alerting,
        bound.alert,
        expr or _bounded_expr(inner, bound.min, bound.max, noise),
        bound.for_,
        bound.severity,
        bound.summary or summary,
        bound.description or detail,
    )


def _drift_rule(alerting: AlertingSettings, bound: DriftBound) -> dict[str, Any]:
    mmd = f"max by ({BY_SERIES}) ({_selector('drift_mmd', bound.matchers)})"
    threshold = f"max by ({BY_SERIES}) ({_selector('drift_mmd_threshold', bound.matchers)})"
    scaled = threshold if bound.factor == 1.0 else f"{_number(bound.factor)} * {threshold}"
    times = "" if bound.factor == 1.0 else f"{bound.factor:g} times "
    expr = f"{mmd} > {scaled}"
    effect = ""
    if bound.min_mmd is not None:
        expr = f"({expr}) and ({mmd} > {_number(bound.min_mmd)})"
        effect = f" and above the effect size {bound.min_mmd:g}"
    detail = (
        f"Drift MMD of model {{{{ $labels.model }}}} (window {{{{ $labels.window }}}}) against "
        f"its pinned baseline is {VALUE}, above {times}its calibrated null threshold{effect} "
        f"for {bound.for_}: the hidden-state distribution moved (traffic shift, new "
        "checkpoint, tokenizer or quantisation change)."
    )
    return _rule(
        alerting,
        bound.alert,
        expr,
        bound.for_,
        bound.severity,
        bound.summary or f"Hidden-state drift above its calibrated threshold on {WHERE}",
        bound.description or detail,
    )


def render_rules(alerting: AlertingSettings) -> dict[str, Any]:
    """A Prometheus rules file (`groups:`): collapse, drift and pipeline groups."""
    bounds: list[AbsoluteBound | RelativeBound | PredictiveBound] = [
        *alerting.absolute,
        *alerting.relative,
        *alerting.predictive,
    ]
    collapse = [_bounded_rule(alerting, b) for b in bounds if b.enabled]
    drift = [_drift_rule(alerting, b) for b in alerting.drift if b.enabled]
    named = (("collapse", collapse), ("drift", drift), ("pipeline", pipeline_rules(alerting)))
    for _, rules in named:  # static labels after severity (they may not set it)
        for r in rules:
            r["labels"] = {**r["labels"], **alerting.rule_labels}
    groups = [
        {"name": f"{alerting.group_prefix}.{suffix}", "rules": rules}
        for suffix, rules in named
        if rules
    ]
    return {"groups": groups}


def alert_names(alerting: AlertingSettings) -> list[str]:
    """Distinct alert names the settings render, in rule order (runbooks need one each)."""
    names = [r["alert"] for g in render_rules(alerting)["groups"] for r in g["rules"]]
    return list(dict.fromkeys(names))


def render_prometheus_rule(
    alerting: AlertingSettings,
    name: str = "collapse-monitor",
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    *,
    release: str = DEFAULT_RELEASE,
) -> dict[str, Any]:
    """A monitoring.coreos.com/v1 PrometheusRule holding the rules file's groups.

    `release` is the label kube-prometheus-stack's default `ruleSelector` matches on; other
    `labels` are added (and win on conflict).
    """
    if not _DNS_NAME.match(name):
        raise InvalidInput("bad_name", f"name {name!r} is not a Kubernetes resource name")
    if namespace is not None and not _DNS_LABEL.match(namespace):
        raise InvalidInput("bad_name", f"namespace {namespace!r} is not a Kubernetes namespace")
    merged = {
        "app.kubernetes.io/name": "collapse-monitor",
        "app.kubernetes.io/component": "alerting",
        "release": release,
        **(labels or {}),
    }
    for key, value in merged.items():
        if not _LABEL_VALUE.match(value):
            raise InvalidInput("bad_label", f"label {key}={value!r} is not a valid label value")
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = merged
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": render_rules(alerting),
    }


def alert_labels(
    alert_name: str,
    model: str | None,
    window: str | None,
    severity: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The label set a rendered rule's alert carries, for the direct Alertmanager client.

    Alertmanager identifies an alert by its labels, so the client must send exactly these to
    merge with the rule engine's alert: `extra` holds the rest of that set (what Prometheus
    adds: namespace, job, its external labels; the rules' static labels), under the alert's
    own labels. Empty or missing model/window are left out, as Prometheus drops empty labels
    (pipeline alerts have no window; store alerts no model).
    """
    if not ALERT_NAME.match(alert_name):
        raise InvalidInput("bad_alert", f"alert name {alert_name!r} is not a Collapse* name")
    if severity not in SEVERITIES:
        raise InvalidInput("bad_alert", f"severity {severity!r} is not one of {SEVERITIES}")
    labels = {k: v for k, v in (extra or {}).items() if v}
    labels.update(alertname=alert_name, severity=severity)
    if model:
        labels["model"] = model
    if window:
        labels["window"] = window
    return labels


def to_yaml(doc: Mapping[str, Any]) -> str:
    """YAML text of a rules file or manifest: keys in rule order, one line per expression."""
    import yaml  # type: ignore[import-untyped]

    text: str = yaml.safe_dump(
        dict(doc), sort_keys=False, default_flow_style=False, allow_unicode=True, width=100_000
    )
    return text
