"""collapse-monitor: neural-collapse geometry of LLM hidden states, measured in production."""

from monitor.metrics import MetricReport, compute_metrics
from monitor.stats import CollapseStats

__all__ = ["CollapseStats", "MetricReport", "compute_metrics"]
__version__ = "0.1.0"
