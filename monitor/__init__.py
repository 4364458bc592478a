"""collapse-monitor: neural-collapse geometry of LLM hidden states, measured in production.

The top-level names load lazily (PEP 562): `import monitor.exporter` must not pull in torch,
which a core install (exporter, API, rules, dashboards, status) does not have.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.metrics import MetricReport, compute_metrics
    from monitor.stats import CollapseStats

__all__ = ["CollapseStats", "MetricReport", "compute_metrics"]
__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {
    "CollapseStats": "monitor.stats",
    "MetricReport": "monitor.metrics.report",
    "compute_metrics": "monitor.metrics.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
