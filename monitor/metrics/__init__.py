"""The collapse-metric engine: pure functions of statistics, no I/O.

`compute_metrics` (torch) loads on first use; the key names (`monitor.metrics.keys`) and
`MetricReport` are torch-free, so the exporter and rule generators read them in a core install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monitor.lazy import lazy_attributes
from monitor.metrics.keys import REPORT_KEYS
from monitor.metrics.report import Estimate, MetricReport

if TYPE_CHECKING:
    from monitor.metrics.engine import compute_metrics

__all__ = ["REPORT_KEYS", "Estimate", "MetricReport", "compute_metrics"]

__getattr__ = lazy_attributes(__name__, {"compute_metrics": "monitor.metrics.engine"})
