"""Pipeline commands: worker, beat, status, replay, evaluate and baseline pin|list|unpin.

All of them talk to Redis (COLLAPSE_REDIS_URL); in embedded mode they refuse with one line and
exit code 2, since a separate process would see none of the embedded process's state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from monitor.cli.common import FormatOption, OutputFormat, progress_bar, with_iso_time
from monitor.data.files import read_lines
from monitor.errors import InvalidInput

if TYPE_CHECKING:  # settings and the runtime load when a command runs: --help stays fast
    import torch

    from monitor.config import Settings
    from monitor.pipeline.runtime import Runtime

baseline_app = typer.Typer(
    help="Pin, list and unpin baselines (the reference that drift is measured against).",
    epilog="Example: collapse-monitor baseline pin --model gpt2-prod --name launch --window 24h",
    no_args_is_help=True,
)
# An input file must exist and be a file: typer refuses otherwise, in one line with exit code 2.
_FILE: dict[str, Any] = {"exists": True, "dir_okay": False, "readable": True}
HeartbeatOption = Annotated[
    Path | None,
    typer.Option(
        help="Touch this file every 10 s while the process's own loop runs, for a liveness "
        "probe that checks its age (the chart's does); off by default.",
        dir_okay=False,
    ),
]


def _service_settings() -> Settings:
    from monitor.config import Settings

    settings = Settings()
    if settings.embedded:
        raise InvalidInput(
            "no_redis", "this command needs COLLAPSE_REDIS_URL (embedded mode keeps no state)"
        )
    return settings


def _runtime() -> Runtime:
    from monitor.pipeline.runtime import Runtime

    return Runtime(_service_settings())


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = (
        "ingest,maintenance"
    ),
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads (solo for a GPU).")] = (
        "prefork"
    ),
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    heartbeat_file: HeartbeatOption = None,
) -> None:
    """Run a Celery worker: `ingest` (statistics of feature batches), `embed` (forward pass of
    mirrored texts, one per GPU with --pool solo) and `maintenance` (compaction, evaluation).
    """
    settings = _service_settings()
    # Read by celery.apps.worker at import: SIGTERM starts the soft shutdown (see
    # worker_shutdown_timeout) instead of an unbounded warm one.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from monitor.pipeline.queues import QUEUES
    from monitor.worker.app import worker_app

    app = worker_app()

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - set(QUEUES))
    if unknown or not wanted:
        raise InvalidInput("invalid_option", f"unknown queues {unknown}; choose from {QUEUES}")
    if heartbeat_file is not None:
        from monitor.worker.heartbeat import Heartbeat, worker_step

        heartbeat = Heartbeat(heartbeat_file, max_task_seconds=settings.task_visibility_timeout)
        heartbeat.reset()
        app.steps["worker"].add(worker_step(heartbeat, inline_tasks=pool == "solo"))
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(wanted)}",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    heartbeat_file: HeartbeatOption = None,
) -> None:
    """Run the scheduler of compaction and evaluation (exactly one per deployment).

    Its schedule lives in memory: the tasks are idempotent intervals, so nothing needs to
    persist across restarts (and Celery's default shelve file would be pickle at rest).
    """
    _service_settings()
    from monitor.worker.app import worker_app
    from monitor.worker.heartbeat import Heartbeat, HeartbeatScheduler

    app = worker_app()

    if heartbeat_file is not None:
        HeartbeatScheduler.heartbeat = Heartbeat(heartbeat_file)
        HeartbeatScheduler.heartbeat.reset()
    scheduler = f"{HeartbeatScheduler.__module__}:{HeartbeatScheduler.__name__}"
    app.start(["beat", f"--scheduler={scheduler}", f"--loglevel={loglevel}"])


def status(
    model: Annotated[str | None, typer.Option(help="One model (default: all).")] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Windows, counts, pending partials, compaction lag and memory per model."""
    from monitor.pipeline.status import model_status, status_document

    runtime = _runtime()
    known = sorted(set(runtime.store.models()) | set(runtime.registry.names))
    if model is not None and model not in known:
        raise InvalidInput(
            "unknown_model",
            f"model {model!r} is neither declared (COLLAPSE_MODELS) nor in the store; "
            f"known: {known}",
        )
    names = [model] if model else known
    statuses = [model_status(runtime.store, runtime.settings, name) for name in names]
    if output is OutputFormat.json:
        typer.echo(json.dumps(status_document(statuses)))
        return
    for s in statuses:
        lag = "-" if s.compaction_lag_seconds is None else f"{s.compaction_lag_seconds:.0f}s"
        table = Table(
            title=f"{s.model}: {s.pending_partials} pending, lag {lag}, "
            f"{s.memory_bytes / 2**20:.1f} MiB, baselines {', '.join(s.baselines) or '-'}"
        )
        for column in ("window", "mode", "samples", "classes", "buckets"):
            table.add_column(column, justify="right")
        for w in s.windows:
            row = (w.window, w.mode, str(w.sample_count), str(w.class_count), str(w.buckets))
            table.add_row(*row)
        Console().print(table)
        counters = ", ".join(f"{k}={v}" for k, v in sorted(s.counters.items())) or "none"
        typer.echo(f"counters: {counters}")


def replay(
    model: Annotated[str, typer.Option(help="Declared model name.")],
    features: Annotated[
        Path | None, typer.Option(help="(N, d) features, .npy or .safetensors.", **_FILE)
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="(N,) next-token labels.", **_FILE)] = None,
    corpus: Annotated[
        Path | None, typer.Option(help="UTF-8 text file, one document per line.", **_FILE)
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows (or lines) per task.")] = 4096,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Feed saved features or a text corpus into the running pipeline (queued, not waited for).

    Texts go to the `embed` queue, so a GPU (or CPU) embed worker must be running.
    """
    from monitor.data.arrays import load_array
    from monitor.pipeline.client import MonitorClient

    settings = _service_settings()
    client = MonitorClient(settings)
    if (features is None) == (corpus is None) or (features is not None) != (labels is not None):
        raise InvalidInput("invalid_option", "give --features with --labels, or --corpus")
    what = "samples" if features is not None else "texts"
    with progress_bar("replay", what) as bar:
        if features is not None and labels is not None:
            x, y = load_array(features, "features"), load_array(labels, "labels")
            if x.shape[0] != y.shape[0]:
                raise InvalidInput("length_mismatch", "features and labels differ in length")
            task = bar.add_task("replay", total=int(x.shape[0]))
            for start in range(0, int(x.shape[0]), batch_size):
                client.submit_features(
                    model, x[start : start + batch_size], y[start : start + batch_size]
                )
                bar.update(task, completed=min(start + batch_size, int(x.shape[0])))
            sent = int(x.shape[0])
        else:
            assert corpus is not None
            lines = read_lines(corpus)
            task = bar.add_task("replay", total=len(lines))
            for start in range(0, len(lines), batch_size):
                client.submit_texts(model, lines[start : start + batch_size])
                bar.update(task, completed=min(start + batch_size, len(lines)))
            sent = len(lines)
    if output is OutputFormat.json:
        typer.echo(json.dumps({"model": model, "queued": sent, "kind": what}))
    else:
        typer.echo(f"queued {sent} {what} for {model}")


@baseline_app.command(
    "pin",
    epilog="Example: collapse-monitor baseline pin --model gpt2-prod --name launch "
    "--corpus val.txt",
)
def baseline_pin(
    model: Annotated[str, typer.Option(help="Declared model name.")],
    name: Annotated[str, typer.Option(help="Baseline name.")] = "default",
    window: Annotated[str | None, typer.Option(help="Pin this rolling window, e.g. 1h.")] = None,
    features: Annotated[
        Path | None, typer.Option(help="Pin saved features instead.", **_FILE)
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels of --features.", **_FILE)] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Pin a corpus run: one text per line, through the model.", **_FILE),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Overwrite a baseline of that name.")] = False,
    output: Annotated[
        OutputFormat,
        typer.Option("--format", help="json (the default: the baseline's stamp) or table."),
    ] = OutputFormat.json,
) -> None:
    """Freeze a window's, saved features' or a corpus run's statistics as a baseline.

    Prints the baseline's stamp (source, counts, dimension, creation time).
    """
    from monitor.data.arrays import load_array
    from monitor.pipeline.baselines import pin_batches, pin_window

    runtime = _runtime()
    runtime.registry.spec(model)
    if sum(x is not None for x in (window, features, corpus)) != 1:
        raise InvalidInput("invalid_option", "give one of --window, --features/--labels, --corpus")
    if corpus is not None:
        from monitor.capture.mirror import embed_batches
        from monitor.pipeline.embed import loaded_model

        lines = read_lines(corpus)
        lm, tokenizer = loaded_model(runtime, model)
        with progress_bar("embedding", "texts") as bar:
            task = bar.add_task("embed", total=len(lines))

            def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for i, b in enumerate(embed_batches(lm, tokenizer, lines, batch_size=8)):
                    yield b.features, b.labels
                    bar.update(task, completed=min(8 * (i + 1), len(lines)))

            meta = pin_batches(
                runtime.store,
                runtime.registry,
                model,
                name,
                batches(),
                source=f"corpus:{corpus.name}",
                replace=replace,
            )
    elif window is not None:
        seconds = runtime.settings.windows.get(window)
        if seconds is None:
            raise InvalidInput(
                "invalid_option", f"unknown window {window!r}: {list(runtime.settings.windows)}"
            )
        meta = pin_window(
            runtime.store, runtime.registry, model, name, window, seconds, replace=replace
        )
    else:
        if features is None or labels is None:
            raise InvalidInput("invalid_option", "--features needs --labels")
        x, y = load_array(features, "features"), load_array(labels, "labels")
        if x.ndim != 2 or y.shape[0] != x.shape[0]:
            raise InvalidInput("length_mismatch", "features must be (N, d) with N labels")
        step = max(1, -(-int(x.shape[0]) // 16))
        meta = pin_batches(
            runtime.store,
            runtime.registry,
            model,
            name,
            ((x[i : i + step], y[i : i + step]) for i in range(0, int(x.shape[0]), step)),
            source=f"features:{features.name}",
            replace=replace,
        )
    stamp = with_iso_time({"model": model, "baseline": name, **meta})
    if output is OutputFormat.json:
        typer.echo(json.dumps(stamp))
        return
    table = Table(title=f"baseline {name} of {model}")
    table.add_column("field")
    table.add_column("value")
    for key, value in stamp.items():
        table.add_row(key, str(value))
    Console().print(table)


@baseline_app.command(
    "list", epilog="Example: collapse-monitor baseline list --model gpt2-prod --format json"
)
def baseline_list(
    model: Annotated[str, typer.Option(help="Declared model name.")],
    output: FormatOption = OutputFormat.table,
) -> None:
    """Baselines pinned for a model, with their stamps."""
    runtime = _runtime()
    found = {name: with_iso_time(meta) for name, meta in runtime.store.baselines(model).items()}
    if output is OutputFormat.json:
        typer.echo(json.dumps(found))
        return
    table = Table(title=f"baselines of {model}")
    for column in ("name", "source", "samples", "classes", "dim", "created (UTC)"):
        table.add_column(column)
    for name, meta in found.items():
        table.add_row(
            name,
            str(meta.get("source")),
            str(meta.get("sample_count")),
            str(meta.get("class_count")),
            str(meta.get("dim")),
            str(meta.get("created_iso", meta.get("created"))),
        )
    Console().print(table)


@baseline_app.command(
    "unpin", epilog="Example: collapse-monitor baseline unpin --model gpt2-prod --name launch"
)
def baseline_unpin(
    model: Annotated[str, typer.Option(help="Declared model name.")],
    name: Annotated[str, typer.Option(help="Baseline name.")],
) -> None:
    """Remove a pinned baseline (exit code 2 when there is none of that name)."""
    runtime = _runtime()
    if not runtime.store.unpin_baseline(model, name):
        raise InvalidInput("unknown_baseline", f"no baseline {name!r} pinned for {model!r}")
    typer.echo(f"unpinned {name} of {model}")


def evaluate(
    model: Annotated[str | None, typer.Option(help="One model (default: all declared).")] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Evaluate now: every metric of every window, written as snapshots (as beat does)."""
    from monitor.evaluate.evaluator import Evaluator

    runtime = _runtime()
    evaluator = Evaluator(runtime)
    names = [model] if model else runtime.registry.names
    snapshots = []
    with progress_bar("evaluating", "models") as bar:
        for name in bar.track(names, description="evaluate"):
            snapshots.extend(evaluator.evaluate_model(name))
    if output is OutputFormat.json:
        typer.echo(json.dumps([json.loads(s.to_json()) for s in snapshots]))
        return
    for s in snapshots:
        table = Table(title=f"{s.model} {s.window}: {s.status} ({s.duration_seconds:.2f} s)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        if s.reason:
            table.add_row("reason", s.reason)
        for key, value in sorted(s.metrics.items()):
            if value is not None and not key.endswith("_stderr"):
                table.add_row(key, f"{value:.6g}")
        Console().print(table)


EXAMPLES: dict[Callable[..., None], str] = {
    worker: "collapse-monitor worker --queues embed --pool solo",
    beat: "collapse-monitor beat --loglevel info",
    status: "collapse-monitor status --model gpt2-prod --format json",
    replay: "collapse-monitor replay --model gpt2-prod --corpus traffic.txt",
    evaluate: "collapse-monitor evaluate --model gpt2-prod --format json",
}


def register(app: typer.Typer) -> None:
    """Add worker, beat, status, replay, evaluate and the `baseline` group to the main app."""
    for command, example in EXAMPLES.items():
        app.command(epilog=f"Example: {example}")(command)
    app.add_typer(baseline_app, name="baseline")
