"""The CLI in tests: the real entry point run in this process, and one command group on a
fresh root app (as `monitor.cli` registers it)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import typer

from monitor import cli


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`cli.main(args)`: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else int(code)), out, err


def group_app(register: Callable[[typer.Typer], None]) -> typer.Typer:
    """A fresh root app with one module's commands registered, as `monitor.cli` registers
    them (the root callback keeps them subcommands)."""
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """A fresh root, as monitor.cli's app is."""

    register(app)
    return app
