"""The benchmark's simulation: the service's own pipeline in embedded mode, in simulated time.

Batches of the simulated world (alert_world.py) go through the `Ingestor` into a `MemoryStore`
(NC4 counted against the last evaluation's class means, as the probe counts it); each
evaluation compacts, runs the `Evaluator` (metrics, jackknife standard errors, drift against
the pinned baseline) and hands the snapshots to the `Judge`. A failure trial is a fork of the
healthy run at its injection time: same store, alert states and trend history.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from alert_judge import MODEL, Episode, Judge, Trace
from alert_world import DAY, T0, Batch, Failure, World

from monitor.alerts.thresholds import AlertingSettings
from monitor.config import ModelSpec, Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.pipeline.baselines import pin_window
from monitor.pipeline.nc4_means import load_nc4_means
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model
from monitor.store.base import Store
from monitor.store.memory import MemoryStore

RATIOS = (
    "drift_nc1_cdnv_ratio",
    "drift_nc2_equiangularity_std_ratio",
    "drift_nc4_ncc_agreement_ratio",
    "drift_effective_rank_ratio",
)
TRACED = (
    *RATIOS,
    *(f"{r}_stderr" for r in RATIOS),
    "anisotropy_mean_cos",
    "effective_rank",
    "drift_mmd",
    "drift_mmd_threshold",
    "drift_label_js",
    "drift_mean_shift",
    "drift_class_mean_cos",
    "mean_noise_ratio",
    "sample_count",
    "class_count",
)


@dataclass(frozen=True)
class Scale:
    classes: int = 2000
    dim: int = 64
    low_rate: float = 2.0  # captured states per second at midnight
    swing: float = 10.0  # noon over midnight
    interval: int = 900  # evaluation interval, s
    batch_seconds: int = 60
    days: float = 7.0  # healthy days after the baseline day
    horizon: int = 8  # evaluation intervals watched after an injection
    seed: int = 0
    window_mode: str = "exact"  # or "decayed" (no traffic stderrs: min_z gates stay open)


class Simulation:
    """One embedded runtime fed batch by batch in simulated time, its alerts judged."""

    def __init__(self, world: World, scale: Scale, folder: Path, alerting: AlertingSettings):
        head = folder / "head.npy"
        if not head.exists():
            np.save(head, world.model.head.astype(np.float32))
        spec = ModelSpec(
            name=MODEL,
            vocab_size=scale.classes,
            dim=scale.dim,
            classifier_path=str(head),
            second_moment=True,
        )
        self.settings = Settings(
            redis_url=None,
            models=[spec],
            evaluation_interval=float(scale.interval),
            alerting=alerting,
            custom_metrics=[],
            snapshot_history=2,
            device="cpu",
            seed=scale.seed,
            window_mode=scale.window_mode,
        )
        self.world, self.scale = world, scale
        self.runtime = Runtime(self.settings)
        self.evaluator = Evaluator(self.runtime)
        self.judge = Judge(alerting)
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.trace: Trace = []
        self.evaluations = 0
        self.seconds = 0.0

    def feed(self, index: int, failure: Failure | None = None) -> None:
        """Ingest batch `index` with its NC4 counts against the last evaluation's means, as
        the probe counts them (none before the first evaluation)."""
        batch: Batch = self.world.batch(index, failure)
        if batch.labels.size == 0:
            return
        nc4 = None
        if self.reference is not None:
            nc4 = (self.world.nc4_hits(batch, *self.reference), int(batch.labels.size))
        payload = encode_batch(
            MODEL, batch.features, batch.labels, batch_id=f"b{index}", ts=batch.ts, nc4=nc4
        )
        end = T0 + (index + 1) * self.world.batch_seconds
        self.runtime.ingestor.ingest(payload, now=end)

    def pin(self, now: float) -> None:
        """`baseline pin --window 24h` at simulated `now` (pin_window reads the clock)."""
        compact_model(self.runtime.store, MODEL)
        with mock.patch("time.time", return_value=now):
            pin_window(self.runtime.store, self.runtime.registry, MODEL, "day1", "24h", DAY)

    def evaluate(self, now: float) -> None:
        started = time.perf_counter()
        compact_model(self.runtime.store, MODEL)
        snapshots = self.evaluator.evaluate_model(MODEL, now=now)
        self.judge.evaluation(now, snapshots)
        self.reference = load_nc4_means(self.runtime.store, MODEL)
        for s in snapshots:
            if s.ok:
                self.trace.append((now, s.window, {k: s.metrics.get(k) for k in TRACED}))
        self.evaluations += 1
        self.seconds += time.perf_counter() - started

    def finish(self) -> list[Episode]:
        return self.judge.finish()

    def fork(self) -> Simulation:
        """A copy that goes on by itself from here: a trial branching off the healthy run at
        its injection (same store contents, alert states and trend history)."""
        twin = copy.copy(self)
        twin.runtime = Runtime(self.settings)
        twin.runtime.__dict__["store"] = _fork_store(self.runtime.store)  # a cached_property
        twin.evaluator = Evaluator(twin.runtime)
        twin.judge = copy.deepcopy(self.judge)
        twin.trace, twin.evaluations, twin.seconds = [], 0, 0.0
        return twin


def _fork_store(store: Store) -> MemoryStore:
    """A deep copy of an embedded store's per-model contents (dicts of bytes, no lock)."""
    if not isinstance(store, MemoryStore):
        raise TypeError("only an embedded store can be forked")
    twin = MemoryStore(store.policy)
    twin._models = copy.deepcopy(store._models)
    return twin


