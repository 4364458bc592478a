"""Alert thresholds, configured once and rendered into Prometheus rules (`monitor.alerts.rules`).

Why a typed model: the same numbers feed the rules file, the PrometheusRule manifest, the Helm
values and (later) the evaluator's direct Alertmanager client; validating them here means a typo
in a threshold file fails at load time with one line, not as a silently wrong alert at 3 am.

Kinds of bound, each a list so a metric can have a warning and a critical tier under one name:
- `absolute`: a metric outside [min, max] (model-dependent numbers: scope them with `matchers`).
- `relative`: a `drift_*_ratio` (window over pinned baseline) outside [min, max].
- `predictive`: `predict_linear` of a metric reaching a bound within `horizon` (early warning).
- `drift`: `drift_mmd` above `factor` times its calibrated `drift_mmd_threshold`.
- `pipeline`: the monitor's own health (stale snapshots, stopped ingestion, rejections, store,
  compaction falling behind, dead letters, failing ingestion, compaction or evaluation), in
  `monitor.alerts.pipeline_alerts`.

Metric names are METRICS.md keys without the `collapse_` prefix (a given prefix is stripped).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitor.alerts.common import DURATION, RESERVED_LABELS, Severity, duration_seconds
from monitor.alerts.pipeline_alerts import PipelineAlerts
from monitor.data.files import read_structured
from monitor.errors import InvalidInput
from monitor.metrics.keys import RATIO_KEYS as BASE_RATIO_KEYS

__all__ = [
    "DEFAULT_RUNBOOK_BASE_URL",
    "AbsoluteBound",
    "AlertingSettings",
    "DriftBound",
    "PipelineAlerts",
    "PredictiveBound",
    "RelativeBound",
    "Severity",
    "default_alerting",
    "duration_seconds",
    "load_alerting",
]

DEFAULT_RUNBOOK_BASE_URL = (
    "https://github.com/collapse-monitor/collapse-monitor/blob/main/docs/operations.md"
)
ALERT_NAME = re.compile(r"^Collapse[A-Z][A-Za-z0-9]*$")
METRIC_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# The shipped absolute bounds judge windows of at least this many samples. Both metrics are
# unbiased or nearly so at any volume (anisotropy is a U-statistic; the effective rank's bias
# falls with N/d), but a window of a few states can read anything: the effective rank of N
# states is at most N - 1. 100 is far above that floor for the bound of 2 and far below any
# real window (a model with less traffic than this has no meaningful absolute geometry).
MIN_WINDOW_SAMPLES = 100
# The keys a relative bound may watch: the baseline ratios (`drift_<k>_ratio`).
RATIO_KEYS = tuple(f"drift_{key}_ratio" for key in BASE_RATIO_KEYS)


class _Rule(BaseModel):
    """What every alert shares: its name, severity, `for` and optional texts and scope."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    alert: str = Field(description="Alert name, CamelCase, prefixed Collapse.")
    severity: Severity = "warning"
    for_: str = Field("15m", alias="for", pattern=DURATION, description="Pending time.")
    enabled: bool = True
    summary: str | None = Field(None, description="Overrides the generated summary.")
    description: str | None = Field(None, description="Overrides the generated description.")
    matchers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra equality matchers on the series, e.g. {model: gpt2} for a bound "
        "that only makes sense for one model (absolute values are model-dependent).",
    )

    @field_validator("alert")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ALERT_NAME.match(value):
            raise ValueError(f"alert name {value!r} must be CamelCase and start with Collapse")
        return value

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not LABEL_NAME.match(name) or name.startswith("__"):
                raise ValueError(f"matcher label {name!r} is not a usable Prometheus label name")
        return value


class _Bounded(_Rule):
    """A metric that must stay within [min, max]; at least one side is given."""

    metric: str
    min: float | None = None
    max: float | None = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        key = value.removeprefix("collapse_")
        if not METRIC_KEY.match(key):
            raise ValueError(f"metric {value!r} is not a metric key (snake_case)")
        return key

    @model_validator(mode="after")
    def _sides(self) -> _Bounded:
        if self.min is None and self.max is None:
            raise ValueError(f"{self.alert}: give min, max or both")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"{self.alert}: min must be below max")
        return self


