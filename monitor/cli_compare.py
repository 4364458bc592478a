"""The `compare` command: a collapse regression gate between two model versions.

Exit status: 0 when the candidate is within every tolerance, 3 (`ExitCode.REGRESSION`) when it
regressed, 2 on bad input (missing model or corpus, incomparable models, bad tolerance file).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from monitor.cli_common import (
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

EPILOG = (
    "Example: collapse-monitor compare --reference models/v1 --candidate models/v2 "
    "--corpus heldout.txt --format json"
)


def compare(
    candidate: Annotated[str, typer.Option(help="Candidate model: local directory or hub id.")],
    corpus: Annotated[Path, typer.Option(help="Held-out text, one document per line.")],
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
    output: FormatOption = OutputFormat.table,
) -> None:
    """Run one held-out corpus through two model versions and fail on a collapse regression.

    Prints every metric side by side with its relative change; exits 3 when the candidate moves
    beyond a tolerance in a metric's bad direction (CDNV and equiangularity std rising, NC4
    agreement and effective rank falling, MMD between the two above its maximum), 0 otherwise,
    2 on bad input. See docs/compare.md for the tolerance file and the JSON document.
    """
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


def _print_table(result: CompareResult) -> None:
    ref, cand = result.reference, result.candidate
    console = Console()
    table = Table(
        title=f"{cand.name} vs {ref.kind} {ref.name}: {result.corpus.positions} tokens "
        f"({result.seconds:.1f} s)"
    )
    for column, justify in (
        ("metric", "left"),
        ("reference", "right"),
        ("candidate", "right"),
        ("change", "right"),
        ("tolerance", "right"),
        ("status", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("metric", "status"))  # type: ignore[arg-type]
    for m in result.metrics:
        tol = "" if m.tolerance is None else f"{_sign(m.bad_direction)}{m.tolerance:.0%}"
        change = _change(m.relative_change, m.reference)
        table.add_row(
            m.key,
            format_value(m.reference),
            format_value(m.candidate),
            change,
            tol,
            _status(m.status.value),
        )
    for d in result.drift:
        limit = "" if d.max is None else f"<={d.max:.3g}"
        table.add_row(d.key, "", format_value(d.value), "", limit, _status(d.status.value))
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    verdict = f"REGRESSION: {', '.join(result.regressions)}" if result.regressions else "passed"
    console.print(verdict, markup=False, highlight=False, soft_wrap=True)


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
    return "" if status == "unchecked" else status


def register(app: typer.Typer) -> None:
    """Add the command to `app`."""
    app.command(epilog=EPILOG)(compare)
