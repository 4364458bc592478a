"""Sufficient statistics: additive, mergeable, pickle-free.

`RFFConfig` is torch-free; the tensor-backed names load on first use, so the store's
byte-level module (`monitor.stats.codec`) is importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monitor.lazy import lazy_attributes
from monitor.stats.rff_config import RFFConfig

if TYPE_CHECKING:
    from monitor.stats.collapse_stats import ClassStatistics, CollapseStats
    from monitor.stats.rff import median_bandwidth, rff_features

__all__ = ["ClassStatistics", "CollapseStats", "RFFConfig", "median_bandwidth", "rff_features"]

__getattr__ = lazy_attributes(
    __name__,
    {
        "ClassStatistics": "monitor.stats.collapse_stats",
        "CollapseStats": "monitor.stats.collapse_stats",
        "median_bandwidth": "monitor.stats.rff",
        "rff_features": "monitor.stats.rff",
    },
)