class AbsoluteBound(_Bounded):
    """`collapse_<metric>` outside [min, max] for `for`.

    With `min_samples`, only windows holding at least that many samples are judged: an
    absolute value read from a handful of states (the effective rank of 5 samples is at most
    4, whatever the model) says nothing about the model.
    """

    kind: Literal["absolute"] = "absolute"
    min_samples: int | None = Field(
        None,
        ge=1,
        description="Judge only windows with at least this many samples (collapse_window_samples).",
    )


class RelativeBound(_Bounded):
    """A baseline ratio (`drift_<key>_ratio`, 1 = like the baseline) outside [min, max].

    With `min_z`, the ratio must also be significantly different from 1: `|ratio - 1| /
    drift_<key>_ratio_stderr >= min_z`. A window whose sampling noise alone could carry the
    ratio past its bound (little traffic, a shifted class mix) then stays quiet. When the
    stderr is not exported (`stderr_groups: 0`, too few buckets) the bound alone decides, so
    turning the standard errors off never turns the alert off.
    """

    kind: Literal["relative"] = "relative"
    min_z: float | None = Field(
        None,
        gt=0,
        description="Significance: also require |ratio - 1| >= min_z standard errors "
        "(drift_<key>_ratio_stderr), when that stderr is exported. None: the bound alone.",
    )

    @property
    def stderr_metric(self) -> str:
        """The key of the ratio's standard error (`drift_<key>_ratio_stderr`)."""
        return f"{self.metric}_stderr"

    def significant(self, value: float, stderr: float | None) -> bool:
        """The rendered rule's significance test, in the same IEEE arithmetic as PromQL:
        suppressed only when a stderr exists and `|value - 1| / stderr < min_z` (a stderr of
        0 gives an infinite z, NaN compares false)."""
        if self.min_z is None or stderr is None:
            return True
        deviation = abs(float(value) - 1.0)
        if stderr == 0:
            z = math.copysign(math.inf, stderr) if deviation > 0 else math.nan
        else:
            z = deviation / float(stderr)
        return not z < self.min_z

    @field_validator("metric")
    @classmethod
    def _ratio(cls, value: str) -> str:
        if value not in RATIO_KEYS:
            raise ValueError(f"relative bounds apply to {', '.join(RATIO_KEYS)}; got {value!r}")
        return value


class PredictiveBound(_Bounded):
    """`predict_linear(collapse_<metric>[range], horizon)` beyond [min, max]: the early warning.

    It fires while the metric is still inside its bound, when the trend of the last `range`
    says it will cross within `horizon`; `for` damps the noise of a short regression.
    """

    kind: Literal["predictive"] = "predictive"
    for_: str = Field("30m", alias="for", pattern=DURATION)
    range: str = Field("1h", pattern=DURATION, description="Samples the trend is fitted on.")
    horizon: str = Field("6h", pattern=DURATION, description="How far ahead to extrapolate.")


class DriftBound(_Rule):
    """`collapse_drift_mmd > factor * collapse_drift_mmd_threshold` for `for`.

    The threshold is the null of sampling noise at the window's volume: it shrinks as 1/N,
    while a real shift of the traffic (another class mix) gives an MMD that does not. Alone it
    therefore fires on any busy window whose traffic differs a little from the baseline's.
    `min_mmd` adds an effect size: the squared MMD itself (an unbiased estimate, whatever the
    volume) must also exceed it, so only a shift that large alerts.
    """

    factor: float = Field(1.0, gt=0, description="Multiple of the calibrated threshold.")
    min_mmd: float | None = Field(
        None,
        gt=0,
        description="Effect size: drift_mmd must also exceed this (squared MMD in the kernel's "
        "units; the kernel's bandwidth follows the data, so values compare across models).",
    )

    def fires(self, mmd: float | None, threshold: float | None) -> bool:
        """The rendered rule: above `factor` thresholds and above `min_mmd`."""
        if mmd is None or threshold is None or not mmd > self.factor * threshold:
            return False
        return self.min_mmd is None or mmd > self.min_mmd


