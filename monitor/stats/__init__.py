"""Sufficient statistics (DESIGN.md step 2): additive, mergeable, pickle-free."""

from monitor.stats.collapse_stats import ClassStatistics, CollapseStats
from monitor.stats.rff import RFFConfig, median_bandwidth, rff_features

__all__ = ["ClassStatistics", "CollapseStats", "RFFConfig", "median_bandwidth", "rff_features"]
