"""The real `collapse-monitor` entry point run in this process, for tests of the CLI."""

from __future__ import annotations

import pytest

from monitor import cli


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`cli.main(args)`: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else int(code)), out, err