def _absolute() -> list[AbsoluteBound]:
    return [
        AbsoluteBound(
            alert="CollapseAnisotropyHigh",
            metric="anisotropy_mean_cos",
            max=0.95,
            for_="30m",
            min_samples=MIN_WINDOW_SAMPLES,
        ),
        AbsoluteBound(
            alert="CollapseEffectiveRankLow",
            metric="effective_rank",
            min=2.0,
            severity="critical",
            min_samples=MIN_WINDOW_SAMPLES,
        ),
    ]


# Shipped significance of the baseline ratios: two standard errors. Measured
# (benchmarks/alert_quality.py, docs/operations.md): it delays no detection, while three
# delayed a full collapse at night and missed a full checkpoint swap (the 15m window's
# jackknife has only 3 buckets, so its z is noisy).
MIN_Z = 2.0
# Shipped effect size of the drift alert (squared MMD): above every healthy window of the
# benchmark's shifting traffic, below every injected failure it should catch.
MIN_MMD = 0.005
# The trend rules watch the day window: its volume hardly moves with the time of day, so a
# residual volume effect in a ratio cannot pose as a trend, and a failure turns into the steady
# ramp predict_linear extrapolates (the short windows have the bound rules).
TREND_WINDOW = {"window": "24h"}


def _relative() -> list[RelativeBound]:
    cdnv, ncc = "drift_nc1_cdnv_ratio", "drift_nc4_ncc_agreement_ratio"
    rank = "drift_effective_rank_ratio"
    z = MIN_Z
    return [
        RelativeBound(alert="CollapseCDNVRisingVsBaseline", metric=cdnv, max=1.5, min_z=z),
        RelativeBound(
            alert="CollapseCDNVRisingVsBaseline", metric=cdnv, max=3.0, severity="critical", min_z=z
        ),
        RelativeBound(alert="CollapseNCCAgreementFallingVsBaseline", metric=ncc, min=0.8, min_z=z),
        RelativeBound(
            alert="CollapseNCCAgreementFallingVsBaseline",
            metric=ncc,
            min=0.5,
            severity="critical",
            min_z=z,
        ),
        RelativeBound(
            alert="CollapseInterferenceRisingVsBaseline",
            metric="drift_nc2_equiangularity_std_ratio",
            max=1.3,
            for_="30m",
            min_z=z,
        ),
        RelativeBound(
            alert="CollapseEffectiveRankFallingVsBaseline", metric=rank, min=0.7, min_z=z
        ),
        RelativeBound(
            alert="CollapseEffectiveRankFallingVsBaseline",
            metric=rank,
            min=0.4,
            severity="critical",
            min_z=z,
        ),
    ]


def _predictive() -> list[PredictiveBound]:
    day, fit = TREND_WINDOW, "3h"
    return [
        PredictiveBound(
            alert="CollapseCDNVRisingTrend",
            metric="drift_nc1_cdnv_ratio",
            max=1.5,
            range=fit,
            matchers=day,
        ),
        PredictiveBound(
            alert="CollapseNCCAgreementFallingTrend",
            metric="drift_nc4_ncc_agreement_ratio",
            min=0.8,
            range=fit,
            matchers=day,
        ),
        PredictiveBound(
            alert="CollapseEffectiveRankFallingTrend",
            metric="drift_effective_rank_ratio",
            min=0.7,
            range=fit,
            matchers=day,
        ),
        PredictiveBound(
            alert="CollapseAnisotropyRisingTrend",
            metric="anisotropy_mean_cos",
            max=0.95,
            range=fit,
            matchers=day,
        ),
    ]


