"""Exceptions shared by every part of the service.

`InvalidInput.reason` is a short, stable slug: the pipeline counts rejected samples by it
(`collapse_samples_rejected_total{reason}`), so renaming one is a breaking change.
"""

from __future__ import annotations


class CollapseMonitorError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(CollapseMonitorError, ValueError):
    """Input refused before anything was changed; `reason` names the rule it broke."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IncompatibleStats(CollapseMonitorError, ValueError):
    """Two statistics (or a statistic and a blob) disagree on vocabulary, dimension or options."""
