"""The `compare` command: a collapse regression gate between two model versions, offline (one
corpus through both) or live (`--live`: two served variants' latest snapshots in Redis).

Exit status: 0 when the candidate is within every tolerance, 3 (`ExitCode.REGRESSION`) when it
regressed, 2 on bad input (missing model or corpus, incomparable models, bad tolerance file;
live: an undeclared model, no fresh snapshot, an unconfigured window).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from monitor.cli.common import (
    ExitCode,
    FormatOption,
    OutputFormat,
    one_line_errors,
    progress_bar,
)
from monitor.errors import InvalidInput
from monitor.metrics.report import format_value

if TYPE_CHECKING:
    from monitor.offline.compare import CompareOptions, CompareResult
    from monitor.offline.compare_live import LiveCompareResult
    from monitor.offline.live_verdict import LiveMetric

EPILOG = (
    "Example: collapse-monitor compare --reference models/v1 --candidate models/v2 "
    "--corpus heldout.txt --format json ; collapse-monitor compare --live "
    "--reference-model stable --candidate-model canary --window 1h"
)


def compare(
    ctx: typer.Context,
    candidate: Annotated[
        str | None, typer.Option(help="Candidate model: local directory or hub id.")
    ] = None,
    corpus: Annotated[
        Path | None, typer.Option(help="Held-out text, one document per line.")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Reference model: local directory or hub id.")
    ] = None,
    reference_baseline: Annotated[
        str | None,
        typer.Option(help="Compare against this baseline pinned in Redis (needs --model)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Declared model whose baseline --reference-baseline names.")
    ] = None,
    tolerances: Annotated[
        Path | None, typer.Option(help="YAML or JSON: metric key -> tolerance (docs/compare.md).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(min=2, help="Labelled positions (samples) per model, at most.")
    ] = 50_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 8,
    second_moment: Annotated[
        bool, typer.Option(help="Keep the d x d second moment (effective rank, trace ratio).")
    ] = True,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]. [env: auto]")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of NC4 positions and sampled pairs. [env: 0]")
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live", help="Compare two served models' latest snapshots in Redis (no corpus)."
        ),
    ] = False,
    reference_model: Annotated[
        str | None, typer.Option(help="--live: the declared model compared against (stable).")
    ] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="--live: the declared model judged (canary).")
    ] = None,
    window: Annotated[str, typer.Option(help="--live: rolling window, as in COLLAPSE_WINDOWS.")] = (
        "1h"
    ),
    z: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="--live: interval half-width in standard errors; 0 = no "
            "significance needed (default 1.96).",
        ),
    ] = None,
    confidence: Annotated[
        float | None, typer.Option(help="--live: interval coverage instead of --z, e.g. 0.95.")
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="--live: oldest snapshot accepted, in seconds (default: 3 evaluation intervals).",
        ),
    ] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Fail on a collapse regression of a candidate model against a reference.

    Offline (--reference or --reference-baseline, --candidate, --corpus): runs one held-out
    corpus through both and prints every metric side by side with its relative change. Live
    (--live --reference-model --candidate-model): compares two served variants' latest window
    snapshots with the difference and its confidence interval per metric. Exits 3 when the
    candidate moves beyond a tolerance in a metric's bad direction (CDNV and equiangularity std
    rising, NC4 agreement and effective rank falling; offline also MMD above its maximum; live
    only where the interval excludes zero), 0 otherwise, 2 on bad input. See docs/compare.md.
    """
    with one_line_errors():
        _check_mode(ctx, live)
    if live:
        with one_line_errors():
            live_result = _run_live(
                reference_model, candidate_model, window, tolerances, z, confidence, max_age
            )
        if output is OutputFormat.json:
            typer.echo(live_result.to_json())
        else:
            _print_live_table(live_result)
        if live_result.exit_code is not ExitCode.OK:
            raise typer.Exit(int(live_result.exit_code))
        return
    from transformers.utils import logging as hf_logging

    from monitor.config import Settings
    from monitor.offline.compare import CompareOptions

    # Our own bar shows the work; transformers' loading bars would interleave with it.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with one_line_errors():
        if (reference is None) == (reference_baseline is None):
            raise InvalidInput(
                "invalid_option", "give exactly one of --reference, --reference-baseline"
            )
        if (reference_baseline is None) != (model is None):
            raise InvalidInput("invalid_option", "--reference-baseline and --model go together")
        if candidate is None or corpus is None:
            raise InvalidInput(
                "invalid_option", "give --candidate and --corpus (or --live to compare live models)"
            )
        overrides: dict[str, Any] = {"device": device, "seed": seed}
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        options = CompareOptions(max_tokens, batch_size, second_moment, settings)
        result = _run(reference, reference_baseline, model, candidate, corpus, tolerances, options)
    if output is OutputFormat.json:
        typer.echo(result.to_json())
    else:
        _print_table(result)
    if result.exit_code is not ExitCode.OK:
        raise typer.Exit(int(result.exit_code))


