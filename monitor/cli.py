"""The `collapse-monitor` command line.

Exit codes are `monitor.cli_common.ExitCode` (docs/cli.md): 0 success, 1 unexpected failure,
2 bad input or usage (one line on stderr, a traceback only with --debug), 3 regression
(`compare`), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.table import Table

from monitor import __version__
from monitor.cli_common import (
    ExitCode,
    FormatOption,
    OutputFormat,
    debug_mode,
    one_line_errors,
    print_error,
    progress_bar,
    stderr,
    tidy_help,
)
from monitor.lazy import missing_extra
from monitor.metrics import MetricReport
from monitor.metrics.report import COLLAPSE_KEYS, ESTIMATED_KEYS, GEOMETRY_KEYS, format_value

app = typer.Typer(
    name="collapse-monitor",
    help="Watch the neural-collapse geometry of LLM hidden states; export gauges and alerts.",
    epilog=(
        "Example: collapse-monitor analyze --features h.npy --labels y.npy --format json. "
        "Every command: collapse-monitor COMMAND --help; all of them: docs/cli.md."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"collapse-monitor {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """collapse-monitor: neural-collapse metrics of language-model hidden states."""
    debug_mode["on"] = debug


@app.command(
    epilog=(
        "Example: collapse-monitor analyze --features h.npy --labels y.npy "
        "--classifier W.npy --format json"
    )
)
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
    from monitor.offline.analyze import analyze_arrays
    from monitor.data.arrays import load_array

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


def _register_commands() -> None:
    from monitor import (
        cli_alerts,
        cli_api,
        cli_compare,
        cli_dashboards,
        cli_demo,
        cli_exporter,
        cli_pipeline,
        cli_report,
        cli_store,
        cli_study,
    )

    cli_demo.register(app)
    cli_pipeline.register(app)
    cli_api.register(app)
    cli_exporter.register(app)
    cli_alerts.register(app)
    cli_dashboards.register(app)
    cli_report.register(app)
    cli_compare.register(app)
    cli_study.register(app)
    cli_store.register(app)


_register_commands()


def _click_kind(exc: BaseException) -> str | None:
    """Which click error `exc` is, by class name: typer 0.2x vendors click as `typer._click`,
    so matching names (as typer itself does) works whichever copy raised it."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    kinds = ("NoArgsIsHelpError", "UsageError", "ClickException", "Abort")
    return next((kind for kind in kinds if kind in names), None)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: every error is one line on stderr (a traceback only with --debug).

    Typer runs in non-standalone mode so that its usage errors (a missing or invalid option)
    come here and get the same one-line form and exit code 2 as our own refusals of bad input.
    """
    try:
        with one_line_errors():
            command = tidy_help(typer.main.get_command(app))
            code = command(args=argv, prog_name="collapse-monitor", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "NoArgsIsHelpError":
            sys.exit(ExitCode.BAD_INPUT)  # typer has printed the help already
        if kind == "Abort":  # Ctrl-C or end of input at a prompt
            stderr.print("interrupted", markup=False)
            sys.exit(ExitCode.INTERRUPTED)
        if kind is not None:  # a missing or invalid option, a file option that does not exist
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if kind == "UsageError" and ctx else ""
            print_error(f"{exc.format_message()}{hint}")  # type: ignore[attr-defined]
            sys.exit(ExitCode.BAD_INPUT)
        if debug_mode["on"]:
            traceback.print_exc(file=sys.stderr)
        extra = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
        print_error(extra or f"{type(exc).__name__}: {exc}")
        sys.exit(ExitCode.FAILURE)
    if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130)
        stderr.print("interrupted", markup=False)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
