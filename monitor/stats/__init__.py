"""Sufficient statistics (DESIGN.md step 2): additive, mergeable, pickle-free."""

from monitor.stats.collapse_stats import ClassStatistics, CollapseStats

__all__ = ["ClassStatistics", "CollapseStats"]
