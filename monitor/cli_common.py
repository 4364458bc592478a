"""What every command module shares: the output format option and the stderr console."""

from __future__ import annotations

from enum import StrEnum

from rich.console import Console

EXIT_BAD_INPUT = 2
stderr = Console(stderr=True)


class OutputFormat(StrEnum):
    json = "json"
    table = "table"
