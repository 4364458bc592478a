"""The collapse-metric engine (DESIGN.md step 5): pure functions of statistics, no I/O."""

from monitor.metrics.engine import compute_metrics
from monitor.metrics.report import REPORT_KEYS, Estimate, MetricReport

__all__ = ["REPORT_KEYS", "Estimate", "MetricReport", "compute_metrics"]