class AlertingSettings(BaseModel):
    """Every alert threshold of the service (a field of `Settings`; Helm values mirror it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runbook_base_url: str = Field(
        DEFAULT_RUNBOOK_BASE_URL,
        description="Runbook page; each alert links to <this>#<alert name in lower case>.",
    )
    evaluation_interval_seconds: float = Field(
        60.0, gt=0, description="The evaluator's interval (Settings.evaluation_interval)."
    )
    group_prefix: str = Field("collapse-monitor", min_length=1, description="Rule group names.")
    absolute: list[AbsoluteBound] = Field(default_factory=_absolute)
    relative: list[RelativeBound] = Field(default_factory=_relative)
    predictive: list[PredictiveBound] = Field(default_factory=_predictive)
    drift: list[DriftBound] = Field(
        default_factory=lambda: [DriftBound(alert="CollapseDriftAboveThreshold", min_mmd=MIN_MMD)]
    )
    pipeline: PipelineAlerts = Field(default_factory=PipelineAlerts)
    rule_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Static labels on every rendered rule (the chart's "
        "prometheusRule.additionalRuleLabels, `rules render --label k=v`), e.g. {team: ml}; "
        "the direct Alertmanager client adds them too. Not alertname, severity, model, window.",
    )
    client_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels only the direct Alertmanager client adds (set through the "
        "alert_labels setting): what Prometheus adds to a rule's alert, i.e. its "
        "external_labels plus the namespace, job (and cluster) of the exporter's series, so "
        "that both paths send one label set and Alertmanager deduplicates them.",
    )

    @field_validator("rule_labels", "client_labels")
    @classmethod
    def check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        """Static alert labels: usable names, not an alert's own, not empty."""
        for name, text in value.items():
            if not LABEL_NAME.match(name) or name.startswith("__"):
                raise ValueError(f"label {name!r} is not a usable Prometheus label name")
            if name in RESERVED_LABELS:
                raise ValueError(f"label {name!r} is set by each alert itself")
            if not text:
                raise ValueError(f"label {name!r} is empty (Prometheus would drop it)")
        return value

    def direct_labels(self) -> dict[str, str]:
        """What the direct client adds to each alert's own labels: `client_labels` under the
        rules' `rule_labels`, as Prometheus puts rule labels over its external labels."""
        return {**self.client_labels, **self.rule_labels}

    @model_validator(mode="after")
    def _unique(self) -> AlertingSettings:
        """Two rules with one name and one severity would be indistinguishable in Alertmanager."""
        seen: set[tuple[str, str, str]] = set()
        for rule in [*self.absolute, *self.relative, *self.predictive, *self.drift]:
            key = (rule.alert, rule.severity, json.dumps(rule.matchers, sort_keys=True))
            if key in seen:
                raise ValueError(f"{rule.alert} ({rule.severity}) is defined twice")
            seen.add(key)
        return self

    def instant(self) -> AlertingSettings:
        """The same bounds with `for: 0s`: verdicts of what holds at each point, for a live
        view's own pending timer or a history whose x is not time (study checkpoints)."""
        return self.model_copy(
            update={
                kind: [b.model_copy(update={"for_": "0s"}) for b in getattr(self, kind)]
                for kind in ("absolute", "relative", "drift")
            }
        )


def default_alerting() -> AlertingSettings:
    """The shipped defaults: model-agnostic ratios and trends, plus the pipeline's health."""
    return AlertingSettings()


def load_alerting(source: Path | dict[str, Any]) -> AlertingSettings:
    """Thresholds from a dict or a JSON/YAML file; any problem is one-line `InvalidInput`."""
    if isinstance(source, Path):
        data: object = read_structured(source, "bad_config")
        where = str(source)
    else:
        data, where = source, "alerting"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput("bad_config", f"{where}: expected a mapping of alerting settings")
    try:
        return AlertingSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "alerting"
        message = " ".join(str(err["msg"]).split())
        raise InvalidInput("bad_config", f"{where}: {loc}: {message}") from None
