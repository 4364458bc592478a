"""The Prometheus exporter (DESIGN.md step 6): metric snapshots and pipeline health as gauges.

The collector (`monitor.exporter.collector.CollapseCollector`) reads Redis at scrape time and
keeps no state of its own, so any number of exporter replicas report the same numbers; the
server (`monitor.exporter.server`) serves it on `/metrics` with `/healthz` and `/readyz`.

This module holds the catalogue of what is exported: one HELP line per family, saying what the
number means and which way is bad, because the HELP text is what an on-call engineer reads
next to a graph. It imports nothing heavy, so docs and rule generators can read it cheaply.
"""

from __future__ import annotations

# The key names come from their torch-free catalogue, not from copies kept equal by a test.
from monitor.metrics.keys import ALERT_STDERR_KEYS, ESTIMATED_KEYS, RATIO_KEYS

PREFIX = "collapse_"
# Keys whose gauge is not `collapse_<key>`: a `_count` suffix on a gauge fails `promtool check
# metrics` (it reads as a histogram's or summary's count), so METRICS.md names these two so.
GAUGE_NAMES: dict[str, str] = {
    "sample_count": "window_samples",
    "class_count": "window_classes",
}


def gauge_name(key: str) -> str:
    """The Prometheus gauge of a snapshot key: `collapse_<key>` but for `GAUGE_NAMES`."""
    return PREFIX + GAUGE_NAMES.get(key, key)


# One line per METRICS.md key: what it measures and which way is bad. Catalogue order.
METRIC_HELP: dict[str, str] = {
    "nc1_cdnv": "NC1 class-distance normalised variance (within-class spread over squared "
    "class-mean distance, mean over class pairs); rising = classes blur together (bad).",
    "nc1_cdnv2": "NC1 CDNV with the squared denominator (Wu & Papyan's variant); rising = "
    "classes blur together (bad).",
    "nc1_cdnv_unbiased": "NC1 CDNV from unbiased class variances and squared mean distances "
    "(volume-robust: does not move with traffic volume); rising = classes blur together (bad).",
    "nc1_cdnv2_unbiased": "NC1 CDNV2 from unbiased class variances and squared mean distances "
    "(volume-robust); rising = classes blur together (bad).",
    "nc1_trace_ratio": "NC1 Tr(Sigma_W pinv(Sigma_B))/K, within- over between-class "
    "covariance; rising = less separable classes (bad).",
    "nc2_equinorm_cv": "NC2 coefficient of variation of centred class-mean norms; rising = "
    "less equal norms (bad).",
    "nc2_equiangularity_mean": "NC2 mean cosine between centred class means; ideal -1/(K-1), "
    "drifting away from it (upward) is bad.",
    "nc2_equiangularity_std": "NC2 std of cosines between centred class means (interference); "
    "rising = less equiangular (bad).",
    "nc2_log_energy_mean": "GNC2 mean log inverse distance between normalised class means; "
    "rising = less uniform on the sphere (bad).",
    "nc2_log_energy_std": "GNC2 std of the log inverse distance kernel; rising = less uniform "
    "(bad).",
    "nc3_duality_mean_cos": "NC3 mean cosine between classifier rows and centred class means; "
    "falling = less self-dual (bad).",
    "nc3_uniform_duality_cv": "UNC3 coefficient of variation of the NC3 cosines; rising = less "
    "uniform duality (bad).",
    "nc4_ncc_agreement": "NC4 fraction of samples where the LM head agrees with the nearest "
    "class centre; falling = loss of collapse (bad).",
    "anisotropy_mean_cos": "Mean cosine between pairs of hidden states; rising = the space "
    "collapses into a cone (bad).",
    "effective_rank": "Effective rank of the hidden-state covariance; falling = the space "
    "collapses onto few directions (bad).",
    "class_count": "Classes (next tokens) with at least min_count samples in the window; a "
    "sudden fall means narrower traffic.",
    "sample_count": "Samples (token positions) in the window; falling to 0 means ingestion "
    "stopped (bad).",
    "mean_noise_ratio": "Share of the class means' spread that is estimation noise (too few "
    "samples per class); above 0.05 the uncorrected drift ratios are withheld.",
    "drift_mmd": "Squared MMD (random Fourier features) between window and baseline; above "
    "drift_mmd_threshold = distribution drift (bad).",
    "drift_mmd_threshold": "Calibrated null quantile of drift_mmd at this sample count; "
    "drift_mmd above it is significant drift.",
    "drift_mean_shift": "Global-mean shift from the baseline in baseline standard deviations; "
    "rising = drift (bad).",
    "drift_class_mean_cos": "Sample-weighted mean cosine distance of class means from the "
    "baseline; rising = drift (bad).",
    "drift_label_js": "Jensen-Shannon divergence (bits) of next-token frequencies from the "
    "baseline; rising = traffic drift (bad).",
    "drift_nc1_cdnv_ratio": "nc1_cdnv_unbiased over the baseline's (volume-robust); above 1 = "
    "classes blur more than at the baseline (bad).",
    "drift_nc2_equiangularity_std_ratio": "nc2_equiangularity_std over the baseline's (absent "
    "when either side's mean_noise_ratio is too high); above 1 = more interference (bad).",
    "drift_nc4_ncc_agreement_ratio": "nc4_ncc_agreement over the baseline's (absent when "
    "either side's mean_noise_ratio is too high); below 1 = less NCC agreement (bad).",
    "drift_effective_rank_ratio": "effective_rank over the baseline's (absent when either side "
    "has under 10 samples per dimension); below 1 = the space collapses (bad).",
}
for _key in ESTIMATED_KEYS:
    METRIC_HELP[f"{_key}_stderr"] = (
        f"Standard error of the sampled estimate of {_key} (absent when exact); large = "
        "the value is noisy, not necessarily bad."
    )
for _key in ALERT_STDERR_KEYS:
    METRIC_HELP[f"{_key}_traffic_stderr"] = (
        f"Standard error of {_key} as an estimate of the model's value under its traffic "
        "(jackknife over the window's buckets); large = the window cannot pin it down."
    )
for _key in RATIO_KEYS:
    METRIC_HELP[f"drift_{_key}_ratio_stderr"] = (
        f"Standard error of drift_{_key}_ratio (delta method on window and baseline); an alert "
        "may require the ratio's distance from 1 to exceed a multiple of it."
    )

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
