"""What the views show: the scenario's plan and one immutable picture of the demo per tick."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from monitor.demo.alerting import AlertState

MIN_DURATION = 40.0


class Phase(StrEnum):
    warmup = "warmup"  # traffic flows, the window fills, no baseline yet
    steady = "steady"  # baseline pinned, healthy traffic: nothing may fire
    inject = "inject"  # the collapse is in the model
    recover = "recover"  # weights restored; injected samples age out of the window
    done = "done"


PHASE_TEXT = {
    Phase.warmup: "traffic flows and fills the window; no baseline yet",
    Phase.steady: "baseline pinned; healthy traffic, alerts must stay quiet",
    Phase.inject: "collapse injected into the live model",
    Phase.recover: "model restored; collapsed samples leave the window",
    Phase.done: "writing the report",
}


@dataclass(frozen=True)
class Plan:
    """Demo time, compressed: 1-second buckets, a window of a sixth of the run (6 to 20 s).

    The warm-up fills one window before the baseline is pinned from it; the recovery lasts
    longer than a window plus the alert hold, so the injected samples leave the window and the
    alert resolves before the end.
    """

    duration: float
    window_seconds: int
    bucket_seconds: int
    hold_seconds: int
    pin_at: float
    inject_at: float | None
    recover_at: float | None

    @classmethod
    def for_duration(cls, duration: float, inject: bool = True) -> Plan:
        window = int(min(20, max(6, round(duration / 6))))
        warmup = max(0.2 * duration, window + 2.0)
        steady = 0.2 * duration
        inject_for = 0.25 * duration
        return cls(
            duration=duration,
            window_seconds=window,
            bucket_seconds=1,
            hold_seconds=2,
            pin_at=warmup,
            inject_at=warmup + steady if inject else None,
            recover_at=warmup + steady + inject_for if inject else None,
        )

    @property
    def window(self) -> str:
        return f"{self.window_seconds}s"

    def phase(self, elapsed: float, pinned: bool) -> Phase:
        if elapsed >= self.duration:
            return Phase.done
        if not pinned:
            return Phase.warmup
        if self.recover_at is not None and elapsed >= self.recover_at:
            return Phase.recover
        if self.inject_at is not None and elapsed >= self.inject_at:
            return Phase.inject
        return Phase.steady


@dataclass(frozen=True)
class DemoState:
    """One tick's picture: time, phase, throughput, the window's metrics and the alerts."""

    elapsed: float
    duration: float
    phase: Phase
    model: str
    window: str
    metrics_url: str
    samples_per_second: float
    samples_total: int
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    baseline: dict[str, float | int | None] = field(default_factory=dict)
    alerts: dict[str, AlertState] = field(default_factory=dict)
    injection: str | None = None
