"""The Prometheus exporter (docs/architecture.md): metric snapshots and pipeline health as gauges.

The collector (`monitor.exporter.collector.CollapseCollector`) reads Redis at scrape time and
keeps no state of its own, so any number of exporter replicas report the same numbers; the
server (`monitor.exporter.server`) serves it on `/metrics` with `/healthz` and `/readyz`.

Every family has one HELP line saying what the number means and which way is bad, because the
HELP text is what an on-call engineer reads next to a graph: the metric keys' lines come from
`monitor.metrics.catalogue`, the pipeline families' are here. It imports nothing heavy, so docs
and rule generators can read it cheaply.
"""

from __future__ import annotations

# Metric keys' HELP, gauge names and the prefix live in the torch-free metric catalogue.
from monitor.metrics.catalogue import CATALOGUE, GAUGE_NAMES, PREFIX, gauge_name

__all__ = [
    "COUNTERS",
    "FAMILY_HELP",
    "GAUGE_NAMES",
    "METRIC_HELP",
    "PREFIX",
    "REASON_COUNTERS",
    "RESERVED_NAMES",
    "custom_help",
    "gauge_name",
]

# HELP of every METRICS.md key (what it measures and which way is bad), in catalogue order:
# the collector publishes the gauges in this order.
METRIC_HELP: dict[str, str] = {m.key: m.help for m in CATALOGUE}

FAMILY_HELP: dict[str, str] = {
    "store_up": "1 when the exporter could read the store on this scrape, 0 when Redis is down "
    "or erroring (bad).",
    "snapshot_timestamp_seconds": "Unix time of the latest evaluation; falling behind now = "
    "the evaluator stopped (bad).",
    "evaluation_duration_seconds": "Seconds the latest evaluation of this window took; "
    "approaching the evaluation interval is bad.",
    "snapshot_ok": "1 when the latest evaluation had enough data, 0 when it reported "
    "insufficient data (bad if it persists).",
    "baseline_info": "The baseline the latest evaluation compared drift against (value 1; "
    "labels name it and its source).",
    "baseline_created_timestamp_seconds": "Unix time the baseline was pinned; a very old "
    "baseline may no longer be representative.",
    "top_drift_cosine_distance": "Cosine distance of a top drifting class's mean from the "
    "baseline (at most 20 classes); higher = more drift.",
    "samples_ingested": "Samples stored exactly once per batch; a flat rate means ingestion "
    "stopped (bad).",
    "batches_ingested": "Batches stored (first delivery); a flat rate means ingestion stopped.",
    "batches_duplicate": "Redelivered batches recognised and ignored; a high rate means workers "
    "die before acknowledging.",
    "samples_dropped": "Samples the capture side dropped under back-pressure; rising = "
    "monitoring coverage lost (bad).",
    "partials_expired": "Per-batch partials that expired before compaction; any increase means "
    "lost data (bad).",
    "untracked_samples": "Valid samples left out because their class is not among the model's "
    "max_tracked_classes most frequent (0 without the cap); a large share means the cap is "
    "too small for the traffic.",
    "samples_rejected": "Samples refused by reason (bad input, unknown model, limits); a "
    "rising rate is bad.",
    "dead_letters": "Messages dead-lettered by reason (poison broker messages, retries "
    "exhausted, task errors), kept on the broker list <prefix>:dead_letters; any increase is "
    "bad.",
    "ingest_failures": "Ingest or embed attempts that failed on infrastructure, by reason "
    "(oom, connection, timeout, ...), each retried; a sustained rate is bad.",
    "compaction_failures": "Compaction or window maintenance runs of the model that failed "
    "(other models went on); a sustained rate is bad.",
    "evaluation_failures": "Evaluations of the model that failed (other models went on); a "
    "sustained rate is bad.",
    "pending_partials": "Per-batch partials waiting for compaction; growing = compaction falls "
    "behind (bad).",
    "compaction_lag_seconds": "Age of the oldest uncompacted partial (0 when none); rising = "
    "windows miss recent data (bad).",
    "store_memory_bytes": "Redis memory of the model's buckets, baselines, partials and "
    "snapshots (dedup markers excluded); near the limit is bad.",
    "queue_depth": "Tasks waiting in a Celery queue; growing = workers cannot keep up (bad).",
    "build_info": "Always 1; the labels name the collapse-monitor version and the Python that "
    "runs the exporter (join on it to see which release exported a series).",
}
COUNTERS = (
    "samples_ingested",
    "batches_ingested",
    "batches_duplicate",
    "samples_dropped",
    "partials_expired",
    "untracked_samples",
    "samples_rejected",
    "dead_letters",
    "ingest_failures",
    "compaction_failures",
    "evaluation_failures",
)
# Counters with a `reason` label: the counters-hash field prefix of each.
REASON_COUNTERS = {
    "samples_rejected": "rejected:",
    "dead_letters": "dead_letters:",
    "ingest_failures": "ingest_failures:",
}
# Names a custom metric key must not take: it would collide with a family defined here.
RESERVED_NAMES: frozenset[str] = frozenset(
    {PREFIX + n for n in FAMILY_HELP}
    | {PREFIX + n for n in GAUGE_NAMES.values()}
    | {PREFIX + n + s for n in COUNTERS for s in ("_total", "_created")}
)


def custom_help(suffix: str) -> str:
    """HELP of a user's metric: its meaning lives with the function that computes it."""
    return (
        f"Custom metric {suffix} (from a registered metric function; see its own documentation "
        "for which way is bad)."
    )
