"""`compute_metrics`'s defaults and the options settings pass to it, torch-free.

`monitor.config` builds its defaults from these, and the exporter and API read the config: so
they live apart from the engine, which needs torch.
"""

from __future__ import annotations

from typing import TypedDict

DEFAULT_MIN_COUNT = 2
DEFAULT_MAX_EXACT_CLASSES = 30_000
DEFAULT_PAIR_SAMPLES = 500_000
DEFAULT_NC4_MAX_SAMPLES = 20_000
DEFAULT_TILE_SIZE = 512
# Volume guards of the uncorrected drift ratios (monitor.metrics.drift).
DEFAULT_MAX_MEAN_NOISE = 0.05
DEFAULT_MIN_SAMPLES_PER_DIM = 10.0


class MetricOptions(TypedDict, total=False):
    """`compute_metrics` options that come from settings (see `Settings.metric_options`)."""

    min_count: int
    max_exact_classes: int
    pair_samples: int
    nc4_max_samples: int
    seed: int
    device: str
    tile_size: int


__all__ = [
    "DEFAULT_MAX_EXACT_CLASSES",
    "DEFAULT_MAX_MEAN_NOISE",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_SAMPLES_PER_DIM",
    "DEFAULT_NC4_MAX_SAMPLES",
    "DEFAULT_PAIR_SAMPLES",
    "DEFAULT_TILE_SIZE",
    "MetricOptions",
]
