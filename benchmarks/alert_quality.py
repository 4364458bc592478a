"""Alert quality of the rules the product ships: false alerts on a healthy model over a simulated
week, and the detection delay and recall of injected failures (issue 15, docs/operations.md).

    .venv/bin/python benchmarks/alert_quality.py            # K = 2,000, d = 64, a week
    .venv/bin/python benchmarks/alert_quality.py --quick    # K = 500, d = 32, a day

Everything is the service's own code in embedded mode, as in `collapse-monitor demo`: batches
go through the `Ingestor` into a `MemoryStore`, the `Evaluator` computes every window's metrics,
standard errors and drift against a pinned baseline, and `VerdictTracker` (the direct
Alertmanager path) judges the shipped `default_alerting()` rules: absolute bounds, baseline
ratios with their `min_z`, drift with its effect size. The trend rules (`predict_linear`),
which the tracker leaves to Prometheus, are judged with Prometheus's arithmetic on what a 60 s
scrape of the gauges would hold (alert_judge.py). Only time is simulated (`now=` everywhere).

Setup (alert_world.py: the model, its traffic and the failures; alert_sim.py: the run): the
shipped windows (15m, 1h, 24h), buckets (5 min fine, 3 h coarse) and settings, except the
evaluation interval: 15 min instead of 1 min. Each evaluation of the 15m window is then a fresh
draw of traffic, the harshest case for false alerts, a `for: 15m` is one interval, and a week
is 672 evaluations instead of 10,080. Day 1 builds the baseline: the 24h window is pinned at its
end (as `baseline pin --window 24h` would). `--days` healthy days follow. Each failure trial
branches off the healthy run at its injection (day 2 at noon, the traffic's peak, and day 3 at
midnight, its trough; `--quick`: noon only) and watches `horizon` intervals (2 hours).

Prints Markdown tables on stdout, progress on stderr; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from alert_judge import Episode
from alert_sim import HealthyRun, Scale, Trial, log, run_healthy, run_trial
from alert_world import DAY, T0, Failure, World

from monitor.alerts.thresholds import AlertingSettings, default_alerting, load_alerting

# --------------------------------------------------------------------------- scenarios, tables
STRENGTHS = (0.1, 0.25, 0.5, 1.0)
FULL_FAILURES = [
    *(Failure("collapse", s) for s in STRENGTHS),
    *(Failure("norm", s) for s in STRENGTHS[:3]),  # norm at 100% is collapse at 100%
    *(Failure("noise", s) for s in STRENGTHS),
    *(Failure("swap", s) for s in STRENGTHS),
]
QUICK_FAILURES = [Failure("collapse", 0.25), Failure("collapse", 1.0), Failure("norm", 0.25),
                  Failure("noise", 0.5), Failure("swap", 1.0)]  # fmt: skip
NOON, MIDNIGHT = T0 + 1.5 * DAY, T0 + 2 * DAY  # the traffic's peak (day 2) and trough (day 3)


@dataclass
class Report:
    scale: Scale
    healthy: HealthyRun
    trials: list[Trial]
    rules: list[str]
    seconds: float
    alerting: AlertingSettings


def collapse_rules(alerting: AlertingSettings) -> list[str]:
    """Alert names of the snapshot and trend rules, in rule order (no pipeline rules)."""
    kinds = (alerting.relative, alerting.absolute, alerting.predictive, alerting.drift)
    return list(dict.fromkeys(r.alert for rules in kinds for r in rules if r.enabled))


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def healthy_table(report: Report) -> list[str]:
    end = T0 + (1 + report.scale.days) * DAY
    rows: dict[tuple[str, str], list[Episode]] = defaultdict(list)
    for e in report.healthy.episodes:
        rows[(e.alert, e.severity)].append(e)
    lines = ["| alert | severity | false alerts | windows | time firing |", "|---|---|---|---|---|"]
    for (alert, severity), found in sorted(rows.items()):
        firing = sum((e.end or end) - e.start for e in found)
        windows = ", ".join(sorted({e.window for e in found}))
        lines.append(f"| {alert} | {severity} | {len(found)} | {windows} | {_minutes(firing)} |")
    total = len(report.healthy.episodes)
    lines.append(f"| **all {len(report.rules)} collapse and drift rules** | | **{total}** | | |")
    return lines


def ratio_table(report: Report, alerting: AlertingSettings) -> list[str]:
    """How close the healthy ratios came to each relative bound, and with what z."""
    lines = [
        "| bound | window | present | range | beyond the bound | largest z there |",
        "|---|---|---|---|---|---|",
    ]
    after = T0 + DAY
    for b in alerting.relative:
        for window in ("15m", "1h", "24h"):
            rows = [m for t, w, m in report.healthy.trace if w == window and t > after]
            values = [(m.get(b.metric), m.get(b.stderr_metric)) for m in rows]
            present = [(float(v), s) for v, s in values if v is not None]
            if not rows:
                continue
            side = f"< {b.min:g}" if b.min is not None else f"> {b.max:g}"
            beyond = [(v, s) for v, s in present if (b.min is not None and v < b.min)
                      or (b.max is not None and v > b.max)]  # fmt: skip
            zs = [abs(v - 1) / float(s) for v, s in beyond if s]
            span = (
                f"{min(v for v, _ in present):.3f}-{max(v for v, _ in present):.3f}"
                if present
                else "-"
            )
            lines.append(
                f"| {b.alert} {b.severity} ({side}) | {window} | {len(present)}/{len(rows)} | "
                f"{span} | {len(beyond)} | {max(zs):.2f} |"
                if zs
                else f"| {b.alert} {b.severity} ({side}) | {window} | {len(present)}/{len(rows)} | "
                f"{span} | {len(beyond)} | - |"
            )
    return lines


def _cell(delays: list[float | None]) -> str:
    return " / ".join("-" if d is None else f"{d:.1f}".removesuffix(".0") for d in delays)


def failure_table(report: Report) -> list[str]:
    times = sorted({t.injected for t in report.trials})
    names = {t: ("noon" if t == NOON else "midnight") for t in times}
    short = [r.removeprefix("Collapse") for r in report.rules]
    lines = [
        f"| failure | {' | '.join(short)} | any |",
        "|---|" + "---|" * (len(short) + 1),
    ]
    by_failure: dict[str, list[Trial]] = defaultdict(list)
    for trial in report.trials:
        by_failure[trial.failure.label()].append(trial)
    for label, trials in by_failure.items():
        trials.sort(key=lambda t: times.index(t.injected))
        cells = [_cell([t.detections.get(r) for t in trials]) for r in report.rules]
        anys = [
            min((d for d in t.detections.values() if d is not None), default=None) for t in trials
        ]
        lines.append(f"| {label} | {' | '.join(cells)} | {_cell(anys)} |")
    recall = []
    for rule in report.rules:
        hit = sum(1 for t in report.trials if t.detections.get(rule) is not None)
        recall.append(f"{hit}/{len(report.trials)}")
    detected = sum(1 for t in report.trials if t.detections)
    lines.append(f"| **recall** | {' | '.join(recall)} | {detected}/{len(report.trials)} |")
    order = ", ".join(names[t] for t in times)
    lines.insert(
        0, f"Cells: delay in evaluation intervals ({order}); - = not within the horizon.\n"
    )
    return lines


def goals(report: Report) -> list[str]:
    false_alerts = len(report.healthy.episodes)
    quarter = [t for t in report.trials if t.failure == Failure("collapse", 0.25)]
    delays = [
        min((d for d in t.detections.values() if d is not None), default=None) for t in quarter
    ]
    met = bool(delays) and all(d is not None and d <= 2 for d in delays)
    return [
        f"- False alerts on the healthy model: **{false_alerts}** (goal 0): "
        f"{'met' if false_alerts == 0 else 'NOT met'}.",
        f"- The demo's collapse at 25%: first alert after {_cell(delays)} intervals (goal: "
        f"within 2): {'met' if met else 'NOT met'}.",
    ]


def run(
    scale: Scale,
    failures: Sequence[Failure],
    times: Sequence[float],
    alerting: AlertingSettings | None = None,
) -> Report:
    alerting = alerting or default_alerting()
    world = World(scale.classes, scale.dim, scale.seed, low_rate=scale.low_rate,
                  swing=scale.swing, batch_seconds=scale.batch_seconds)  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log(f"healthy: baseline day + {scale.days:g} days, K = {scale.classes}, d = {scale.dim}")
        healthy = run_healthy(world, scale, folder, alerting, forks_at=times)
        trials = []
        for failure in failures:
            for injected in times:
                log(f"trial {failure.label()} at {(injected - T0) / 3600:.0f} h")
                trials.append(run_trial(healthy, failure, injected))
    rules = collapse_rules(alerting)
    return Report(scale, healthy, trials, rules, time.perf_counter() - started, alerting)


def markdown(report: Report) -> str:
    s, h = report.scale, report.healthy
    alerting = report.alerting
    lines = [
        f"K = {s.classes} Zipf classes, d = {s.dim}; {s.low_rate:g} to "
        f"{s.low_rate * s.swing:g} states/s (midnight to noon); evaluated every "
        f"{s.interval // 60} min; baseline day + {s.days:g} healthy days: {h.evaluations} "
        f"evaluations of 3 windows, {h.samples:,} samples; {len(report.trials)} failure trials "
        f"watched {s.horizon} intervals; {report.seconds:.0f} s. Rules: "
        f"{'the shipped defaults' if report.alerting == default_alerting() else 'custom'}; "
        f"{s.window_mode} windows.",
        "",
        "**Goals**",
        "",
        *goals(report),
        "",
        "**False alerts on the healthy model** (every firing period of the rules; none listed: "
        "none fired)",
        "",
        *healthy_table(report),
        "",
        "**The healthy ratios against the relative bounds** (after the baseline day)",
        "",
        *ratio_table(report, alerting),
        "",
        "**Injected failures**",
        "",
        *failure_table(report),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="K = 500, d = 32, one healthy day")
    p.add_argument("--days", type=float, default=None, help="healthy days after the baseline")
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--low-rate", type=float, default=None, help="states/s at midnight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-mode", choices=("exact", "decayed"), default="exact")
    p.add_argument("--no-trials", action="store_true", help="the healthy run alone")
    p.add_argument("--alerting", type=Path, default=None, help="judge these thresholds (YAML/JSON)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    # One thread: the simulation's tensors are small, and on a busy machine OpenMP's spinning
    # threads made every step 10-30x slower (measured with 2 threads at load 7).
    torch.set_num_threads(1)
    base = Scale(classes=500, dim=32, days=1.0) if args.quick else Scale()
    scale = Scale(
        classes=args.classes or base.classes,
        dim=args.dim or base.dim,
        days=base.days if args.days is None else args.days,
        low_rate=args.low_rate or base.low_rate,
        seed=args.seed,
        window_mode=args.window_mode,
    )
    failures = QUICK_FAILURES if args.quick else FULL_FAILURES
    times = [NOON] if args.quick else [NOON, MIDNIGHT]
    if args.no_trials:
        failures, times = [], []
    alerting = load_alerting(args.alerting) if args.alerting else None
    report = run(scale, failures, times, alerting)
    print(markdown(report))
    if args.json is not None:
        doc = {
            "scale": asdict(scale),
            "episodes": [asdict(e) for e in report.healthy.episodes],
            "trials": [asdict(t) for t in report.trials],
            "trace": report.healthy.trace,
            "seconds": report.seconds,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
