"""The `dashboards` commands: `collapse-monitor dashboards push --url --token --folder`.

A module of its own so pushing dashboards needs neither torch nor Redis. The token
comes from `--token` or `COLLAPSE_GRAFANA_TOKEN` (preferred: it stays out of shell history and
process listings) and is never printed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from monitor.cli.common import one_line_errors


def _dashboards_dir() -> Path:
    """The checkout's dashboards/ (source and editable installs), else the copy that a wheel
    installs under <prefix>/share/collapse-monitor/dashboards (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "dashboards"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "collapse-monitor" / "dashboards"


DEFAULT_DIR = _dashboards_dir()


def register(app: typer.Typer) -> None:
    """Add the `dashboards` sub-app (with `push`) to the main typer app."""
    dashboards_app = typer.Typer(
        name="dashboards",
        help="Grafana dashboards of the monitor.",
        epilog="Example: collapse-monitor dashboards push --url http://grafana:3000",
        no_args_is_help=True,
    )

    @dashboards_app.command(
        "push",
        epilog=(
            "Example: COLLAPSE_GRAFANA_TOKEN=glsa_... collapse-monitor dashboards push "
            "--url https://grafana.example.com --folder 'Collapse monitor'"
        ),
    )
    def push(
        url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://grafana:3000.")],
        token: Annotated[
            str,
            typer.Option(
                envvar="COLLAPSE_GRAFANA_TOKEN",
                help="Service-account token (Editor). Prefer the environment variable.",
                show_default=False,
                show_envvar=True,
            ),
        ],
        folder: Annotated[str, typer.Option(help="Folder title; created when missing.")] = (
            "Collapse monitor"
        ),
        directory: Annotated[
            Path, typer.Option("--dir", help="Directory of dashboard JSON files.")
        ] = DEFAULT_DIR,
    ) -> None:
        """Upload every dashboard (overwriting by uid) and print their URLs, one per line."""
        from monitor.errors import InvalidInput
        from monitor.grafana.push import push_dashboards

        with one_line_errors():
            paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
            if not paths:
                raise InvalidInput("bad_dashboard", f"{directory}: no dashboard JSON files")
            for link in push_dashboards(url, token, folder, paths):
                typer.echo(link)

    app.add_typer(dashboards_app)
