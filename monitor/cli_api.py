"""The `api` command: `collapse-monitor api [--host 127.0.0.1] [--port 8000]`."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from monitor.cli_common import EXIT_BAD_INPUT, stderr
from monitor.errors import CollapseMonitorError


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

        try:
            settings = Settings()
            serve(settings, host, port)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            _fail(f"invalid settings: {where}: {first['msg']}")
        except CollapseMonitorError as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    stderr.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)
