"""How the benchmark judges alert rules: the evaluator's own `VerdictTracker` (the direct
Alertmanager path) for the snapshot rules, and Prometheus's `predict_linear` arithmetic for the
trend rules, which the tracker leaves to Prometheus. `rejudge` replays a recorded trace under
other thresholds, for tuning without simulating again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from monitor.alerts.common import duration_seconds
from monitor.alerts.thresholds import AlertingSettings, PredictiveBound
from monitor.alerts.verdicts import VerdictTracker
from monitor.snapshot import Snapshot

MODEL = "sim"
Key = tuple[str, str, str]  # alert, severity, window
Trace = list[tuple[float, str, dict[str, float | int | None]]]  # (time, window, values)


@dataclass(frozen=True)
class Episode:
    alert: str
    severity: str
    window: str
    start: float
    end: float | None


def _kahan(inc: float, total: float, c: float) -> tuple[float, float]:
    """Prometheus's kahanSumInc (Neumaier's variant)."""
    t = total + inc
    c += (total - t) + inc if abs(total) >= abs(inc) else (inc - t) + total
    return t, c


def predict_linear(points: Sequence[tuple[float, float]], at: float, horizon: float) -> float:
    """Prometheus's `predict_linear`, step for step (promql/functions.go, linearRegression):
    compensated sums of x = t - at, y, xy and x^2; a constant series predicts itself."""
    if all(v == points[0][1] for _, v in points):
        return points[0][1]
    n = sx = cx = sy = cy = sxy = cxy = sxx = cxx = 0.0
    for t, v in points:
        n += 1.0
        x = round((t - at) * 1000) / 1e3  # millisecond timestamps, as Prometheus keeps them
        sx, cx = _kahan(x, sx, cx)
        sy, cy = _kahan(v, sy, cy)
        sxy, cxy = _kahan(x * v, sxy, cxy)
        sxx, cxx = _kahan(x * x, sxx, cxx)
    sx, sy, sxy, sxx = sx + cx, sy + cy, sxy + cxy, sxx + cxx
    slope = (sxy - sx * sy / n) / (sxx - sx * sx / n)
    intercept = sy / n - slope * sx / n
    return slope * horizon + intercept


class TrendJudge:
    """The predictive rules as Prometheus runs them: the gauges scraped every `scrape` seconds
    (the latest snapshot's values; an absent metric adds no sample), `predict_linear` over each
    rule's range at every scrape, `for` counted over consecutive holding evaluations."""

    def __init__(self, bounds: Iterable[PredictiveBound], scrape: float = 60.0) -> None:
        self.bounds = [b for b in bounds if b.enabled]
        self.metrics = {b.metric for b in self.bounds}
        self.longest = max((duration_seconds(b.range) for b in self.bounds), default=0.0)
        self.scrape = scrape
        self.samples: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        self.gauges: dict[tuple[str, str], float] = {}
        self.since: dict[Key, float] = {}
        self.last: float | None = None

    def evaluation(self, now: float, snapshots: Sequence[Snapshot]) -> list[tuple[float, set[Key]]]:
        """Scrapes up to `now` with the old gauges, then the new snapshots at `now`."""
        steps = []
        t = now if self.last is None else self.last + self.scrape
        while t < now - 1e-6:
            steps.append((t, self._step(t)))
            t += self.scrape
        self.gauges = {
            (k, s.window): float(v)
            for s in snapshots
            if s.ok
            for k, v in s.metrics.items()
            if k in self.metrics and v is not None
        }
        steps.append((now, self._step(now)))
        self.last = now
        return steps

    def _step(self, t: float) -> set[Key]:
        for key, value in self.gauges.items():
            series = self.samples[key]
            series.append((t, value))
            while series and series[0][0] < t - self.longest:
                series.pop(0)
        holding: set[Key] = set()
        for b in self.bounds:
            span, ahead = duration_seconds(b.range), duration_seconds(b.horizon)
            for (metric, window), series in self.samples.items():
                labels = {"model": MODEL, "window": window}
                if metric != b.metric or any(labels.get(k) != v for k, v in b.matchers.items()):
                    continue
                points = [(ts, v) for ts, v in series if ts >= t - span]
                if len(points) < 2:
                    continue
                value = predict_linear(points, t, ahead)
                if (b.min is not None and value < b.min) or (b.max is not None and value > b.max):
                    holding.add((b.alert, b.severity, window))
        self.since = {k: self.since.get(k, t) for k in holding}
        hold = {(b.alert, b.severity): duration_seconds(b.for_) for b in self.bounds}
        return {k for k in holding if t - self.since[k] >= hold[k[:2]]}


class Judge:
    """The rules over one model's snapshots, keeping every firing period: `VerdictTracker` (the
    direct Alertmanager path) for the snapshot rules, `TrendJudge` for the trends."""

    def __init__(self, alerting: AlertingSettings) -> None:
        self.tracker = VerdictTracker(alerting)
        self.trends = TrendJudge(alerting.predictive)
        self.episodes: list[Episode] = []
        self._open: dict[str, dict[Key, float]] = {"rules": {}, "trends": {}}

    def evaluation(self, now: float, snapshots: Sequence[Snapshot]) -> None:
        fired = self.tracker.firing(snapshots)
        self._record(now, "rules", {_key(a.labels) for a in fired})
        for t, keys in self.trends.evaluation(now, snapshots):
            self._record(t, "trends", keys)

    def _record(self, t: float, source: str, firing: set[Key]) -> None:
        opened = self._open[source]
        for key in firing - opened.keys():
            opened[key] = t
        for key in sorted(opened.keys() - firing):
            self.episodes.append(Episode(*key, opened.pop(key), t))

    def finish(self) -> list[Episode]:
        for opened in self._open.values():
            for key, start in sorted(opened.items()):
                self.episodes.append(Episode(*key, start, None))
            opened.clear()
        return sorted(self.episodes, key=lambda e: (e.start, e.alert, e.window))


def rejudge(trace: Trace, alerting: AlertingSettings) -> list[Episode]:
    """The firing periods `alerting` would have given on a recorded trace (for tuning
    thresholds without simulating again: the rules read only the traced keys)."""
    judge = Judge(alerting)
    by_time: dict[float, list[Snapshot]] = defaultdict(list)
    for t, window, values in trace:
        samples, classes = int(values.get("sample_count") or 0), int(values.get("class_count") or 0)
        snap = Snapshot(MODEL, window, 0, t, "ok", None, 0.0, samples, classes, dict(values))
        by_time[t].append(snap)
    for t in sorted(by_time):
        judge.evaluation(t, by_time[t])
    return judge.finish()


def _key(labels: dict[str, str]) -> Key:
    return labels["alertname"], labels["severity"], labels.get("window", "")
