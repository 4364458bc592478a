"""The collapse-metric engine: pure functions of statistics, no I/O.

`compute_metrics` (which needs torch) loads on first use; the key names (`monitor.metrics.keys`)
and `MetricReport` are torch-free, so the exporter and rule generators can read them in a core
install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monitor.metrics.keys import REPORT_KEYS
from monitor.metrics.report import Estimate, MetricReport

if TYPE_CHECKING:
    from monitor.metrics.engine import compute_metrics

__all__ = ["REPORT_KEYS", "Estimate", "MetricReport", "compute_metrics"]


def __getattr__(name: str) -> Any:
    # Only compute_metrics is lazy; submodules (`from monitor.metrics import rows`) are found by
    # the import system itself, before this function is consulted.
    if name != "compute_metrics":
        raise AttributeError(f"module 'monitor.metrics' has no attribute {name!r}")
    value = importlib.import_module("monitor.metrics.engine").compute_metrics
    globals()[name] = value
    return value
