"""What every command module shares: exit codes, the `--format` option, one-line errors on
stderr and the progress bar (the conventions of docs/cli.md)."""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from monitor.errors import CollapseMonitorError
from monitor.errors import ExitCode as ExitCode  # re-exported: the commands import it from here

stderr = Console(stderr=True)


class OutputFormat(StrEnum):
    """`json`: one document on stdout for scripts; `table`: rich tables for people."""

    json = "json"
    table = "table"


FORMAT_HELP = "json (one document on stdout, for scripts) or table (for people)."
# The `--format` option of every command that prints data: `output: FormatOption = table`.
FormatOption = Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)]


# --debug of this invocation: set by `main` for the run of one command line (a context variable,
# so a caller of `main` in the same process, tests included, never sees another run's value).
DEBUG: ContextVar[bool] = ContextVar("collapse_monitor_debug", default=False)


def debug_requested(args: Sequence[str]) -> bool:
    """--debug among the root options, which precede the command's name."""
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def _one_line_paragraphs(text: str) -> str:
    """Each paragraph of `text` on one line (a `\b` paragraph keeps its breaks, as in click),
    rich markup escaped: `[env: 2]` is text, not a tag that would vanish."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    joined = [
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    ]
    return escape("\n\n".join(joined))


def tidy_help(command: Any) -> Any:
    """`command` (a click command tree from typer) with help texts fit for the terminal.

    Docstrings are wrapped at the source's width; typer's rich formatter keeps their line
    breaks (in a command list and in later paragraphs) and wraps again at the terminal's width,
    into jagged lines. One line per paragraph lets the terminal do the only wrapping.
    """
    for name in ("help", "short_help"):
        text = getattr(command, name, None)
        if text:
            setattr(command, name, _one_line_paragraphs(text))
    for param in getattr(command, "params", []):
        if getattr(param, "help", None):
            param.help = _one_line_paragraphs(param.help)
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)
    return command


def iso_utc(epoch: float) -> str:
    """`epoch` seconds as ISO-8601 UTC to the second, e.g. 2026-12-02T10:33:54Z."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_iso_time(stamp: dict[str, Any]) -> dict[str, Any]:
    """`stamp` with `created_iso` beside its epoch `created` (kept for scripts that read it)."""
    created = stamp.get("created")
    if not isinstance(created, int | float) or isinstance(created, bool):
        return dict(stamp)
    out: dict[str, Any] = {}
    for key, value in stamp.items():
        out[key] = value
        if key == "created":
            out["created_iso"] = iso_utc(float(created))
    return out


def _settings_errors() -> tuple[type[Exception], ...]:
    """pydantic's error types, imported when an error is handled (pydantic is not needed to
    print --help, and importing it costs a tenth of a second)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    return (ValidationError, SettingsError)


def one_line(exc: Exception) -> str:
    """Our errors are one line already; a settings error becomes its first problem."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        return f"invalid settings: {where}: {first['msg']}"
    if isinstance(exc, SettingsError):  # e.g. COLLAPSE_MODELS that is not JSON
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        return f"invalid settings: {exc}{cause}"
    return str(exc)


def print_error(message: str) -> None:
    """`error: <message>` as exactly one line on stderr (scripts grep it; logs stay parseable)."""
    flat = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    stderr.print(f"error: {flat}", highlight=False, markup=False, soft_wrap=True)


def progress_bar(what: str, unit: str = "") -> Progress:
    """A transient progress bar on stderr, off when stderr is not a terminal (pipes, CI logs).

    Stdout stays clean for `--format json`; the bar never reaches a log file.
    """
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input or settings: one line on stderr and exit code 2 (a traceback with --debug)."""
    try:
        yield
    # A missing file is one the user named (an option, COLLAPSE_CONFIG_FILE): bad input too.
    except Exception as exc:
        if not isinstance(exc, (CollapseMonitorError, FileNotFoundError, *_settings_errors())):
            raise
        if DEBUG.get():  # the traceback, and still the exit code scripts rely on
            traceback.print_exc(file=sys.stderr)
        print_error(one_line(exc))
        raise typer.Exit(ExitCode.BAD_INPUT) from None
