"""collapse-monitor: neural-collapse geometry of LLM hidden states, measured in production.

The top-level names load on first use: `import monitor.exporter` must not import torch, which
a core install (exporter, API, rules, dashboards, status) does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monitor.lazy import lazy_attributes

if TYPE_CHECKING:
    from monitor.metrics import MetricReport, compute_metrics
    from monitor.stats import CollapseStats

__all__ = ["CollapseStats", "MetricReport", "compute_metrics"]
__version__ = "0.1.0"

__getattr__ = lazy_attributes(
    __name__,
    {
        "CollapseStats": "monitor.stats.collapse_stats",
        "MetricReport": "monitor.metrics.report",
        "compute_metrics": "monitor.metrics.engine",
    },
)
