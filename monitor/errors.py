"""Exceptions shared by every part of the service.

`InvalidInput.reason` is a short, stable slug: the pipeline counts rejected samples by it
(`collapse_samples_rejected_total{reason}`), so renaming one is a breaking change.
"""

from __future__ import annotations

from enum import IntEnum


class CollapseMonitorError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(CollapseMonitorError, ValueError):
    """Input refused before anything was changed; `reason` names the rule it broke."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IncompatibleStats(CollapseMonitorError, ValueError):
    """Two statistics (or a statistic and a blob) disagree on vocabulary, dimension or options."""


class ExitCode(IntEnum):
    """Every command's exit status (documented in docs/cli.md; scripts and CI rely on them).

    Here rather than in the CLI layer so library results (e.g. `CompareResult`) can name
    theirs without importing typer and rich.
    """

    OK = 0
    FAILURE = 1  # unexpected error: a bug, or a service that stayed down
    BAD_INPUT = 2  # bad input, settings or usage: one line on stderr
    REGRESSION = 3  # `compare`: the candidate regressed beyond the tolerances
    INTERRUPTED = 130  # Ctrl-C (and SIGTERM for `demo`)
