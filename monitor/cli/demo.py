"""The `demo` command: the whole monitor in one process on a live tiny model (`make demo`)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from monitor.cli.common import ExitCode, one_line_errors, stderr

if TYPE_CHECKING:
    from monitor.demo import DemoResult
    from monitor.demo.view import DemoView

DEMO_MIN_DURATION = 40.0  # monitor.demo.state.MIN_DURATION (not imported: keeps --help fast)


def register(app: typer.Typer) -> None:
    """Add the command to `app`."""

    @app.command(
        "demo",
        epilog="Example: collapse-monitor demo --duration 120 --port 0 --out demo-report",
    )
    def demo(
        duration: Annotated[
            float,
            typer.Option(min=DEMO_MIN_DURATION, help="Seconds the scenario runs (phases scale)."),
        ] = 120.0,
        model: Annotated[
            Path | None,
            typer.Option(
                exists=True,
                file_okay=False,
                dir_okay=True,
                help="A local causal LM directory (from_pretrained); default: the bundled tiny "
                "model, built once on first use (about 4 minutes of CPU), then cached.",
            ),
        ] = None,
        inject: Annotated[
            bool,
            typer.Option(
                "--inject/--no-inject", help="Inject a collapse mid-run, then recover from it."
            ),
        ] = True,
        port: Annotated[
            int, typer.Option(min=0, max=65535, help="/metrics port on 127.0.0.1 (0 = any free).")
        ] = 9464,
        out: Annotated[
            Path, typer.Option(file_okay=False, help="Directory of the PNG and HTML report.")
        ] = Path("demo-report"),
        plain: Annotated[
            bool, typer.Option("--plain", help="A plain line log even on a terminal.")
        ] = False,
        seed: Annotated[int, typer.Option(help="Seed of traffic, sampling and injection.")] = 0,
    ) -> None:
        """Watch a live model collapse and recover: capture, statistics, evaluation, alerts.

        One process, no external service: loads the tiny model, generates traffic from the
        bundled held-out corpus with the probe attached, pins a baseline after a warm-up,
        injects a collapse (the final norm squeezed onto a few directions), shows the metrics
        moving and an alert firing, restores the model and shows the alert resolving. Serves
        /metrics on loopback while it runs and ends by writing a PNG and HTML report.
        Ctrl-C or SIGTERM stops cleanly (the report is still written; exit 130).
        """

        from rich.console import Console

        from monitor.demo.view import LiveView, PlainLog

        console = Console()
        view: DemoView = LiveView(console) if console.is_terminal and not plain else PlainLog()
        try:
            with one_line_errors():
                result = _run(duration, model, inject, port, out, seed, view)
        except KeyboardInterrupt:  # before the scenario started (building, loading the model)
            raise typer.Exit(ExitCode.INTERRUPTED) from None  # main() says "interrupted"
        finally:
            view.close()
        if result.interrupted:
            raise typer.Exit(ExitCode.INTERRUPTED)
        if inject and not result.fired:
            stderr.print("note: the injected collapse raised no alert in this run", markup=False)


def _run(
    duration: float,
    model: Path | None,
    inject: bool,
    port: int,
    out: Path,
    seed: int,
    view: DemoView,
) -> DemoResult:
    import torch

    from monitor.data.output import check_output_path
    from monitor.demo import Demo, DemoOptions
    from monitor.demo.http import check_port
    from monitor.errors import InvalidInput

    if model is not None and not (model / "config.json").is_file():
        raise InvalidInput(
            "model_not_found", f"{model} has no config.json: not a from_pretrained directory"
        )
    check_port(port)
    check_output_path(out, directory=True)  # a link at --out: refused before the model loads
    _quiet_transformers()
    # A first-run build trains with every core (it is bounded by time, so fewer threads would
    # give a less trained model); the demo itself then runs on one intra-op thread, sized for
    # 2 cores: traffic and evaluator share the machine, and tiny matrices gain nothing more.
    checkpoint = model if model is not None else _bundled_model(view)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # restored: a caller in the same process (tests, notebooks) keeps its own setting
        view.event(0.0, f"loading {checkpoint}")
        options = DemoOptions(duration=duration, inject=inject, port=port, out=out, seed=seed)
        with _sigterm_as_interrupt():
            return Demo(options, checkpoint, view).run()
    finally:
        torch.set_num_threads(threads)


def _bundled_model(view: DemoView) -> Path:
    """The cached tiny model, built first (and said so) when this machine has none yet."""
    from monitor.capture.tinymodel import (
        DEFAULT_SPEC,
        build_info,
        default_cache_root,
        ensure_tiny_model,
    )

    root = default_cache_root()
    target = root / f"tiny-gpt2-{DEFAULT_SPEC.fingerprint()}"
    if (build_info(target) or {}).get("fingerprint") != DEFAULT_SPEC.fingerprint():
        view.event(
            0.0,
            f"building the bundled tiny model once (about {DEFAULT_SPEC.max_seconds / 60:.0f} "
            f"minutes of CPU); it is cached in {root} for every later run",
        )
    return ensure_tiny_model(root, progress=lambda msg: view.event(0.0, f"build: {msg}"))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`timeout`, `docker stop`) ends the demo as Ctrl-C does: report written, exit 130.

    The previous handler comes back afterwards, so the process is not left converting signals.
    """

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_transformers() -> None:
    """No weight-loading progress bars or generation advice in the middle of the demo."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    hf_logging: Any = logging  # untyped module
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
