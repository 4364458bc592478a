"""The `collapse-monitor` command line.

Exit codes are `monitor.cli.common.ExitCode` (docs/cli.md): 0 success, 1 unexpected failure,
2 bad input or usage (one line on stderr, a traceback only with --debug), 3 regression
(`compare`), 130 interrupted.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer
import typer.main

from monitor import __version__
from monitor.cli.common import (
    DEBUG,
    ExitCode,
    debug_requested,
    one_line_errors,
    print_error,
    stderr,
    tidy_help,
)
from monitor.lazy import missing_extra

app = typer.Typer(
    name="collapse-monitor",
    help="Watch the neural-collapse geometry of LLM hidden states; export gauges and alerts.",
    epilog=(
        "Example: collapse-monitor analyze --features h.npy --labels y.npy --format json. "
        "Every command: collapse-monitor COMMAND --help; all of them: docs/cli.md."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"collapse-monitor {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """collapse-monitor: neural-collapse metrics of language-model hidden states."""
    del debug  # `main` reads --debug from the arguments, before any command runs


def _register_commands() -> None:
    """One module per command group, as Celery's `celery/bin/`; each imports its heavy parts
    (torch, fastapi, matplotlib) inside the command, so `--help` stays fast."""
    from monitor.cli import (
        alerts,
        analyze,
        api,
        compare,
        dashboards,
        demo,
        exporter,
        pipeline,
        report,
        store,
        study,
    )

    for group in (analyze, demo, pipeline, api, exporter, alerts, dashboards, report, compare,
                  study, store):  # fmt: skip
        group.register(app)


_register_commands()


def _click_kind(exc: BaseException) -> str | None:
    """Which click error `exc` is, by class name: typer 0.2x vendors click as `typer._click`,
    so matching names (as typer itself does) works whichever copy raised it."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    kinds = ("NoArgsIsHelpError", "UsageError", "ClickException", "Abort")
    return next((kind for kind in kinds if kind in names), None)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: every error is one line on stderr (a traceback only with --debug).

    Typer runs in non-standalone mode so that its usage errors (a missing or invalid option)
    come here and get the same one-line form and exit code 2 as our own refusals of bad input.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG.set(debug_requested(args))
    try:
        _run(args)
    finally:
        DEBUG.reset(debug)


def _run(args: list[str]) -> None:
    try:
        with one_line_errors():
            command = tidy_help(typer.main.get_command(app))
            code = command(args=args, prog_name="collapse-monitor", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "NoArgsIsHelpError":
            sys.exit(ExitCode.BAD_INPUT)  # typer has printed the help already
        if kind == "Abort":  # Ctrl-C or end of input at a prompt
            stderr.print("interrupted", markup=False)
            sys.exit(ExitCode.INTERRUPTED)
        if kind is not None:  # a missing or invalid option, a file option that does not exist
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if kind == "UsageError" and ctx else ""
            print_error(f"{exc.format_message()}{hint}")  # type: ignore[attr-defined]
            sys.exit(ExitCode.BAD_INPUT)
        if DEBUG.get():
            traceback.print_exc(file=sys.stderr)
        extra = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
        print_error(extra or f"{type(exc).__name__}: {exc}")
        sys.exit(ExitCode.FAILURE)
    if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130)
        stderr.print("interrupted", markup=False)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


__all__ = ["app", "main"]
