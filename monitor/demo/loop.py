"""The demo scenario: warm-up, pinned baseline, steady traffic, injected collapse, recovery.

Everything is the service's own code in embedded mode: the probe on the live model ships
batches through `PipelineSink` into the `Ingestor` and a `MemoryStore`; each tick compacts,
runs the `Evaluator` (metrics, drift against the pinned baseline), judges the alert rules
with the evaluator's `VerdictTracker`, and `/metrics` serves the exporter's collector. Only
time is compressed (1-second buckets, a window of a few seconds).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.config import ModelSpec, Settings
from monitor.demo.alerting import AlertBoard, AlertState, Transition, demo_alerting
from monitor.demo.http import MetricsServer
from monitor.demo.inject import NormCollapse
from monitor.demo.state import PHASE_TEXT, DemoState, Phase, Plan
from monitor.demo.traffic import Traffic, TrafficShape
from monitor.demo.view import DemoView
from monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

MODEL = "demo"
BASELINE = "demo-warmup"


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 120.0
    inject: bool = True
    port: int = 9464
    out: Path = Path("demo-report")
    seed: int = 0
    token_rate: float = 0.25  # share of positions the probe keeps
    traffic: TrafficShape = field(default_factory=TrafficShape)


@dataclass(frozen=True)
class DemoResult:
    interrupted: bool
    fired: list[str]
    report_html: Path | None
    report_pngs: list[Path]
    metrics_url: str


def demo_settings(checkpoint: Path, plan: Plan, seed: int) -> Settings:
    """Embedded settings in demo time (explicit values: COLLAPSE_* variables cannot turn the
    demo into a Redis deployment or stretch its windows)."""
    history = int(plan.duration / plan.bucket_seconds) + 60
    return Settings(
        redis_url=None,
        models=[
            ModelSpec(name=MODEL, checkpoint=str(checkpoint), device="cpu", second_moment=True)
        ],
        bucket_seconds=plan.bucket_seconds,
        coarse_bucket_seconds=3600,
        fine_retention_seconds=max(600, 4 * plan.window_seconds),
        windows={plan.window: plan.window_seconds},
        partial_ttl_seconds=3600,
        evaluation_interval=float(plan.bucket_seconds),
        snapshot_history=history,
        custom_metrics=[],
        alerting=demo_alerting(plan.hold_seconds),
        seed=seed,
        device="cpu",
    )


class Demo:
    """One run of the scenario; `run()` returns when it ends or is interrupted."""

    def __init__(self, options: DemoOptions, checkpoint: Path, view: DemoView) -> None:
        from monitor.capture import CollapseProbe, SamplingPolicy
        from monitor.data import read_corpus
        from monitor.evaluate.evaluator import Evaluator
        from monitor.pipeline.client import MonitorClient, PipelineSink
        from monitor.pipeline.embed import loaded_model
        from monitor.pipeline.runtime import Runtime

        self.options = options
        self.view = view
        self.plan = Plan.for_duration(options.duration, options.inject)
        self.settings = demo_settings(checkpoint, self.plan, options.seed)
        self.runtime = Runtime(self.settings)
        self.store = self.runtime.store
        # One copy of the model: it serves the traffic, and the evaluator reads its LM head.
        self.model, self.tokenizer = loaded_model(self.runtime, MODEL)
        self.injection = NormCollapse(self.model, seed=options.seed) if options.inject else None
        self.evaluator = Evaluator(self.runtime)
        self.board = AlertBoard(self.settings.alerting)
        self.traffic = Traffic(self.model, self.tokenizer, read_corpus("heldout"), options.traffic)
        self.probe = CollapseProbe.attach(  # last: nothing below can fail and leave it hooked
            self.model,
            PipelineSink(MonitorClient(self.settings, self.runtime), MODEL),
            SamplingPolicy(token_rate=options.token_rate, seed=options.seed),
            flush_interval=0.25,
        )
        self.server: MetricsServer | None = None
        self._started = time.monotonic()
        self._phase: Phase | None = None
        self._timeline: list[str] = []  # "phase inject at 48 s: ..." lines for the report
        self._pinned = False
        self._baseline_metrics: dict[str, float | int | None] = {}
        self._rate: deque[tuple[float, int]] = deque(maxlen=6)
        self._reference: tuple[int, float] | None = None
        self._traffic_errors = 0
        self.last: Snapshot | None = None

    # ----------------------------------------------------------------- run
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def run(self) -> DemoResult:
        interrupted = False
        try:
            self.server = MetricsServer(self.store, self.settings, self.options.port)
            self._started = time.monotonic()
            self.view.event(0.0, f"metrics: {self.server.url}")
            self.view.event(
                0.0,
                f"plan: window {self.plan.window}, baseline pinned at {self.plan.pin_at:.0f}s"
                + (
                    f", inject at {self.plan.inject_at:.0f}s, recover at "
                    f"{self.plan.recover_at:.0f}s"
                    if self.plan.inject_at is not None and self.plan.recover_at is not None
                    else ", no injection"
                )
                + f", end at {self.plan.duration:.0f}s",
            )
            self.traffic.start()
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
            self.view.event(self.elapsed(), "interrupted: stopping cleanly")
        finally:
            with _signals_held():
                self._shutdown()
        with _signals_held():  # a second Ctrl-C must not cost the report the first one promised
            html, pngs = self._write_report()
        return DemoResult(
            interrupted=interrupted,
            fired=sorted({p.alert for p in self.board.periods}),
            report_html=html,
            report_pngs=pngs,
            metrics_url=self.server.url if self.server else "",
        )

    def _loop(self) -> None:
        tick = float(self.plan.bucket_seconds)
        next_tick = time.monotonic() + tick
        while True:
            time.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += tick
            elapsed = self.elapsed()
            if elapsed >= self.plan.duration:
                return
            self._step(elapsed)

    def _step(self, elapsed: float) -> None:
        from monitor.pipeline.windows import compact_model, maintain_model

        now = time.time()
        compact_model(self.store, MODEL)
        maintain_model(self.store, MODEL, now)
        if not self._pinned and elapsed >= self.plan.pin_at:
            self._pin(elapsed)
        self._enter(self.plan.phase(elapsed, self._pinned), elapsed)
        snapshots = self.evaluator.evaluate_model(MODEL, now=now)
        self.last = next((s for s in snapshots if s.window == self.plan.window), None)
        self._refresh_reference()
        for change in self.board.update(snapshots, now):
            self._report_transition(change, elapsed)
        errors = self.traffic.errors
        if errors and not self._traffic_errors:  # the first failure, not one line a second
            self.view.event(elapsed, f"traffic request failed: {self.traffic.last_error}")
        self._traffic_errors = errors
        self.view.update(self._state(elapsed))

    def _pin(self, elapsed: float) -> None:
        from monitor.errors import InvalidInput
        from monitor.pipeline.baselines import pin_window

        if self.last is None or not self.last.ok:
            return  # not enough traffic yet: the warm-up lasts until the window has data
        try:
            meta = pin_window(
                self.store,
                self.runtime.registry,
                MODEL,
                BASELINE,
                self.plan.window,
                self.plan.window_seconds,
                replace=True,
            )
        except InvalidInput:
            return
        self._pinned = True
        self._baseline_metrics = dict(self.last.metrics)
        self.view.event(
            elapsed,
            f"baseline pinned: {meta['sample_count']} samples of window {self.plan.window}",
        )

    def _enter(self, phase: Phase, elapsed: float) -> None:
        if phase == self._phase:
            return
        self._phase = phase
        detail = PHASE_TEXT[phase]
        if phase is Phase.inject and self.injection is not None:
            self.injection.apply()
            detail = f"{detail}: {self.injection.describe()}"
        elif phase is Phase.recover and self.injection is not None:
            self.injection.restore()
        self.view.event(elapsed, f"phase {phase} - {detail}")
        self._timeline.append(f"{elapsed:.0f} s: phase {phase} - {detail}")

    def _refresh_reference(self) -> None:
        """NC4 at capture counts against the class means of the latest evaluation."""
        from monitor.pipeline.nc4_means import load_nc4_means

        decoded = load_nc4_means(self.store, MODEL)
        if decoded is None:
            return
        key = (decoded[0].numel(), float(decoded[1].sum()))
        if key == self._reference:
            return
        self._reference = key
        self.probe.set_reference(*decoded)

    def _report_transition(self, change: Transition, elapsed: float) -> None:
        if change.new is AlertState.firing:
            self.view.event(elapsed, f"ALERT FIRING {change.alert}")
        elif change.new is AlertState.resolved:
            self.view.event(elapsed, f"ALERT RESOLVED {change.alert}")
        elif change.new is AlertState.pending:
            self.view.event(elapsed, f"alert pending {change.alert}")

    def _samples_per_second(self) -> tuple[float, int]:
        total = self.store.counters(MODEL).get("samples_ingested", 0)
        self._rate.append((time.monotonic(), total))
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return ((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0), total

    def _state(self, elapsed: float) -> DemoState:
        rate, total = self._samples_per_second()
        active = self.injection is not None and self.injection.active
        return DemoState(
            elapsed=elapsed,
            duration=self.plan.duration,
            phase=self._phase or Phase.warmup,
            model=MODEL,
            window=self.plan.window,
            metrics_url=self.server.url if self.server else "",
            samples_per_second=rate,
            samples_total=total,
            metrics=dict(self.last.metrics) if self.last else {},
            baseline=self._baseline_metrics,
            alerts=dict(self.board.states),
            injection=self.injection.describe() if active and self.injection else None,
        )

    # ------------------------------------------------------------- the end
    def _shutdown(self) -> None:
        """Stop traffic, unhook the model, close the HTTP server (each step is attempted)."""
        self.traffic.stop()
        if self.injection is not None:
            self.injection.restore()
        self.probe.detach(timeout=5.0)
        if self.server is not None:
            self.server.close()

    def _write_report(self) -> tuple[Path | None, list[Path]]:
        from monitor.pipeline.baselines import load_baseline
        from monitor.pipeline.windows import window_stats
        from monitor.report import AlertPeriod, ReportData, write_report

        elapsed = self.elapsed()
        self._enter(Phase.done, min(elapsed, self.plan.duration))
        self.view.update(self._state(elapsed))
        history = self.store.history(MODEL, self.plan.window, self.settings.snapshot_history)
        snapshots = [Snapshot.from_json(doc) for doc in reversed(history)]
        baseline = None
        if self._pinned:
            baseline, _ = load_baseline(self.store, self.runtime.registry, MODEL, BASELINE)
        current = window_stats(self.store, MODEL, self.plan.window, self.plan.window_seconds).stats
        ids: set[int] = set()
        for stats in (baseline, current):
            if stats is not None:
                ids.update(int(i) for i in stats.class_ids.tolist())
        data = ReportData(
            model=MODEL,
            window=self.plan.window,
            snapshots=snapshots,
            alerting=self.settings.alerting,
            alert_periods=[AlertPeriod(p.alert, p.start, p.end) for p in self.board.periods],
            baseline=baseline,
            current=current,
            token_names={i: self._token(i) for i in sorted(ids)},
            min_count=self.settings.min_count,
            notes=[
                f"collapse-monitor demo: window {self.plan.window}, 1-second buckets, "
                f"evaluated every second; alerts judged by the evaluator's own rules.",
                *self._timeline,
            ],
        )
        files = write_report(data, self.options.out)
        for path in [files.html, *files.pngs]:
            self.view.event(elapsed, f"report: {path}")
        return files.html, list(files.pngs)

    def _token(self, class_id: int) -> str:
        text: Any = self.tokenizer.decode([class_id])
        return str(text)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored inside (about a second: shutdown, the report)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; no signal reaches another one anyway
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
