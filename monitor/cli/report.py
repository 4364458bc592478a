"""The `report` command: PNG figures and a self-contained HTML page of a model's history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from monitor.cli.common import FormatOption, OutputFormat, stderr
from monitor.errors import InvalidInput


def register(app: typer.Typer) -> None:
    """Add the command to `app`."""
    app.command(
        "report",
        epilog=(
            "Example: collapse-monitor report --model gpt2 --window 1h --out report/ ; "
            "collapse-monitor report --from-json study.json --out report/"
        ),
    )(report)


def report(
    out: Annotated[Path, typer.Option(help="Directory for report.html and the PNG figures.")],
    model: Annotated[
        str | None, typer.Option(help="Model to report on (required unless --from-json).")
    ] = None,
    window: Annotated[str, typer.Option(help="Rolling window label, as in COLLAPSE_WINDOWS.")] = (
        "1h"
    ),
    count: Annotated[
        int,
        typer.Option(
            min=1, help="Latest snapshots to plot (the store keeps COLLAPSE_SNAPSHOT_HISTORY)."
        ),
    ] = 288,
    from_json: Annotated[
        Path | None,
        typer.Option(
            "--from-json",
            help="Plot `analyze --format json` (one point) or `study` JSON (one per checkpoint) "
            "instead of reading Redis.",
        ),
    ] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Plot a model's metric history with thresholds and alert periods, and its class means.

    Reads the snapshots, pinned baseline and window statistics from Redis (settings from the
    COLLAPSE_* environment), or a JSON file of `analyze` or `study`. Writes one PNG per metric
    group, a PCA of class means (current window against the baseline) and `report.html`, which
    embeds them and needs nothing else to open. Prints the paths written.
    """
    from monitor.config import Settings
    from monitor.report import write_report
    from monitor.report.sources import from_json as data_from_json
    from monitor.report.sources import from_store

    settings = Settings()
    alerting = settings.alert_thresholds()
    if from_json is not None:
        data = data_from_json(from_json, model=model, alerting=alerting)
    else:
        if model is None:
            raise InvalidInput("usage", "give --model (or --from-json FILE)")
        if settings.embedded:
            raise InvalidInput(
                "bad_config", "report reads Redis: set COLLAPSE_REDIS_URL, or give --from-json"
            )
        from monitor.pipeline.runtime import Runtime

        runtime = Runtime(settings)
        data = from_store(
            runtime.store,
            model,
            window,
            count=count,
            alerting=alerting,
            min_count=settings.min_count,
            known_models=[m.name for m in settings.models],
        )
    with Progress(
        SpinnerColumn(),
        TextColumn("rendering the report of {task.description}"),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as bar:
        bar.add_task(data.model, total=None)
        files = write_report(data, out)
    firing = sorted({p.alert for p in data.alert_periods if p.end is None})
    if output is OutputFormat.json:
        doc = {
            "model": data.model,
            "window": data.window,
            "snapshots": len(data.snapshots),
            "html": str(files.html),
            "pngs": [str(p) for p in files.pngs],
            "firing": firing,
        }
        typer.echo(json.dumps(doc))
        return
    table = Table(title=f"report of {data.model} ({data.window}): {len(data.snapshots)} points")
    table.add_column("file")
    table.add_column("kind")
    table.add_row(str(files.html), "html")
    for path in files.pngs:
        table.add_row(str(path), "png")
    Console().print(table)
    if firing:
        Console().print(f"firing at the last snapshot: {', '.join(firing)}", highlight=False)
