"""What every command module shares: the output format option and the stderr console."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum, StrEnum

import typer
from pydantic import ValidationError
from rich.console import Console

from monitor.errors import CollapseMonitorError


class ExitCode(IntEnum):
    """Every command's exit status (documented in docs/cli.md; scripts and CI rely on them)."""

    OK = 0
    FAILURE = 1  # unexpected error: a bug, or a service that stayed down
    BAD_INPUT = 2  # bad input, settings or usage: one line on stderr
    REGRESSION = 3  # `compare`: the candidate regressed beyond the tolerances
    INTERRUPTED = 130  # Ctrl-C


EXIT_BAD_INPUT = ExitCode.BAD_INPUT
stderr = Console(stderr=True)


class OutputFormat(StrEnum):
    json = "json"
    table = "table"


debug_mode = {"on": False}  # set by the root --debug option


def one_line(exc: Exception) -> str:
    """Our errors are one line already; a settings error becomes its first problem."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        return f"invalid settings: {where}: {first['msg']}"
    return str(exc)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input or settings: one line on stderr and exit code 2 (a traceback with --debug)."""
    try:
        yield
    except (CollapseMonitorError, ValidationError) as exc:
        if debug_mode["on"]:
            raise
        stderr.print(f"error: {one_line(exc)}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