# Options of one mode only: giving one in the other mode is refused, naming it.
OFFLINE_ONLY = (
    "candidate", "corpus", "reference", "reference_baseline", "model", "max_tokens",
    "batch_size", "second_moment", "device", "seed",
)  # fmt: skip
LIVE_ONLY = ("reference_model", "candidate_model", "window", "z", "confidence", "max_age")


def _given(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` set on the command line (not left at their defaults)."""
    found = []
    for param in ctx.command.params:
        if param.name in names:
            source = ctx.get_parameter_source(param.name)
            # By name: typer 0.2x vendors its own click, whose enum is not click's.
            if source is not None and source.name != "DEFAULT":
                found.append(param.opts[0])
    return found


def _check_mode(ctx: typer.Context, live: bool) -> None:
    """One mode per run: options of the other mode are an error, not silently ignored."""
    wrong = _given(ctx, OFFLINE_ONLY if live else LIVE_ONLY)
    if wrong and live:
        raise InvalidInput(
            "invalid_option", f"{', '.join(wrong)}: not used with --live (it reads no corpus)"
        )
    if wrong:
        raise InvalidInput("invalid_option", f"{', '.join(wrong)}: only with --live")


def _run_live(
    reference: str | None,
    candidate: str | None,
    window: str,
    tolerances: Path | None,
    z: float | None,
    confidence: float | None,
    max_age: float | None,
) -> LiveCompareResult:
    """The live comparison, from the store of the COLLAPSE_* settings."""
    from monitor.cli.pipeline import _runtime
    from monitor.offline.compare_live import compare_live
    from monitor.offline.live_verdict import DEFAULT_Z, z_for
    from monitor.offline.tolerances import load_live_tolerances

    if reference is None or candidate is None:
        raise InvalidInput("invalid_option", "--live needs --reference-model and --candidate-model")
    if z is not None and confidence is not None:
        raise InvalidInput("invalid_option", "give --z or --confidence, not both")
    tol = load_live_tolerances(tolerances)
    width = z_for(confidence) if confidence is not None else DEFAULT_Z if z is None else z
    return compare_live(_runtime(), reference, candidate, window, tol, width, max_age=max_age)


def _run(
    reference: str | None,
    baseline: str | None,
    model: str | None,
    candidate: str,
    corpus: Path,
    tolerances: Path | None,
    options: CompareOptions,
) -> CompareResult:
    """The comparison, under a progress bar on stderr (off when stderr is not a terminal)."""
    from monitor.offline.compare import compare_models
    from monitor.offline.compare_baseline import compare_with_baseline
    from monitor.offline.tolerances import load_tolerances

    tol = load_tolerances(tolerances)
    with progress_bar("{task.description}", "tokens") as bar:
        tasks: dict[str, TaskID] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        if reference is not None:
            return compare_models(reference, candidate, corpus, tol, options, progress)
        assert baseline is not None
        assert model is not None
        return compare_with_baseline(model, baseline, candidate, corpus, tol, options, progress)


Row = tuple[str, ...]


def _render(
    title: str, columns: list[tuple[str, str]], rows: list[Row], notes: list[str], failed: list[str]
) -> None:
    """The table both modes print: one row per metric, then the notes and the verdict line."""
    console = Console()
    table = Table(title=title)
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=column in ("metric", "status"))  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    verdict = f"REGRESSION: {', '.join(failed)}" if failed else "passed"
    console.print(verdict, markup=False, highlight=False, soft_wrap=True)


def _tolerance(tolerance: float | None, direction: str | None) -> str:
    return "" if tolerance is None else f"{_sign(direction)}{tolerance:.0%}"


def _print_table(result: CompareResult) -> None:
    ref, cand = result.reference, result.candidate
    columns = [("metric", "left"), ("reference", "right"), ("candidate", "right"),
               ("change", "right"), ("tolerance", "right"), ("status", "left")]  # fmt: skip
    rows: list[Row] = [
        (
            m.key,
            format_value(m.reference),
            format_value(m.candidate),
            _change(m.relative_change, m.reference),
            _tolerance(m.tolerance, m.bad_direction),
            _status(m.status.value),
        )
        for m in result.metrics
    ]
    for d in result.drift:
        limit = "" if d.max is None else f"<={d.max:.3g}"
        rows.append((d.key, "", format_value(d.value), "", limit, _status(d.status.value)))
    title = (
        f"{cand.name} vs {ref.kind} {ref.name}: {result.corpus.positions} tokens "
        f"({result.seconds:.1f} s)"
    )
    _render(title, columns, rows, result.notes, result.regressions)


def _interval(m: LiveMetric, z: float) -> str:
    """`[+0.005, +0.019]`, or `no interval` where a side has no traffic standard error; with
    `--z 0` (no interval asked for) the difference's standard error."""
    if m.difference is None:
        return ""
    if m.interval is None:
        return "no interval"
    if z == 0:
        return f"{m.interval.stderr:.4g}"
    return f"[{m.interval.low:+.4g}, {m.interval.high:+.4g}]"


def _print_live_table(result: LiveCompareResult) -> None:
    ref, cand = result.reference, result.candidate
    ci = f"{100 * result.confidence:.4g}% CI" if result.z > 0 else "stderr (--z 0)"
    columns = [("metric", "left"), ("reference", "right"), ("candidate", "right"),
               ("change", "right"), ("difference", "right"), (ci, "right"),
               ("tolerance", "right"), ("status", "left")]  # fmt: skip
    rows: list[Row] = [
        (
            m.key,
            format_value(m.reference),
            format_value(m.candidate),
            _change(m.relative_change, m.reference),
            "" if m.difference is None else f"{m.difference:+.4g}",
            _interval(m, result.z),
            _tolerance(m.tolerance, m.bad_direction),
            _status(m.status.value),
        )
        for m in result.metrics
    ]
    # Drift keys exist only against a pinned baseline: rows where neither model has one go.
    rows += [
        (d.key, format_value(d.reference, missing=""), format_value(d.candidate, missing=""),
         "", "", "", "", _status(d.status.value))
        for d in result.drift
        if d.reference is not None or d.candidate is not None
    ]  # fmt: skip
    title = (
        f"{cand.name} ({cand.sample_count} samples) vs {ref.name} ({ref.sample_count} samples), "
        f"window {result.window}"
    )
    _render(title, columns, rows, result.notes, result.regressions)


def _change(relative: float | None, reference: float | int | None) -> str:
    """+29.6% for moderate changes, a factor (110x) once percentages get unreadable; the factor
    only for a positive reference, where 1 + change is candidate / reference."""
    if relative is None:
        return ""
    if abs(relative) < 10 or reference is None or reference <= 0:
        return f"{relative:+.1%}"
    return f"{1 + relative:.3g}x"


def _sign(direction: str | None) -> str:
    return {"increase": "+", "decrease": "-"}.get(direction or "", "")


def _status(status: str) -> str:
    """Blank for metrics without a tolerance, so the checked ones stand out."""
    if status == "regressed":
        return "[bold red]regressed[/]"
    return "" if status == "unchecked" else status.replace("_", " ")


def register(app: typer.Typer) -> None:
    """Add the command to `app`."""
    app.command(epilog=EPILOG)(compare)
