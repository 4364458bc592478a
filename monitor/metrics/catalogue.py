"""The metric catalogue: what each METRICS.md key means, its unit and which way is bad.

One entry per key, read by the exporter (gauge HELP), the alert rules (the wording of an
alert's description), the tests and the docs generator, so a meaning is written once. The key
names and their grouping stay in `monitor.metrics.keys` (the engine's modules import those);
a test holds the two equal. Torch-free: the exporter and the rule generators import it.

`monitor.metrics.catalogue_docs` renders it as docs/metrics.md's table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from monitor.metrics.keys import (
    ALERT_STDERR_KEYS,
    ESTIMATED_KEYS,
    RATIO_KEYS,
    TRAFFIC_STDERR_SUFFIX,
)

__all__ = [
    "BY_KEY",
    "CATALOGUE",
    "GAUGE_NAMES",
    "PREFIX",
    "AlertText",
    "MetricInfo",
    "gauge_name",
    "keys_of",
]

Direction = Literal["up", "down"]
Kind = Literal["collapse", "geometry", "drift", "stderr", "traffic_stderr", "ratio_stderr"]

PREFIX = "collapse_"
# Keys whose gauge is not `collapse_<key>`: a `_count` suffix on a gauge fails `promtool check
# metrics` (it reads as a histogram's or summary's count), so METRICS.md names these two so.
GAUGE_NAMES: Mapping[str, str] = MappingProxyType(
    {"sample_count": "window_samples", "class_count": "window_classes"}
)


def gauge_name(key: str) -> str:
    """The Prometheus gauge of a snapshot key: `collapse_<key>` but for `GAUGE_NAMES`."""
    return PREFIX + GAUGE_NAMES.get(key, key)


@dataclass(frozen=True)
class AlertText:
    """How an alert on the key speaks to the person paged."""

    subject: str  # the key in a summary: "<Subject> above 1.5 on ..."
    meaning: str  # why its bad direction is bad, appended to the description


@dataclass(frozen=True)
class MetricInfo:
    """One METRICS.md key."""

    key: str
    kind: Kind
    help: str  # one line: the exporter's HELP and the docs' meaning
    unit: str
    bad_direction: Direction | None  # None: neither way is bad in itself
    estimated: bool = False  # may be estimated from samples, then carries `<key>_stderr`
    alert: AlertText | None = None  # where a shipped rule watches the key

    @property
    def gauge(self) -> str:
        """The Prometheus gauge the exporter publishes the key as."""
        return gauge_name(self.key)


_CDNV_TEXT = AlertText(
    "CDNV relative to the baseline",
    "Classes blur together relative to the baseline (within-class spread grows against "
    "class distances). In the literature this accompanies worse next-token prediction, "
    "but the relation is not established for every model (this project's study found "
    "plain CDNV uninformative late in training and reversed across model sizes): check "
    "the model's loss or quality before acting.",
)

# Written in keys.py's order (COLLAPSE_KEYS, GEOMETRY_KEYS, DRIFT_KEYS): the exporter's
# gauges and the docs table follow it.
_BASE: tuple[MetricInfo, ...] = (
    MetricInfo(
        "nc1_cdnv",
        "collapse",
        "NC1 class-distance normalised variance (within-class spread over squared "
        "class-mean distance, mean over class pairs); rising = classes blur together (bad).",
        "ratio",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc1_cdnv2",
        "collapse",
        "NC1 CDNV with the squared denominator (Wu & Papyan's variant); rising = "
        "classes blur together (bad).",
        "1/feature^2",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc1_cdnv_unbiased",
        "collapse",
        "NC1 CDNV from unbiased class variances and squared mean distances "
        "(volume-robust: does not move with traffic volume); rising = classes blur together "
        "(bad).",
        "ratio",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc1_cdnv2_unbiased",
        "collapse",
        "NC1 CDNV2 from unbiased class variances and squared mean distances "
        "(volume-robust); rising = classes blur together (bad).",
        "1/feature^2",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc1_trace_ratio",
        "collapse",
        "NC1 Tr(Sigma_W pinv(Sigma_B))/K, within- over between-class "
        "covariance; rising = less separable classes (bad).",
        "ratio",
        "up",
    ),
    MetricInfo(
        "nc2_equinorm_cv",
        "collapse",
        "NC2 coefficient of variation of centred class-mean norms; rising = "
        "less equal norms (bad).",
        "ratio",
        "up",
    ),
    MetricInfo(
        "nc2_equiangularity_mean",
        "collapse",
        "NC2 mean cosine between centred class means; ideal -1/(K-1), "
        "drifting away from it (upward) is bad.",
        "cosine",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc2_equiangularity_std",
        "collapse",
        "NC2 std of cosines between centred class means (interference); "
        "rising = less equiangular (bad).",
        "cosine",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc2_log_energy_mean",
        "collapse",
        "GNC2 mean log inverse distance between normalised class means; "
        "rising = less uniform on the sphere (bad).",
        "log distance",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc2_log_energy_std",
        "collapse",
        "GNC2 std of the log inverse distance kernel; rising = less uniform (bad).",
        "log distance",
        "up",
        estimated=True,
    ),
    MetricInfo(
        "nc3_duality_mean_cos",
        "collapse",
        "NC3 mean cosine between classifier rows and centred class means; "
        "falling = less self-dual (bad).",
        "cosine",
        "down",
    ),
    MetricInfo(
        "nc3_uniform_duality_cv",
        "collapse",
        "UNC3 coefficient of variation of the NC3 cosines; rising = less uniform duality (bad).",
        "ratio",
        "up",
    ),
    MetricInfo(
        "nc4_ncc_agreement",
        "collapse",
        "NC4 fraction of samples where the LM head agrees with the nearest "
        "class centre; falling = loss of collapse (bad).",
        "fraction",
        "down",
        estimated=True,
    ),
    MetricInfo(
        "anisotropy_mean_cos",
        "geometry",
        "Mean cosine between pairs of hidden states; rising = the space "
        "collapses into a cone (bad).",
        "cosine",
        "up",
        alert=AlertText(
            "anisotropy (mean cosine of hidden states)",
            "Hidden states crowd into a narrow cone: over-collapse of the space itself.",
        ),
    ),
    MetricInfo(
        "effective_rank",
        "geometry",
        "Effective rank of the hidden-state covariance; falling = the space "
        "collapses onto few directions (bad).",
        "dimensions",
        "down",
        alert=AlertText(
            "effective rank of the hidden states",
            "The hidden states span almost a single direction: a degenerate representation.",
        ),
    ),
    MetricInfo(
        "class_count",
        "geometry",
        "Classes (next tokens) with at least min_count samples in the window; a "
        "sudden fall means narrower traffic.",
        "classes",
        None,
    ),
    MetricInfo(
        "sample_count",
        "geometry",
        "Samples (token positions) in the window; falling to 0 means ingestion stopped (bad).",
        "samples",
        "down",
    ),
    MetricInfo(
        "mean_noise_ratio",
        "geometry",
        "Share of the class means' spread that is estimation noise (too few "
        "samples per class); above 0.05 the uncorrected drift ratios are withheld.",
        "fraction",
        "up",
    ),
    MetricInfo(
        "drift_mmd",
        "drift",
        "Squared MMD (random Fourier features) between window and baseline; above "
        "drift_mmd_threshold = distribution drift (bad).",
        "squared MMD",
        "up",
    ),
    MetricInfo(
        "drift_mmd_threshold",
        "drift",
        "Calibrated null quantile of drift_mmd at this sample count; "
        "drift_mmd above it is significant drift.",
        "squared MMD",
        None,
    ),
    MetricInfo(
        "drift_mean_shift",
        "drift",
        "Global-mean shift from the baseline in baseline standard deviations; "
        "rising = drift (bad).",
        "baseline std",
        "up",
    ),
    MetricInfo(
        "drift_class_mean_cos",
        "drift",
        "Sample-weighted mean cosine distance of class means from the "
        "baseline; rising = drift (bad).",
        "cosine distance",
        "up",
    ),
    MetricInfo(
        "drift_label_js",
        "drift",
        "Jensen-Shannon divergence (bits) of next-token frequencies from the "
        "baseline; rising = traffic drift (bad).",
        "bits",
        "up",
    ),
    MetricInfo(
        "drift_nc1_cdnv_ratio",
        "drift",
        "nc1_cdnv_unbiased over the baseline's (volume-robust); above 1 = "
        "classes blur more than at the baseline (bad).",
        "ratio to baseline",
        "up",
        alert=_CDNV_TEXT,
    ),
    MetricInfo(
        "drift_nc2_equiangularity_std_ratio",
        "drift",
        "nc2_equiangularity_std over the baseline's (absent "
        "when either side's mean_noise_ratio is too high); above 1 = more interference (bad).",
        "ratio to baseline",
        "up",
        alert=AlertText(
            "class-mean interference relative to the baseline",
            "Class means are less evenly spread (more interference) than at the baseline.",
        ),
    ),
    MetricInfo(
        "drift_nc4_ncc_agreement_ratio",
        "drift",
        "nc4_ncc_agreement over the baseline's (absent when "
        "either side's mean_noise_ratio is too high); below 1 = less NCC agreement (bad).",
        "ratio to baseline",
        "down",
        alert=AlertText(
            "NC4 agreement relative to the baseline",
            "The LM head agrees less often with the nearest class mean than at the baseline: "
            "the representation lost the collapse structure it had.",
        ),
    ),
    MetricInfo(
        "drift_effective_rank_ratio",
        "drift",
        "effective_rank over the baseline's (absent when either side "
        "has under 10 samples per dimension); below 1 = the space collapses (bad).",
        "ratio to baseline",
        "down",
        alert=AlertText(
            "effective rank relative to the baseline",
            "The hidden states use fewer directions than at the baseline: over-collapse of the "
            "space itself, nuance is being lost.",
        ),
    ),
)


def _errors() -> Iterable[MetricInfo]:
    """The standard-error keys, one wording per family (their meaning is their source's)."""
    for key in ESTIMATED_KEYS:
        yield MetricInfo(
            f"{key}_stderr",
            "stderr",
            f"Standard error of the sampled estimate of {key} (absent when exact); large = "
            "the value is noisy, not necessarily bad.",
            f"as {key}",
            None,
        )
    for key in ALERT_STDERR_KEYS:
        yield MetricInfo(
            f"{key}{TRAFFIC_STDERR_SUFFIX}",
            "traffic_stderr",
            f"Standard error of {key} as an estimate of the model's value under its traffic "
            "(jackknife over the window's buckets); large = the window cannot pin it down.",
            f"as {key}",
            None,
        )
    for key in RATIO_KEYS:
        yield MetricInfo(
            f"drift_{key}_ratio_stderr",
            "ratio_stderr",
            f"Standard error of drift_{key}_ratio (delta method on window and baseline); an "
            "alert may require the ratio's distance from 1 to exceed a multiple of it.",
            f"as drift_{key}_ratio",
            None,
        )


CATALOGUE: tuple[MetricInfo, ...] = (*_BASE, *_errors())
BY_KEY: Mapping[str, MetricInfo] = MappingProxyType({m.key: m for m in CATALOGUE})


def keys_of(*kinds: Kind) -> tuple[str, ...]:
    """The keys of the given kinds, in catalogue order."""
    return tuple(m.key for m in CATALOGUE if m.kind in kinds)
