"""The monitor's own health: settings of the pipeline alerts and the rules they render.

Without these, a broken pipeline looks like a healthy model: stale snapshots, stopped
ingestion, rejections, a store or exporter gone, compaction falling behind, dead letters, and
ingestion, compaction or evaluation that keeps failing. Every rule aggregates by the scope
labels and `model` (store rules by the scope alone), like the rest (`monitor.alerts.rules`).

Counters are alerted on with `increase(...[range]) > min_count` held for `for`: a counter that
only grows says nothing by its value, and one born at 1 is invisible to increase(), which is
why the exporter shows every known reason at 0 from the start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from monitor.alerts.common import (
    BY_MODEL,
    BY_SERIES,
    DURATION,
    PREFIX,
    SCOPE,
    Severity,
    number,
    rule,
)

if TYPE_CHECKING:
    from monitor.alerts.thresholds import AlertingSettings

__all__ = ["PipelineAlerts", "pipeline_rules"]

VALUE = '{{ $value | printf "%.3g" }}'
WHERE = "{{ $labels.model }} ({{ $labels.window }})"
COUNT = '{{ $value | printf "%.0f" }}'


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


class DeadLetterRule(PipelineRule):
    """Any dead letter within `range`: a message was set aside that the pipeline could not
    process (a poison message, a batch past its retries, a task that raised).

    `for` is 0s because one is enough to act on; the alert resolves `range` after the last.
    """

    for_: str = Field("0s", alias="for", pattern=DURATION)
    range: str = Field(
        "15m", pattern=DURATION, description="A dead letter within this fires the alert."
    )


class FailureRule(PipelineRule):
    """Failures of one kind in every `range` for `for` (longer than `range`): a failure that
    persists. A burst that retries absorbed (a Redis restart) counts for at most `range`, so
    with `for` longer than `range` it stays quiet."""

    range: str = Field("10m", pattern=DURATION, description="Window the failures are counted in.")
    min_count: float = Field(
        0.0, ge=0, description="Failures within `range` at or below which nothing fires."
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
    dead_letters: DeadLetterRule = Field(default_factory=DeadLetterRule)
    ingestion_failures: FailureRule = Field(default_factory=FailureRule)
    compaction_failures: FailureRule = Field(default_factory=FailureRule)
    evaluation_failures: FailureRule = Field(default_factory=FailureRule)


def pipeline_rules(alerting: AlertingSettings) -> list[dict[str, Any]]:
    """The rules of the pipeline group, in a stable order (runbooks follow it)."""
    p = alerting.pipeline
    rules: list[dict[str, Any]] = []
    if p.snapshot_stale.enabled:
        seconds = p.snapshot_stale.intervals * alerting.evaluation_interval_seconds
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseSnapshotStale",
                f"time() - max by ({BY_SERIES}) ({PREFIX}snapshot_timestamp_seconds)"
                f" > {number(seconds)}",
                p.snapshot_stale.for_,
                p.snapshot_stale.severity,
                f"No fresh metric snapshot for {WHERE}",
                "The latest snapshot of model {{ $labels.model }} (window {{ $labels.window }}) is "
                '{{ $value | printf "%.0f" }} s old, more than '
                f"{p.snapshot_stale.intervals:g} evaluation intervals ({seconds:g} s): the "
                "evaluator (beat or its worker) stopped, and every collapse gauge is frozen.",
            )
        )
    if p.ingestion_stopped.enabled:
        r = p.ingestion_stopped
        counter = f"{PREFIX}samples_ingested_total"
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseIngestionStopped",
                f"(max by ({BY_MODEL}) (rate({counter}[{r.rate_window}])) == 0)"
                f" and (max by ({BY_MODEL}) (increase({counter}[{r.lookback}])) > 0)"
                f" unless on ({SCOPE}) (max by ({SCOPE}) ({PREFIX}store_up) == 0)",
                r.for_,
                r.severity,
                "No samples ingested for {{ $labels.model }}",
                "Model {{ $labels.model }} ingested samples within the last "
                f"{r.lookback} but none in the last {r.rate_window} (for {r.for_}): traffic, "
                "capture, the queue or the ingest workers stopped. Windows now age out.",
            )
        )
    if p.rejection_rate.enabled:
        r2 = p.rejection_rate
        rej = (
            f"sum by ({BY_MODEL}) (max by ({BY_MODEL}, reason) "
            f"(rate({PREFIX}samples_rejected_total[{r2.rate_window}])))"
        )
        ing = f"max by ({BY_MODEL}) (rate({PREFIX}samples_ingested_total[{r2.rate_window}]))"
        expr = f"({rej} / ({rej} + ({ing} or {rej} * 0))) > {number(r2.ratio)}"
        if r2.min_rate > 0:
            expr = f"({expr}) and ({rej} > {number(r2.min_rate)})"
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseRejectionRateHigh",
                expr,
                r2.for_,
                r2.severity,
                "Many samples rejected for {{ $labels.model }}",
                f"A fraction {VALUE} of the samples for model {{{{ $labels.model }}}} were "
                f"rejected over {r2.rate_window} (bound {r2.ratio:g}); see "
                "collapse_samples_rejected_total by reason. A client sends bad or mis-shaped "
                "data, or samples for a model that is not configured.",
            )
        )
    if p.compaction_lag.enabled:
        r3 = p.compaction_lag
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseCompactionLagging",
                f"max by ({BY_MODEL}) ({PREFIX}compaction_lag_seconds) > {number(r3.max_seconds)}",
                r3.for_,
                r3.severity,
                "Compaction falls behind for {{ $labels.model }}",
                "The oldest uncompacted partial of model {{ $labels.model }} is "
                '{{ $value | printf "%.0f" }} s old, more than '
                f"{r3.max_seconds:g} s for {r3.for_}: compaction stopped or is too slow, or "
                "batches waited that long in the ingest or embed queue (the lag counts from "
                "the batch's timestamp). The windows miss recent traffic; partials left past "
                "their TTL expire unmerged.",
            )
        )
    if p.pending_growth.enabled:
        r4 = p.pending_growth
        pending = f"{PREFIX}pending_partials"
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapsePendingPartialsGrowing",
                f"(max by ({BY_MODEL}) ({pending}) > {number(r4.min_count)})"
                f" and (max by ({BY_MODEL}) (deriv({pending}[{r4.range}])) > 0)",
                r4.for_,
                r4.severity,
                "Partials pile up faster than compaction merges them for {{ $labels.model }}",
                'Model {{ $labels.model }} has {{ $value | printf "%.0f" }} partials '
                "waiting for compaction, "
                f"above {r4.min_count:g}, and their number has trended up over {r4.range} for "
                f"{r4.for_}: compaction cannot keep up with ingestion, Redis memory grows and "
                "the windows fall further behind.",
            )
        )
    rules += _failure_rules(alerting)
    if p.store_down.enabled:
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseStoreDown",
                f"max by ({SCOPE}) ({PREFIX}store_up) == 0",
                p.store_down.for_,
                p.store_down.severity,
                "collapse-monitor cannot read its Redis store",
                f"No exporter replica could read the store for {p.store_down.for_}: no snapshot "
                "or pipeline gauge is exported and collapse alerts cannot fire.",
            )
        )
    if p.exporter_absent.enabled:
        rules.append(
            rule(
                alerting.runbook_base_url,
                "CollapseExporterAbsent",
                f"absent({PREFIX}store_up)",
                p.exporter_absent.for_,
                p.exporter_absent.severity,
                "collapse-monitor exporter is not scraped",
                f"Prometheus has had no collapse_store_up series for {p.exporter_absent.for_}: "
                "the exporter is down or not scraped, so every collapse alert is blind.",
            )
        )
    return rules


def _failure_rules(alerting: AlertingSettings) -> list[dict[str, Any]]:
    """Dead letters, and ingestion, compaction or evaluation failing (counters by model)."""
    p = alerting.pipeline
    url = alerting.runbook_base_url
    rules: list[dict[str, Any]] = []
    if p.dead_letters.enabled:
        d = p.dead_letters
        rules.append(
            rule(
                url,
                "CollapseDeadLetters",
                f"sum by ({BY_MODEL}) (max by ({BY_MODEL}, reason) "
                f"(increase({PREFIX}dead_letters_total[{d.range}]))) > 0",
                d.for_,
                d.severity,
                "Messages dead-lettered for {{ $labels.model }}",
                f"{COUNT} message(s) for model {{{{ $labels.model }}}} were dead-lettered in "
                f"the last {d.range} (collapse_dead_letters_total by reason; model _unknown: "
                "broker messages that name no model). They were not processed: poison "
                "messages, batches whose retries ran out, or tasks that raised. Each is kept "
                "on the broker list <prefix>:dead_letters for inspection.",
            )
        )
    kinds = (
        ("ingestion_failures", "CollapseIngestionFailing", "ingest_failures", "ingest or embed "
         "attempts failed on infrastructure (by reason: oom, connection, timeout, ...)",
         "Batches are retried with backoff and dead-lettered past task_max_retries; while "
         "this lasts, the windows miss traffic."),
        ("compaction_failures", "CollapseCompactionFailing", "compaction_failures",
         "compaction or window maintenance runs failed",
         "Its partials wait (and expire after partial_ttl_seconds); the other models are "
         "compacted all the same."),
        ("evaluation_failures", "CollapseEvaluationFailing", "evaluation_failures",
         "evaluations failed", "Its snapshots and collapse gauges are frozen; the other models "
         "are evaluated all the same."),
    )  # fmt: skip
    for setting, alert, counter, what, effect in kinds:
        r: FailureRule = getattr(p, setting)
        if not r.enabled:
            continue
        series = f"increase({PREFIX}{counter}_total[{r.range}])"
        inner = (
            f"sum by ({BY_MODEL}) (max by ({BY_MODEL}, reason) ({series}))"
            if counter == "ingest_failures"
            else f"max by ({BY_MODEL}) ({series})"
        )
        rules.append(
            rule(
                url,
                alert,
                f"{inner} > {number(r.min_count)}",
                r.for_,
                r.severity,
                f"{alert.removeprefix('Collapse').replace('Failing', '')} keeps failing for "
                "{{ $labels.model }}",
                f"For model {{{{ $labels.model }}}}, {COUNT} {what} in the last {r.range}, "
                f"and failures kept coming for {r.for_}. {effect}",
            )
        )
    return rules
