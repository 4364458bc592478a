"""The `exporter` command: `collapse-monitor exporter [--host 127.0.0.1] [--port 9464]`."""

from __future__ import annotations

from typing import Annotated

import typer

from monitor.cli.common import one_line_errors
from monitor.errors import InvalidInput


def register(app: typer.Typer) -> None:
    """Add `exporter` to the main typer app (kept apart so `--help` stays fast)."""

    @app.command(
        "exporter",
        epilog="Example: COLLAPSE_REDIS_URL=redis://redis:6379/0 collapse-monitor exporter "
        "--host 0.0.0.0 --port 9464",
    )
    def exporter(
        host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = (
            "127.0.0.1"
        ),
        port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 9464,
    ) -> None:
        """Serve Prometheus metrics (/metrics) read from Redis at scrape time, plus /healthz
        and /readyz.

        Needs COLLAPSE_REDIS_URL: the embedded mode keeps its data inside one process, so an
        exporter next to it would have nothing to read.
        """
        from monitor.config import Settings
        from monitor.exporter.server import serve

        with one_line_errors():
            settings = Settings()
            if settings.embedded:
                raise InvalidInput(
                    "no_redis",
                    "the exporter reads snapshots from Redis: set COLLAPSE_REDIS_URL (embedded "
                    "mode keeps its data in one process, so there is nothing to export)",
                )
            serve(settings, host, port)
