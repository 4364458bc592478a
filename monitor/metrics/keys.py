"""The metric key names of METRICS.md, torch-free.

The exporter, the API, rule and dashboard generators and `status` read these names without the
metric engine: importing them must not load torch (a core install has none). The engine's
modules (`report`, `drift`) re-export them under their old names. What each key means, its
unit and which way is bad are in `monitor.metrics.catalogue`: a key added here needs an entry
there (tests/unit/test_catalogue.py holds the two equal).
"""

from __future__ import annotations

# Keys in METRICS.md order: analyze's JSON, the exporter's gauges and the docs follow it. The
# volume-robust CDNV keys sit beside the plug-in ones (tables and comparisons show them
# together), `mean_noise_ratio` with the window's counts it qualifies.
COLLAPSE_KEYS: tuple[str, ...] = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
    "nc1_trace_ratio",
    "nc2_equinorm_cv",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
    "nc3_duality_mean_cos",
    "nc3_uniform_duality_cv",
    "nc4_ncc_agreement",
)
GEOMETRY_KEYS: tuple[str, ...] = (
    "anisotropy_mean_cos",
    "effective_rank",
    "class_count",
    "sample_count",
    "mean_noise_ratio",
)
# Metrics that may be estimated (sampled pairs, subsampled NC4) and then carry `<key>_stderr`.
ESTIMATED_KEYS: tuple[str, ...] = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc1_cdnv_unbiased",
    "nc1_cdnv2_unbiased",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
    "nc4_ncc_agreement",
)
STDERR_KEYS: tuple[str, ...] = tuple(f"{k}_stderr" for k in ESTIMATED_KEYS)
REPORT_KEYS: tuple[str, ...] = COLLAPSE_KEYS + GEOMETRY_KEYS + STDERR_KEYS
# The keys default alerts use, which get `<key>_traffic_stderr`: the standard error of the
# window's value as an estimate of the model's value under its traffic (a jackknife over the
# window's buckets, filled in by the evaluator; not part of REPORT_KEYS, which one set of
# statistics determines). `<key>_stderr` above is only the pair-sampling error.
ALERT_STDERR_KEYS: tuple[str, ...] = (
    "nc1_cdnv_unbiased",
    "nc2_equiangularity_std",
    "nc4_ncc_agreement",
    "effective_rank",
    "anisotropy_mean_cos",
)
TRAFFIC_STDERR_SUFFIX = "_traffic_stderr"
TRAFFIC_STDERR_KEYS: tuple[str, ...] = tuple(
    f"{k}{TRAFFIC_STDERR_SUFFIX}" for k in ALERT_STDERR_KEYS
)

# Drift against a pinned baseline (monitor.metrics.drift computes them).
RATIO_KEYS: tuple[str, ...] = (
    "nc1_cdnv",
    "nc2_equiangularity_std",
    "nc4_ncc_agreement",
    "effective_rank",
)
# The metric each ratio divides: the volume-robust value where one exists (METRICS.md).
RATIO_SOURCE: dict[str, str] = {
    "nc1_cdnv": "nc1_cdnv_unbiased",
    "nc2_equiangularity_std": "nc2_equiangularity_std",
    "nc4_ncc_agreement": "nc4_ncc_agreement",
    "effective_rank": "effective_rank",
}
# Ratios without a sound correction, compared only when both sides' mean_noise_ratio is small.
NOISE_GUARDED: tuple[str, ...] = ("nc2_equiangularity_std", "nc4_ncc_agreement")
# Ratios compared only when both sides have min_samples_per_dim samples per dimension.
SAMPLES_GUARDED: tuple[str, ...] = ("effective_rank",)
# Standard errors of the ratios (delta method; filled by the evaluator, not by compute_drift).
RATIO_STDERR_KEYS: tuple[str, ...] = tuple(f"drift_{k}_ratio_stderr" for k in RATIO_KEYS)
DRIFT_KEYS: tuple[str, ...] = (
    "drift_mmd",
    "drift_mmd_threshold",
    "drift_mean_shift",
    "drift_class_mean_cos",
    "drift_label_js",
    *(f"drift_{k}_ratio" for k in RATIO_KEYS),
)

__all__ = [
    "ALERT_STDERR_KEYS",
    "COLLAPSE_KEYS",
    "DRIFT_KEYS",
    "ESTIMATED_KEYS",
    "GEOMETRY_KEYS",
    "NOISE_GUARDED",
    "RATIO_KEYS",
    "RATIO_SOURCE",
    "RATIO_STDERR_KEYS",
    "REPORT_KEYS",
    "SAMPLES_GUARDED",
    "STDERR_KEYS",
    "TRAFFIC_STDERR_KEYS",
    "TRAFFIC_STDERR_SUFFIX",
]
