"""The `api` command: `collapse-monitor api [--host 127.0.0.1] [--port 8000]`."""

from __future__ import annotations

from typing import Annotated

import typer

from monitor.cli.common import one_line_errors


def register(app: typer.Typer) -> None:
    """Add `api` to the main typer app (kept apart so the CLI works without fastapi)."""

    @app.command(
        "api",
        epilog="Example: COLLAPSE_API_TOKEN=... collapse-monitor api --host 0.0.0.0 --port 8000",
    )
    def api(
        host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = (
            "127.0.0.1"
        ),
        port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    ) -> None:
        """Serve the HTTP ingest API (POST /v1/models/{model}/samples, /readyz, /openapi.json).

        A token (COLLAPSE_API_TOKEN) is required unless in embedded mode (no COLLAPSE_REDIS_URL).
        """
        from monitor.api.server import serve
        from monitor.config import Settings

        with one_line_errors():
            serve(Settings(), host, port)
