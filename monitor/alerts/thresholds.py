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
  compaction falling behind).

Metric names are METRICS.md keys without the `collapse_` prefix (a given prefix is stripped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitor.data.files import read_structured
from monitor.errors import InvalidInput

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

Severity = Literal["warning", "critical"]
DEFAULT_RUNBOOK_BASE_URL = (
    "https://github.com/collapse-monitor/collapse-monitor/blob/main/docs/operations.md"
)
ALERT_NAME = re.compile(r"^Collapse[A-Z][A-Za-z0-9]*$")
METRIC_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
RATIO_KEYS = (
    "drift_nc1_cdnv_ratio",
    "drift_nc2_equiangularity_std_ratio",
    "drift_nc4_ncc_agreement_ratio",
    "drift_effective_rank_ratio",
)


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration such as `1h30m` (predict_linear takes seconds)."""
    if not re.fullmatch(DURATION, text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", text))


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
    """`collapse_<metric>` outside [min, max] for `for`."""

    kind: Literal["absolute"] = "absolute"


class RelativeBound(_Bounded):
    """A baseline ratio (`drift_<key>_ratio`, 1 = like the baseline) outside [min, max]."""

    kind: Literal["relative"] = "relative"

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
    """`collapse_drift_mmd > factor * collapse_drift_mmd_threshold` for `for`."""

    factor: float = Field(1.0, gt=0, description="Multiple of the calibrated threshold.")


class PipelineRule(BaseModel):
    """One pipeline alert's switch, severity and pending time."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    severity: Severity = "warning"
    for_: str = Field("15m", alias="for", pattern=DURATION)


class StaleRule(PipelineRule):
    """No fresh snapshot for `intervals` evaluation intervals."""

    for_: str = Field("1m", alias="for", pattern=DURATION)
    intervals: float = Field(3.0, gt=1.0, description="Evaluation intervals without a snapshot.")


class IngestionStoppedRule(PipelineRule):
    """Ingestion rate zero over `rate_window`, for a model that ingested within `lookback`."""

    rate_window: str = Field("10m", pattern=DURATION)
    lookback: str = Field(
        "24h",
        pattern=DURATION,
        description="A model counts as active if it ingested within this; idle models stay quiet.",
    )


class RejectionRule(PipelineRule):
    """rejected / (ingested + rejected) above `ratio`, with at least `min_rate` rejections/s."""

    for_: str = Field("10m", alias="for", pattern=DURATION)
    rate_window: str = Field("10m", pattern=DURATION)
    ratio: float = Field(0.05, gt=0, lt=1)
    min_rate: float = Field(
        0.01, ge=0, description="Rejections per second below which the ratio is ignored."
    )


class StoreDownRule(PipelineRule):
    """`collapse_store_up == 0` on every exporter replica: the monitor is blind."""

    severity: Severity = "critical"
    for_: str = Field("2m", alias="for", pattern=DURATION)


class ExporterAbsentRule(PipelineRule):
    """No `collapse_store_up` series at all: the exporter is down or not scraped."""

    severity: Severity = "critical"
    for_: str = Field("10m", alias="for", pattern=DURATION)


class CompactionLagRule(PipelineRule):
    """The oldest uncompacted partial older than `max_seconds`: windows miss recent data.

    The lag counts from the batch's own timestamp (set by the producer), so time spent waiting
    in the ingest or embed queue shows here too, not only a compactor that stopped.
    """

    for_: str = Field("10m", alias="for", pattern=DURATION)
    max_seconds: float = Field(
        300.0,
        gt=0,
        description="Lag bound: 10 compaction intervals (30 s) and one fine bucket (300 s).",
    )


class PendingGrowthRule(PipelineRule):
    """Pending partials trending up over `range` while above `min_count`: compaction cannot
    keep up. A burst that compaction drains drops below `min_count` or stops growing."""

    range: str = Field("15m", pattern=DURATION, description="Samples the slope is fitted on.")
    min_count: float = Field(
        1000.0,
        ge=0,
        description="Pending partials below which growth is ignored (a healthy backlog is at "
        "most one compaction interval of batches).",
    )


class PipelineAlerts(BaseModel):
    """The monitor's own health: without these, a broken pipeline looks like a healthy model.

    One class per alert, each with its own defaults, so a file that overrides only `for` keeps
    the alert's default severity.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    snapshot_stale: StaleRule = Field(default_factory=StaleRule)
    ingestion_stopped: IngestionStoppedRule = Field(default_factory=IngestionStoppedRule)
    rejection_rate: RejectionRule = Field(default_factory=RejectionRule)
    store_down: StoreDownRule = Field(default_factory=StoreDownRule)
    exporter_absent: ExporterAbsentRule = Field(default_factory=ExporterAbsentRule)
    compaction_lag: CompactionLagRule = Field(default_factory=CompactionLagRule)
    pending_growth: PendingGrowthRule = Field(default_factory=PendingGrowthRule)


def _absolute() -> list[AbsoluteBound]:
    return [
        AbsoluteBound(
            alert="CollapseAnisotropyHigh", metric="anisotropy_mean_cos", max=0.95, for_="30m"
        ),
        AbsoluteBound(
            alert="CollapseEffectiveRankLow", metric="effective_rank", min=2.0, severity="critical"
        ),
    ]


def _relative() -> list[RelativeBound]:
    cdnv, ncc = "drift_nc1_cdnv_ratio", "drift_nc4_ncc_agreement_ratio"
    rank = "drift_effective_rank_ratio"
    return [
        RelativeBound(alert="CollapseCDNVRisingVsBaseline", metric=cdnv, max=1.5),
        RelativeBound(
            alert="CollapseCDNVRisingVsBaseline", metric=cdnv, max=3.0, severity="critical"
        ),
        RelativeBound(alert="CollapseNCCAgreementFallingVsBaseline", metric=ncc, min=0.8),
        RelativeBound(
            alert="CollapseNCCAgreementFallingVsBaseline", metric=ncc, min=0.5, severity="critical"
        ),
        RelativeBound(
            alert="CollapseInterferenceRisingVsBaseline",
            metric="drift_nc2_equiangularity_std_ratio",
            max=1.3,
            for_="30m",
        ),
        RelativeBound(alert="CollapseEffectiveRankFallingVsBaseline", metric=rank, min=0.7),
        RelativeBound(
            alert="CollapseEffectiveRankFallingVsBaseline",
            metric=rank,
            min=0.4,
            severity="critical",
        ),
    ]


def _predictive() -> list[PredictiveBound]:
    return [
        PredictiveBound(alert="CollapseCDNVRisingTrend", metric="drift_nc1_cdnv_ratio", max=1.5),
        PredictiveBound(
            alert="CollapseNCCAgreementFallingTrend",
            metric="drift_nc4_ncc_agreement_ratio",
            min=0.8,
        ),
        PredictiveBound(
            alert="CollapseEffectiveRankFallingTrend", metric="drift_effective_rank_ratio", min=0.7
        ),
        PredictiveBound(
            alert="CollapseAnisotropyRisingTrend", metric="anisotropy_mean_cos", max=0.95
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
        default_factory=lambda: [DriftBound(alert="CollapseDriftAboveThreshold")]
    )
    pipeline: PipelineAlerts = Field(default_factory=PipelineAlerts)

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
