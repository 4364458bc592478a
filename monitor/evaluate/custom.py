"""User-defined metrics: functions of a window's statistics, exported like the built-ins.

A metric function takes `(stats: CollapseStats, classifier: torch.Tensor | None)` and returns a
float, None (not computable), or a mapping of several named values. Register it either as an
entry point of the group `collapse_monitor.metrics` in your package's metadata:

    [project.entry-points."collapse_monitor.metrics"]
    my_metric = "my_package.metrics:my_metric"

or by a dotted path in the `custom_metrics` setting (`my_package.metrics:my_metric`). The key
is the entry point's name (or the function's name), exported as `collapse_<key>`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

import torch

from monitor.stats import CollapseStats

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "collapse_monitor.metrics"
MetricFn = Callable[[CollapseStats, torch.Tensor | None], Any]
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _resolve(path: str) -> MetricFn:
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"custom metric {path!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"custom metric {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def discover(paths: list[str]) -> dict[str, MetricFn]:
    """Entry points of the group, then the configured dotted paths (which win on a clash)."""
    found: dict[str, MetricFn] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:  # a broken plugin must not stop the evaluator
            log.exception("cannot load custom metric entry point %s", ep.name)
    for path in paths:
        fn = _resolve(path)
        found[path.partition(":")[2]] = fn
    bad = [k for k in found if not _KEY.match(k)]
    if bad:
        raise ValueError(f"custom metric names must be lower_snake_case: {bad}")
    return found


def run_custom(
    functions: Mapping[str, MetricFn], stats: CollapseStats, classifier: torch.Tensor | None
) -> dict[str, float | None]:
    """Values of every custom metric; a failing or non-numeric one is logged and None."""
    values: dict[str, float | None] = {}
    for name, fn in functions.items():
        try:
            result = fn(stats, classifier)
        except Exception:
            log.exception("custom metric %s failed", name)
            values[name] = None
            continue
        items = result.items() if isinstance(result, Mapping) else [(name, result)]
        for key, value in items:
            key = str(key)
            if not _KEY.match(key):
                log.warning("custom metric %s returned an invalid key %r", name, key)
                continue
            values[key] = _number(value)
    return values


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
