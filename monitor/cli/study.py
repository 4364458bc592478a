"""The `study` command: collapse metrics and validation loss across checkpoints, correlated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from monitor.cli.common import FormatOption, OutputFormat, progress_bar

if TYPE_CHECKING:  # numpy loads when the command runs: --help stays fast
    from monitor.offline.correlation import Correlation, Interval

# A few metrics for the per-checkpoint table; every key is in the CSV and JSON.
_TABLE_KEYS = ("nc1_cdnv2", "nc1_cdnv", "nc4_ncc_agreement", "nc2_equiangularity_std")
# The per-layer tables (--layers): head-free keys only.
_LAYER_KEYS = ("nc1_cdnv2", "nc2_equiangularity_std", "anisotropy_mean_cos", "effective_rank")


def _fmt(value: float | int | None, spec: str = ".4g") -> str:
    return "null" if value is None else format(value, spec)


def _print_tables(doc: dict[str, object], correlations: list[Correlation]) -> None:
    console = Console()
    rows = doc["checkpoints"]
    assert isinstance(rows, list)
    table = Table(title="checkpoints (metrics on the train corpus, loss on the validation one)")
    for col in ("checkpoint", "params", "val loss", *_TABLE_KEYS):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['parameters']:,}",
            f"{row['val_loss']:.4f}",
            *(_fmt(row["metrics"][k]) for k in _TABLE_KEYS),
        )
    console.print(table)
    level = doc["bootstrap"]["level"]  # type: ignore[index]
    corr = Table(
        title=f"correlation with validation loss ([..]: {level:.0%} bootstrap over runs; "
        f"partial: controlling for {', '.join(doc['controls']) or 'nothing'})"  # type: ignore[arg-type]
    )
    columns = ("metric", "n", "runs", "scale", "Pearson r", "Spearman rho", "partial r",
               "partial rho", "as paper")  # fmt: skip
    for col in columns:
        corr.add_column(col, justify="left" if col in ("metric", "scale") else "right")
    for c in correlations:
        agrees = {True: "yes", False: "no", None: "-"}[c.agrees]
        corr.add_row(
            c.metric,
            str(c.n),
            _fmt(c.runs, "d"),
            c.scale,
            _with_ci(c.pearson_r, c.pearson_ci),
            _with_ci(c.spearman_rho, c.spearman_ci),
            _with_ci(c.partial_r, c.partial_r_ci),
            _with_ci(c.partial_rho, c.partial_rho_ci),
            agrees,
        )
    console.print(corr)
    if "layer_correlations" in doc:
        _print_layers(console, doc)


def _layer_state(layer: dict[str, object], last: int) -> str:
    """The head's input, the embeddings, or a block's output (the last one may precede a norm)."""
    if layer["head_input"]:
        return "head input"
    if layer["layer"] == 0:
        return "embeddings"
    return "block (not head input)" if layer["layer"] == last else "block"


def _print_layers(console: Console, doc: dict[str, object]) -> None:
    """Per checkpoint and hidden state a few head-free metrics; per layer Spearman with loss."""
    table = Table(title="per layer (train corpus; layer 0: embeddings, l: after block l)")
    for col in ("checkpoint", "layer", "state", *_LAYER_KEYS):
        table.add_column(col, justify="left" if col in ("checkpoint", "state") else "right")
    for row in doc["checkpoints"]:  # type: ignore[attr-defined]
        layers = row.get("layers") or []
        for layer in layers:
            table.add_row(
                row["name"],
                str(layer["layer"]),
                _layer_state(layer, len(layers) - 1),
                *(_fmt(layer["metrics"].get(k, layer["derived"].get(k))) for k in _LAYER_KEYS),
            )
    console.print(table)
    rho = Table(title="per layer: Spearman rho with validation loss (n checkpoints; no intervals)")
    for col in ("layer", "n", *_LAYER_KEYS):
        rho.add_column(col, justify="right")
    by_layer: dict[int, dict[str, dict[str, object]]] = {}
    for item in doc["layer_correlations"]:  # type: ignore[attr-defined]
        by_layer.setdefault(item["layer"], {})[item["metric"]] = item
    for layer, items in sorted(by_layer.items()):
        first = items[_LAYER_KEYS[0]]
        cells = [_with_ci(items[k]["spearman_rho"], None) for k in _LAYER_KEYS]  # type: ignore[arg-type]
        rho.add_row(str(layer), str(first["n"]), *cells)
    console.print(rho)


def _with_ci(value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "null"
    return f"{value:+.2f}" + ("" if ci is None else f" [{ci.low:+.2f}, {ci.high:+.2f}]")


def register(app: typer.Typer) -> None:
    """Add the command to `app`."""

    @app.command(
        epilog=(
            "Example: collapse-monitor study --checkpoints runs/ --corpus train.txt "
            "--eval-corpus val.txt --out study/"
        )
    )
    def study(
        checkpoints: Annotated[
            list[Path],
            typer.Option(
                help="A checkpoint directory (config.json inside) or a folder of them; repeat."
            ),
        ],
        corpus: Annotated[
            Path, typer.Option(help="Train corpus (metrics): UTF-8, one document per line.")
        ],
        eval_corpus: Annotated[
            Path, typer.Option(help="Validation corpus (loss and NC4), same format.")
        ],
        out: Annotated[
            Path, typer.Option(file_okay=False, help="Folder for study.csv, study.json, *.png.")
        ],
        max_tokens: Annotated[
            int, typer.Option(min=2, help="Train-corpus positions measured per checkpoint.")
        ] = 131_072,
        max_eval_tokens: Annotated[
            int, typer.Option(min=2, help="Validation positions per checkpoint.")
        ] = 32_768,
        context: Annotated[
            int, typer.Option(min=2, help="Longest window (capped by the model's context).")
        ] = 256,
        batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 16,
        meta: Annotated[
            Path | None,
            typer.Option(
                dir_okay=False,
                help="CSV checkpoint,run,tokens_seen: the run each checkpoint is a snapshot of "
                "(the bootstrap resamples runs) and its training tokens (a partial-correlation "
                "control). Default: each checkpoint its own run, tokens unknown.",
            ),
        ] = None,
        resamples: Annotated[
            int, typer.Option(min=0, help="Bootstrap resamples (0: no intervals).")
        ] = 2000,
        bootstrap_seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws.")] = 0,
        plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
        layers: Annotated[
            bool,
            typer.Option(
                help="Also the head-free metrics of every hidden state (layer 0: embeddings, "
                "l: after block l), one more forward pass; layers.csv, layer_correlations.csv."
            ),
        ] = False,
        device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]. [env: auto]")] = (
            None
        ),
        output: FormatOption = OutputFormat.table,
    ) -> None:
        """Per checkpoint: every metric on the train corpus, NC4 and loss on the validation one.

        Then each metric's correlation with validation loss across the checkpoints (Pearson on
        log10 of the metric where it spans more than a decade, Spearman, R^2), as Wu & Papyan
        do across their TinyStories models, with 95% bootstrap intervals that resample whole
        runs (--meta), and partial correlations controlling for log10 parameters and log10
        tokens seen (residuals of least squares on [1, controls]; on ranks for partial rho).
        Besides the METRICS.md keys: class_mean_sq_norm (mean ||mu_c - mu_G||^2) and
        nc1_cdnv2_scale_free (nc1_cdnv2 times it). Metric options come from the settings.

        study.json (schema_version 2): options; bootstrap {cluster, runs, resamples, level,
        seed}; controls; checkpoints [{name, path, parameters, n_embd, n_layer, train_tokens,
        eval_tokens, val_loss, metrics, run, tokens_seen, derived}]; correlations [{metric, n,
        runs, scale, pearson_r, pearson_ci, r2, spearman_rho, spearman_ci, partial_r,
        partial_r_ci, partial_rho, partial_rho_ci, expected_sign, agrees}], each *_ci
        [low, high] or null. study.csv, correlations.csv: the same as tables. With --layers
        (options.layers true) each checkpoint also has layers [{layer, head_input, metrics,
        derived}] (no NC3/NC4: they need the head) and the document layer_correlations
        [{layer, ...correlations' fields}] (intervals and partials null); without it both are
        absent.
        """
        from transformers.utils import logging as hf_logging

        from monitor.config import Settings
        from monitor.data.output import check_output_path
        from monitor.offline.study import StudyOptions, run_study
        from monitor.offline.study_output import write_study
        from monitor.offline.study_plots import write_plots

        check_output_path(out, directory=True)  # a link at --out: refused before measuring
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # per-checkpoint "Loading weights" bars drown ours
        settings = Settings() if device is None else Settings(device=device)
        options = StudyOptions(
            max_tokens=max_tokens,
            max_eval_tokens=max_eval_tokens,
            context=context,
            batch_size=batch_size,
            resamples=resamples,
            seed=bootstrap_seed,
            layers=layers,
        )
        with progress_bar("checkpoints", "{task.fields[name]}") as bar:
            task = bar.add_task("study", total=None, name="")

            def step(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, name=name)

            result = run_study(checkpoints, corpus, eval_corpus, options, settings, step, meta)
        write_study(result, out)
        if plots:
            write_plots(result, out)
        doc = result.to_json()
        if output is OutputFormat.json:
            typer.echo(json.dumps(doc))
        else:
            _print_tables(doc, result.correlations)
