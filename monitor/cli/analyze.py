"""The `analyze` command: every metric of saved features (no service needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from monitor.cli.common import FormatOption, OutputFormat, progress_bar
from monitor.metrics import MetricReport
from monitor.metrics.report import COLLAPSE_KEYS, ESTIMATED_KEYS, GEOMETRY_KEYS, format_value

EPILOG = (
    "Example: collapse-monitor analyze --features h.npy --labels y.npy "
    "--classifier W.npy --format json"
)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(analyze)


def analyze(
    features: Annotated[Path, typer.Option(help="(N, d) float features, .npy or .safetensors.")],
    labels: Annotated[Path, typer.Option(help="(N,) int next-token labels.")],
    classifier: Annotated[
        Path | None, typer.Option(help="(V, d) LM-head weights; enables NC3 and NC4.")
    ] = None,
    bias: Annotated[Path | None, typer.Option(help="(V,) LM-head bias.")] = None,
    eval_features: Annotated[
        Path | None, typer.Option(help="Held-out features for NC4 (default: --features).")
    ] = None,
    eval_labels: Annotated[Path | None, typer.Option(help="Labels of --eval-features.")] = None,
    min_count: Annotated[
        int | None, typer.Option(min=1, help="Classes need this many samples. [env: 2]")
    ] = None,
    max_exact_classes: Annotated[
        int | None,
        typer.Option(min=2, help="Above this many classes, pair metrics are sampled. [env: 30000]"),
    ] = None,
    pair_samples: Annotated[
        int | None, typer.Option(min=100, help="Pairs drawn when sampling. [env: 500000]")
    ] = None,
    nc4_max_samples: Annotated[
        int | None, typer.Option(min=1, help="NC4 subsample size. [env: 20000]")
    ] = None,
    second_moment: Annotated[
        bool, typer.Option(help="Keep the d x d second moment (trace ratio, effective rank).")
    ] = True,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]. [env: auto]")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of sampled pairs and NC4. [env: 0]")
    ] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Metrics of saved features: every collapse and geometry key of docs/metrics.md.

    Options left out take their value from the settings (COLLAPSE_* env vars, see
    docs/configuration.md); [env: N] shows the built-in default.
    """
    import torch

    from monitor.config import Settings
    from monitor.data.arrays import load_array
    from monitor.offline.analyze import analyze_arrays

    def opt(path: Path | None, what: str) -> torch.Tensor | None:
        return None if path is None else load_array(path, what)

    feats = load_array(features, "features")
    overrides: dict[str, Any] = {
        "min_count": min_count,
        "max_exact_classes": max_exact_classes,
        "pair_samples": pair_samples,
        "nc4_max_samples": nc4_max_samples,
        "device": device,
        "seed": seed,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    with progress_bar("accumulating", "samples") as bar:
        task = bar.add_task("accumulate", total=int(feats.shape[0]))
        report = analyze_arrays(
            feats,
            load_array(labels, "labels"),
            classifier=opt(classifier, "classifier"),
            bias=opt(bias, "bias"),
            eval_features=opt(eval_features, "eval_features"),
            eval_labels=opt(eval_labels, "eval_labels"),
            settings=settings,
            second_moment=second_moment,
            progress=lambda done, _total: bar.update(task, completed=done),
        )
    _print_report(report, output)


def _print_report(report: MetricReport, output: OutputFormat) -> None:
    values = report.as_dict()
    if output is OutputFormat.json:
        typer.echo(json.dumps(values))
        return
    table = Table(title=f"collapse metrics ({report.seconds:.2f} s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("stderr", justify="right")
    for key in COLLAPSE_KEYS + GEOMETRY_KEYS:
        value = values[key]
        err = values.get(f"{key}_stderr") if key in ESTIMATED_KEYS else None
        table.add_row(key, format_value(value, 6), "" if err is None else format_value(err, 6))
    Console().print(table)