def _eval_time(scale: Scale, index: int) -> float | None:
    """The end of batch `index` when it is an evaluation time, else None."""
    end = T0 + (index + 1) * scale.batch_seconds
    return end if (end - T0) % scale.interval == 0 else None


@dataclass
class HealthyRun:
    episodes: list[Episode]
    trace: Trace
    evaluations: int
    samples: int
    seconds: float
    forks: dict[float, Simulation] = field(default_factory=dict)  # injection time -> state


def run_healthy(
    world: World,
    scale: Scale,
    folder: Path,
    alerting: AlertingSettings,
    *,
    evaluate_from: float = T0,
    forks_at: Sequence[float] = (),
) -> HealthyRun:
    """Baseline day, pin, then `scale.days` healthy days, evaluated every interval from
    `evaluate_from` (a shortened run skips most of the baseline day's evaluations: its NC4
    counts then start later, as the product's do after its first start). At each time of
    `forks_at` (evaluation times) a copy is kept for the failure trials."""
    sim = Simulation(world, scale, folder, alerting)
    batches = int((1 + scale.days) * DAY) // scale.batch_seconds
    forks: dict[float, Simulation] = {}
    started = time.perf_counter()
    for i in range(batches):
        sim.feed(i)
        now = _eval_time(scale, i)
        if now is None:
            continue
        if now == T0 + DAY:
            sim.pin(now)
        if now < evaluate_from:
            continue
        sim.evaluate(now)
        if now in forks_at:
            forks[now] = sim.fork()
        if sim.evaluations % 96 == 0:
            log(f"  healthy day {sim.evaluations // 96}: {time.perf_counter() - started:.0f} s")
    missing = set(forks_at) - forks.keys()
    if missing:
        raise ValueError(f"no evaluation at the injection times {sorted(missing)}")
    samples = int(sim.runtime.store.counters(MODEL).get("samples_ingested", 0))
    return HealthyRun(sim.finish(), sim.trace, sim.evaluations, samples, sim.seconds, forks)


@dataclass(frozen=True)
class Trial:
    failure: Failure
    injected: float
    detections: dict[str, float]  # alert -> first firing, in intervals after the injection
    before: list[str]  # alerts already firing at the injection (not healthy)
    first_window: dict[str, str] = field(default_factory=dict)
    trace: Trace = field(default_factory=list)


def run_trial(healthy: HealthyRun, failure: Failure, injected: float) -> Trial:
    """From the healthy run's state at `injected`, the failure for `scale.horizon` intervals."""
    sim = healthy.forks[injected].fork()
    scale = sim.scale
    first = int((injected - T0) // scale.batch_seconds)
    for i in range(first, first + scale.horizon * scale.interval // scale.batch_seconds):
        sim.feed(i, failure)
        now = _eval_time(scale, i)
        if now is not None:
            sim.evaluate(now)
    episodes = sim.finish()
    active = [e for e in episodes if e.start <= injected and (e.end is None or e.end > injected)]
    before = sorted({e.alert for e in active})
    detections: dict[str, float] = {}
    windows: dict[str, str] = {}
    for e in episodes:
        if e.start > injected and e.alert not in before and e.alert not in detections:
            detections[e.alert] = (e.start - injected) / scale.interval
            windows[e.alert] = e.window
    return Trial(failure, injected, detections, before, windows, sim.trace)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
