"""The jackknife behind `*_traffic_stderr` at scale (issue 15): its cost beside one evaluation,
before and after replicates were made cheap; the pair noise of replicates on sampled pairs; and,
for windows whose pairs are sampled, the reported error against the spread across windows.

Every child process runs with `--threads` torch threads (default 1: on a shared 2-core machine,
two threads made small operations wait for the busy core, up to 70x longer and erratic).

**Cost** (one fresh process per size, `--sizes`, default K x d = 2,000 x 256 and 128,256 x
4,096). A synthetic window of K classes is the exact sum of G = 8 groups of buckets (below);
measured in one run, on the same window:

- `evaluation`: what the evaluator computes for a window, `compute_metrics(window, head, bias,
  **options)` with the default options (pairs exact up to 30,000 classes, else 500,000 sampled;
  NC4 from the window's counts; second moment: trace ratio and effective rank). Drift and
  custom metrics are not included.
- `before`: the jackknife as first shipped: each replicate the full `compute_metrics(replicate,
  **options)` (no head), its sampled pairs drawn afresh by position. Replicates are run until
  `--before-budget` seconds are spent (at least one); the rest are extrapolated from their mean.
- `after`: the evaluator's path now (`monitor.metrics.replicates.alert_replicates`): each
  replicate computes only the alerting keys; an exact window's replicates walk every pair, a
  sampled window's share `stderr_pair_samples` pairs (default 500,000; 100,000 measured too)
  drawn once by class id, compared with the window's value on those pairs (one more pair-only
  evaluation, "reference").

"replicate metrics" is the time inside the replicates' metrics, "streaming" the time spent
subtracting and adding back the groups' statistics (here generated again from their seeds; in
production read twice from Redis). "amortised": the jackknife runs once per stderr_interval /
evaluation_interval = 600 s / 60 s = 10 evaluations (those between carry its relative errors).

**Pair noise** (`--noise`, default 2,000 x 256, 8,000 x 64, 30,000 x 64): jackknife standard
errors of the two pair keys among the alerting keys (`nc1_cdnv_unbiased`,
`nc2_equiangularity_std`) with replicates that (a) walk every pair exactly, (b) share P pairs
drawn once (the evaluator now, for a sampled window), (c) draw P pairs each by position in their
own class list, as before (a replicate that lost a class draws other pairs from there on), each
over `--draws` pair seeds. Reported: se / exact se (mean and spread over the draws), and the
pair noise of the replicate differences, rms over replicates and draws of (theta_g - theta)_P -
(theta_g - theta)_exact, over the rms of the exact differences about their mean.

**Coverage** (`--coverage`, default 8,000 x 64, `--windows` 30, `--coverage-pairs` 100,000):
independent windows of one model (same class means, other traffic), pair metrics sampled as a
window above max_exact_classes has them; the error the evaluator reports, hypot(jackknife se,
`<key>_stderr`), against the spread of the values across windows.

Synthetic window: class means mu_c ~ 0.5 N(0, 1) offset + N(0, I_d) (float32); in group g
class c has n_gc ~ Poisson(8 K p_c / G) samples with Zipf-like shares p_c ~ 1 / (c + 10) (8 K
samples in the window; the tail classes have one or two, so a replicate loses some of the
classes min_count = 2 keeps), sum s_gc = n mu_c + 0.5 sqrt(n) N(0, I_d) (the exact
distribution of a sum of n samples mu_c + 0.5 N(0, I_d)), q_gc = ||s_gc||^2 / n + 0.25 d (n - 1).
Each group's draws come from its own seeds, so a group streams the same statistics every time.
The second moment is sum_c s_c s_c^T / n_c + 0.25 (N - K') I over the first 4,096 classes,
scaled to all (its content does not change the cost); each group carries 1/G of it. NC4
counts: 90% of each group's samples. Head: mu_c + 0.1 N(0, I_d) in float32, bias 0.01 N(0, 1).

    .venv/bin/python benchmarks/bench_jackknife.py                  # everything, default sizes
    .venv/bin/python benchmarks/bench_jackknife.py --sizes 2000x256 --noise '' --coverage ''
    .venv/bin/python benchmarks/bench_jackknife.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_scale_eval import gemm_gflops  # noqa: E402

from monitor.metrics import compute_metrics  # noqa: E402
from monitor.metrics.engine import ClassPairs  # noqa: E402
from monitor.metrics.jackknife import (  # noqa: E402
    NC4_KEY,
    Group,
    Part,
    SecondBlock,
    apply_part,
    jackknife,
)
from monitor.metrics.replicates import PAIR_KEYS, alert_replicates  # noqa: E402
from monitor.metrics.report import ALERT_STDERR_KEYS  # noqa: E402
from monitor.stats import CollapseStats  # noqa: E402
from monitor.stats.fields import Globals, Rows  # noqa: E402

F64 = torch.float64
GROUPS = 8
TILE = 2048
OPTIONS: dict[str, Any] = {
    "min_count": 2,
    "max_exact_classes": 30_000,
    "pair_samples": 500_000,
    "seed": 0,
    "tile_size": 512,
}
STDERR_PAIRS = 500_000  # stderr_pair_samples' default (pair_samples')
SMALL_STDERR_PAIRS = 100_000  # a cheaper setting, measured beside it
SAMPLES_PER_CLASS = 8
AMORTISED = 60.0 / 600.0  # evaluation_interval / stderr_interval, the defaults
Metrics = dict[str, float | int | None]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- synthetic window
class SyntheticWindow:
    """Class means and G groups whose statistics are generated again from seeds at each read."""

    def __init__(self, k: int, d: int, seed: int, traffic: int | None = None) -> None:
        """`seed` draws the model (class means, head); `traffic` (default `seed`) the window."""
        self.k, self.d = k, d
        self.seed = seed if traffic is None else 7_777_777 + traffic
        gen = torch.Generator().manual_seed(seed)
        offset = 0.5 * torch.randn(d, generator=gen)
        self.mu = torch.empty(k, d, dtype=torch.float32)
        for a in range(0, k, TILE):
            b = min(a + TILE, k)
            self.mu[a:b] = offset + torch.randn(b - a, d, generator=gen)
        self.counts = torch.stack([self._counts(g) for g in range(GROUPS)])  # (G, K)
        self.totals = self.counts.sum(dim=0)
        self.second_share: torch.Tensor | None = None

    def _counts(self, g: int) -> torch.Tensor:
        """Poisson counts of Zipf rates (class c's share ~ 1 / (c + 10)), 8 K samples a window."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 17 * g + 1)
        share = 1.0 / (torch.arange(self.k, dtype=F64) + 10.0)
        rate = share * (SAMPLES_PER_CLASS * self.k / GROUPS / float(share.sum()))
        return torch.poisson(rate, generator=gen).to(torch.int64)

    def rows(self, g: int) -> Iterator[Rows]:
        """Group g's class rows, a tile of classes at a time (the same at every call)."""
        counts = self.counts[g]
        for a in range(0, self.k, TILE):
            b = min(a + TILE, self.k)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * g + a + 2)
            n = counts[a:b]
            noise = torch.randn(b - a, self.d, generator=gen).to(F64)
            nf = n.to(F64)
            sums = nf[:, None] * self.mu[a:b].to(F64) + noise.mul_(0.5 * nf.sqrt()[:, None])
            q = (sums * sums).sum(dim=1) / nf.clamp_min(1.0) + 0.25 * self.d * (nf - 1.0).clamp_min(
                0
            )
            keep = n > 0
            ids = torch.arange(a, b)[keep]
            yield Rows(ids, n[keep].clone(), q[keep], sums[keep])

    def globals_of(self, g: int, unit_sum: np.ndarray) -> Globals:
        samples = int(self.counts[g].sum())
        counters = {
            "sample_count": samples,
            "unit_count": samples,
            "nc4_hits": int(0.9 * samples),
            "nc4_total": samples,
        }
        return Globals(self.k, self.d, True, None, counters, 0.0, unit_sum, None)

    def parts(self, g: int) -> Iterator[Part]:
        """Group g as the store streams it: globals, rows, second-moment blocks."""
        assert self.second_share is not None
        yield self.globals_of(g, self.unit_shares[g])
        yield from self.rows(g)
        step = max(1, (8 << 20) // (8 * self.d))
        for a in range(0, self.d, step):
            yield SecondBlock(a, self.second_share[a : a + step])

    def build(self) -> CollapseStats:
        """The window: every class with samples slotted, then the G groups added."""
        stats = CollapseStats(num_classes=self.k, dim=self.d, second_moment=True)
        used = torch.nonzero(self.totals > 0).squeeze(1)
        stats._reserve(int(used.numel()))
        stats._slots_for(used)
        # Unit-vector sums: each sample's direction is about its class mean's.
        unit = torch.zeros(GROUPS, self.d, dtype=F64)
        for a in range(0, self.k, TILE):
            mu = self.mu[a : a + TILE].to(F64)
            unit += self.counts[:, a : a + TILE].to(F64) @ (mu / mu.norm(dim=1, keepdim=True))
        self.unit_shares = [unit[g].numpy() for g in range(GROUPS)]
        self.second_share = torch.zeros(self.d, self.d, dtype=F64)
        for g in range(GROUPS):
            apply_part(stats, self.globals_of(g, self.unit_shares[g]), 1)
            for rows in self.rows(g):
                apply_part(stats, rows, 1)
        kept = stats.classes(min_count=1)
        m = min(kept.num_classes, 4096)
        s = kept.sum_tile(0, m)
        n = kept.counts[:m].to(F64)
        scaled = s / n.sqrt()[:, None]
        second = (scaled.T @ scaled) * (kept.num_classes / m)
        second.diagonal().add_(0.25 * float(stats.sample_count - kept.num_classes))
        self.second_share = second / GROUPS
        assert stats.second is not None
        stats.second += second
        return stats

    def groups(self) -> list[Group]:
        return [Group(lambda g=g: self.parts(g)) for g in range(GROUPS)]

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 5)  # the head: of this traffic seed
        weight = torch.empty_like(self.mu)
        for a in range(0, self.k, TILE):
            b = min(a + TILE, self.k)
            weight[a:b] = self.mu[a:b] + 0.1 * torch.randn(b - a, self.d, generator=gen)
        return weight, 0.01 * torch.randn(self.k, generator=gen)


class Clock:
    """Wall and CPU seconds (this process: with one torch thread, the work done; on a shared
    machine the wall time also holds the waits for a core)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._started = (0.0, 0.0)

    def start(self) -> Clock:
        self._started = (time.perf_counter(), time.process_time())
        return self

    def stop(self) -> Clock:
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]
        return self

    def as_dict(self) -> dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu}


class Timed:
    """Wraps the groups' reads and the replicates' metrics to split a jackknife's time."""

    def __init__(self) -> None:
        self.stream = Clock()
        self.metrics = Clock()
        self.replicates = 0

    def group(self, group: Group) -> Group:
        def read() -> Iterator[Part]:
            parts = group.read()
            while True:
                self.stream.start()
                part = next(parts, None)
                self.stream.stop()
                if part is None:
                    return
                self.stream.start()
                yield part  # the jackknife applies it while we wait: streaming too
                self.stream.stop()

        return Group(read)

    def evaluate(self, inner: Any) -> Any:
        def run(stats: CollapseStats) -> Any:
            self.metrics.start()
            out = inner(stats)
            self.metrics.stop()
            self.replicates += 1
            return out

        return run


def replicate_compute(
    stats: CollapseStats, pairs: ClassPairs | None, keys: Sequence[str]
) -> Metrics:
    """The evaluator's `_replicate_metrics` with the default options."""
    return dict(compute_metrics(stats, keys=keys, pairs=pairs, **OPTIONS).as_dict())


def old_replicate(stats: CollapseStats) -> Metrics:
    """The first shipped evaluator's replicate: every metric, pairs drawn afresh."""
    values = dict(compute_metrics(stats, **OPTIONS).as_dict())
    values[NC4_KEY] = stats.nc4_hits / stats.nc4_total if stats.nc4_total else None
    return values


# --------------------------------------------------------------------------- cost child
def run_cost(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    k, d = spec["k"], spec["d"]
    setup = Clock().start()
    window = SyntheticWindow(k, d, spec["seed"])
    stats = window.build()
    weight, bias = window.head()
    setup.stop()
    gflops = gemm_gflops()
    log(f"   set-up {setup.wall:.0f} s; GEMM {gflops:.0f} GFLOP/s")

    evaluation = Clock().start()
    report = compute_metrics(stats, weight, bias, **OPTIONS)
    evaluation.stop()
    full = dict(report.as_dict())
    log(f"   evaluation {evaluation.wall:.1f} s (exact pairs: {report.exact_pairs})")

    # Before: full replicates, as many as the budget allows (one at least).
    before = Timed()
    groups = window.groups()
    done = 0
    old = before.evaluate(old_replicate)
    t0 = time.perf_counter()
    while done < GROUPS and (done == 0 or time.perf_counter() - t0 < spec["before_budget"]):
        # One group at a time: subtract, evaluate, add back (what jackknife() does per group).
        jackknife(stats, [before.group(groups[done]), _empty()], old, full, ALERT_STDERR_KEYS)
        done += 1
    log(f"   before: {done} of {GROUPS} replicates in {time.perf_counter() - t0:.1f} s")

    afters = []
    for pairs in [STDERR_PAIRS] + ([] if report.exact_pairs else [SMALL_STDERR_PAIRS]):
        after = Timed()
        total = Clock().start()
        reference = Clock().start()
        evaluate, values = alert_replicates(
            stats,
            full,
            replicate_compute,
            sampled=not report.exact_pairs,
            pair_samples=pairs,
            seed=OPTIONS["seed"],
            min_count=OPTIONS["min_count"],
        )
        reference.stop()
        result = jackknife(
            stats,
            [after.group(g) for g in groups],
            after.evaluate(evaluate),
            values,
            ALERT_STDERR_KEYS,
        )
        total.stop()
        log(f"   after ({pairs:,} pairs): {total.wall:.1f} s")
        afters.append(
            {
                "pairs": pairs,
                "total": total.as_dict(),
                "reference": reference.as_dict(),
                "metrics": after.metrics.as_dict(),
                "stream": after.stream.as_dict(),
                "stderrs": result.stderrs,
            }
        )
    return {
        **spec,
        "classes": report.class_count,
        "samples": stats.sample_count,
        "exact": report.exact_pairs,
        "setup": setup.as_dict(),
        "gflops": gflops,
        "evaluation": evaluation.as_dict(),
        "before_done": done,
        "before_metrics": before.metrics.as_dict(),
        "before_stream": before.stream.as_dict(),
        "afters": afters,
        "values": {key: full.get(key) for key in ALERT_STDERR_KEYS},
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _empty() -> Group:
    """A group with nothing in it: `jackknife` needs two groups, this one adds no replicate."""

    def read() -> Iterator[Part]:
        return iter(())

    return Group(read)


# --------------------------------------------------------------------------- noise child
def run_noise(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    k, d = spec["k"], spec["d"]
    window = SyntheticWindow(k, d, spec["seed"])
    stats = window.build()
    groups = window.groups()
    exact_options = {**OPTIONS, "max_exact_classes": k}
    report = compute_metrics(stats, keys=PAIR_KEYS, **exact_options)
    full, kept = dict(report.as_dict()), report.class_count

    def exact(replicate: CollapseStats) -> Metrics:
        return dict(compute_metrics(replicate, keys=PAIR_KEYS, **exact_options).as_dict())

    t0 = time.perf_counter()
    base = jackknife(stats, groups, exact, full, PAIR_KEYS)
    log(f"   exact jackknife {time.perf_counter() - t0:.1f} s")
    rows = []
    for pairs in spec["pairs"]:
        for method in ("shared", "by position"):
            ses: dict[str, list[float]] = {key: [] for key in PAIR_KEYS}
            noise: dict[str, list[float]] = {key: [] for key in PAIR_KEYS}
            for seed in range(1, spec["draws"] + 1):
                if method == "shared":

                    def compute(
                        s: CollapseStats, p: ClassPairs | None, keys: Sequence[str]
                    ) -> Metrics:
                        return dict(
                            compute_metrics(s, keys=keys, pairs=p, **exact_options).as_dict()
                        )

                    evaluate, ref = alert_replicates(
                        stats, full, compute, sampled=True, pair_samples=pairs, seed=seed,
                        min_count=2, keys=PAIR_KEYS,
                    )  # fmt: skip
                else:
                    sampled = {
                        **OPTIONS,
                        "max_exact_classes": 1,
                        "pair_samples": pairs,
                        "seed": seed,
                    }

                    def evaluate(s: CollapseStats, o: dict[str, Any] = sampled) -> Metrics:
                        return dict(compute_metrics(s, keys=PAIR_KEYS, **o).as_dict())

                    ref = evaluate(stats)
                result = jackknife(stats, groups, evaluate, ref, PAIR_KEYS)
                for key in PAIR_KEYS:
                    ses[key].append(result.stderrs[key] / base.stderrs[key])
                    diff = [float(r) - float(ref[key]) for r in result.replicates[key]]  # type: ignore[arg-type]
                    exact_diff = [float(r) - float(full[key]) for r in base.replicates[key]]  # type: ignore[arg-type]
                    noise[key] += [(a - b) ** 2 for a, b in zip(diff, exact_diff, strict=True)]
            for key in PAIR_KEYS:
                exact_diff = np.array([float(r) - float(full[key]) for r in base.replicates[key]])  # type: ignore[arg-type]
                spread = float(np.sqrt(np.mean((exact_diff - exact_diff.mean()) ** 2)))
                rows.append(
                    {
                        "key": key,
                        "pairs": pairs,
                        "method": method,
                        "se_ratio_mean": float(np.mean(ses[key])),
                        "se_ratio_std": float(np.std(ses[key], ddof=1))
                        if len(ses[key]) > 1
                        else 0.0,
                        "noise_ratio": math.sqrt(float(np.mean(noise[key]))) / spread,
                    }
                )
            log(f"   {method} {pairs:,} pairs done")
    return {
        **spec,
        "classes": kept,
        "exact_se": base.stderrs,
        "full": {key: full[key] for key in PAIR_KEYS},
        "rows": rows,
    }


# --------------------------------------------------------------------------- coverage child
def run_coverage(spec: dict[str, Any]) -> dict[str, Any]:
    """Independent windows of one model, sampled pairs: is the error the evaluator reports,
    hypot(jackknife, pair-sampling stderr), the spread of the values across windows?"""
    torch.set_num_threads(spec["threads"])
    k, d, pairs = spec["k"], spec["d"], spec["pairs"]
    sampled = {**OPTIONS, "max_exact_classes": 1, "pair_samples": pairs}
    exact_options = {**OPTIONS, "max_exact_classes": k}
    names = ("value", "new", "old", "exact", "exact_se")
    out: dict[str, dict[str, list[float]]] = {key: {n: [] for n in names} for key in PAIR_KEYS}

    def compute(s: CollapseStats, p: ClassPairs | None, keys: Sequence[str]) -> Metrics:
        return dict(compute_metrics(s, keys=keys, pairs=p, **OPTIONS).as_dict())

    def by_position(s: CollapseStats) -> Metrics:
        return dict(compute_metrics(s, keys=PAIR_KEYS, **sampled).as_dict())

    def exact(s: CollapseStats) -> Metrics:
        return dict(compute_metrics(s, keys=PAIR_KEYS, **exact_options).as_dict())

    for w in range(spec["windows"]):
        window = SyntheticWindow(k, d, spec["seed"], traffic=w)
        stats = window.build()
        groups = window.groups()
        report = compute_metrics(stats, keys=PAIR_KEYS, **sampled)  # the snapshot's values
        full = dict(report.as_dict())
        evaluate, ref = alert_replicates(
            stats, full, compute, sampled=True, pair_samples=pairs, seed=OPTIONS["seed"],
            min_count=2, keys=PAIR_KEYS,
        )  # fmt: skip
        new = jackknife(stats, groups, evaluate, ref, PAIR_KEYS)
        old = jackknife(stats, groups, by_position, full, PAIR_KEYS)
        exact_full = exact(stats)
        base = jackknife(stats, groups, exact, exact_full, PAIR_KEYS)
        for key in PAIR_KEYS:
            pair_se = float(report.value(f"{key}_stderr") or 0.0)
            out[key]["value"].append(float(full[key]))  # type: ignore[arg-type]
            out[key]["new"].append(math.hypot(new.stderrs[key], pair_se))
            out[key]["old"].append(math.hypot(old.stderrs[key], pair_se))
            out[key]["exact"].append(float(exact_full[key]))  # type: ignore[arg-type]
            out[key]["exact_se"].append(base.stderrs[key])
        log(f"   window {w + 1} of {spec['windows']}")
    return {**spec, "classes": report.class_count, "out": out}


# --------------------------------------------------------------------------- parent
def spawn(mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(spec)]
    log(f"-- {mode} K={spec['k']:,} d={spec['d']:,}")
    try:  # the child's progress goes straight to stderr
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**spec, "error": f"exit {proc.returncode} (its stderr above)"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            k, d = item.lower().split("x")
            out.append((int(k), int(d)))
    return out


def print_cost(results: list[dict[str, Any]], threads: int) -> None:
    print(
        f"### Cost of a jackknife (G = {GROUPS}) beside one evaluation\n\n"
        f"{threads} torch thread(s), {os.cpu_count()} cores; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end. GEMM = a 1024^3 float64 product timed before the "
        "steps (about 40 GFLOP/s on one quiet core). CPU = this process's CPU seconds (the "
        "work, with one thread), wall = elapsed (also the waits for a core on a shared "
        "machine); x = CPU seconds over the evaluation's; amortised = the jackknife once per 10 "
        "evaluations (stderr_interval 600 s, evaluation_interval 60 s).\n"
    )
    print(
        "| K (kept) | d | window's pairs | GEMM GFLOP/s | evaluation CPU s (wall) | jackknife "
        "| CPU s: replicate metrics + streaming [+ reference] = total (wall) | x evaluation "
        "| amortised x | peak RSS MiB |"
    )
    print("|---:|---:|---|---:|---:|---|---|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['k']:,} | {r['d']:,} | - | - | - | {r['error']} | - | - | - | - |")
            continue
        ev, n = r["evaluation"], r["before_done"]
        pairs = "exact" if r["exact"] else f"{OPTIONS['pair_samples']:,} sampled"
        lead = (
            f"| {r['k']:,} ({r['classes']:,}) | {r['d']:,} | {pairs} | {r['gflops']:.0f} "
            f"| {ev['cpu']:.2f} ({ev['wall']:.2f}) |"
        )
        scale = GROUPS / n
        metrics, stream = r["before_metrics"], r["before_stream"]
        cpu = (metrics["cpu"] + stream["cpu"]) * scale
        wall = (metrics["wall"] + stream["wall"]) * scale
        measured = "" if n == GROUPS else f"; {n} of {GROUPS} replicates measured, x {scale:g}"
        print(
            f"{lead} before: every metric, pairs by position | {metrics['cpu'] * scale:.2f} + "
            f"{stream['cpu'] * scale:.2f} = {cpu:.2f} ({wall:.2f}{measured}) "
            f"| {cpu / ev['cpu']:.2f}x | {cpu / ev['cpu'] * AMORTISED:.3f}x "
            f"| {r['maxrss_mib']:,.0f} |"
        )
        for a in r["afters"]:
            how = "every pair" if r["exact"] else f"{a['pairs']:,} shared pairs"
            total = a["total"]
            print(
                f"{lead} after: alerting keys, {how} | {a['metrics']['cpu']:.2f} + "
                f"{a['stream']['cpu']:.2f} + {a['reference']['cpu']:.2f} = {total['cpu']:.2f} "
                f"({total['wall']:.2f}) | {total['cpu'] / ev['cpu']:.2f}x "
                f"| {total['cpu'] / ev['cpu'] * AMORTISED:.3f}x | |"
            )
    print()
    shown = [r for r in results if "error" not in r]
    if shown:
        print("Values and the after jackknifes' standard errors:\n")
        print("| K | d | key | value | jackknife se (after, each pair setting) |")
        print("|---:|---:|---|---:|---:|")
        for r in shown:
            for key in ALERT_STDERR_KEYS:
                value = r["values"].get(key)
                ses = [a["stderrs"].get(key) for a in r["afters"]]
                text = " / ".join("None" if v is None else f"{v:.4g}" for v in ses)
                shown_value = "None" if value is None else f"{value:.6g}"
                print(f"| {r['k']:,} | {r['d']:,} | `{key}` | {shown_value} | {text} |")
        print()


def print_noise(results: list[dict[str, Any]], draws: int) -> None:
    print(
        "### Pair noise of the replicates: shared pairs (now) against fresh pairs (before)\n\n"
        f"se / exact se over {draws} pair draws (mean +- std), and the pair noise of the "
        "replicate differences theta_g - theta (rms over replicates and draws of the sampled "
        "minus the exact difference) over the rms spread of the exact differences.\n"
    )
    print(
        "| K (kept) | d | key | exact se | pairs | replicates | se / exact se "
        "| pair noise / spread |"
    )
    print("|---:|---:|---|---:|---:|---|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['k']:,} | {r['d']:,} | {r['error'].replace('|', '/')} | | | | | |")
            continue
        for row in r["rows"]:
            print(
                f"| {r['k']:,} ({r['classes']:,}) | {r['d']:,} | `{row['key']}` "
                f"| {r['exact_se'][row['key']]:.3g} | {row['pairs']:,} | {row['method']} "
                f"| {row['se_ratio_mean']:.2f} +- {row['se_ratio_std']:.2f} "
                f"| {row['noise_ratio']:.2f} |"
            )
    print()


def print_coverage(results: list[dict[str, Any]]) -> None:
    print(
        "### Sampled pairs: the reported error against the spread across windows\n\n"
        "Independent windows of one model (the same class means, other traffic), pair metrics "
        "from sampled pairs (by position, seed 0, as the evaluator's). spread = the std of the "
        "values across windows; reported = the root mean square of hypot(jackknife se, "
        "`<key>_stderr`) with the jackknife's replicates on pairs shared by class id (now) or "
        "drawn by position (before); covered = share of windows within +-2.36 reported of the "
        "mean (t, 7 degrees of freedom; 95% expected). Exact: the all-pairs values and their "
        "exact jackknife.\n"
    )
    print(
        "| K (kept) | d | pairs | windows | key | spread | reported now (covered) "
        "| reported before (covered) | exact: spread | exact: jackknife rms (covered) |"
    )
    print("|---:|---:|---:|---:|---|---:|---|---|---:|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['k']:,} | {r['d']:,} | {r['error'].replace('|', '/')} | | | | | | | |")
            continue
        for key in PAIR_KEYS:
            o = {n: np.array(v) for n, v in r["out"][key].items()}
            cells = []
            for values, ses in ((o["value"], o["new"]), (o["value"], o["old"])):
                covered = float((np.abs(values - values.mean()) <= 2.365 * ses).mean())
                cells.append(f"{math.sqrt(float((ses**2).mean())):.3g} ({covered:.0%})")
            ex, ex_se = o["exact"], o["exact_se"]
            ex_cov = float((np.abs(ex - ex.mean()) <= 2.365 * ex_se).mean())
            ex_rms = math.sqrt(float((ex_se**2).mean()))
            print(
                f"| {r['k']:,} ({r['classes']:,}) | {r['d']:,} | {r['pairs']:,} | {r['windows']} "
                f"| `{key}` | {o['value'].std(ddof=1):.3g} | {cells[0]} | {cells[1]} "
                f"| {ex.std(ddof=1):.3g} | {ex_rms:.3g} ({ex_cov:.0%}) |"
            )
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="2000x256,128256x4096", help="cost: K x d, comma-separated")
    p.add_argument("--noise", default="2000x256,8000x64,30000x64", help="pair noise: K x d")
    p.add_argument("--pairs", default="10000,100000,500000", help="pair noise: P values")
    p.add_argument("--draws", type=int, default=4, help="pair noise: pair seeds per P")
    p.add_argument("--coverage", default="8000x64", help="sampled coverage: K x d sizes")
    p.add_argument("--coverage-pairs", type=int, default=100_000, help="coverage: pairs")
    p.add_argument("--windows", type=int, default=30, help="coverage: independent windows")
    p.add_argument("--before-budget", type=float, default=300.0, help="seconds for before")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the children")
    p.add_argument("--timeout", type=float, default=5400.0, help="per child, seconds")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        mode, spec = args.child
        run = {"cost": run_cost, "noise": run_noise, "coverage": run_coverage}[mode]
        print(json.dumps(run(json.loads(spec))))
        return 0
    if args.quick:
        args.sizes, args.noise, args.pairs, args.draws = "600x32", "400x16", "2000,20000", 2
        args.coverage, args.coverage_pairs, args.windows = "400x16", 5_000, 4
    cost = [
        spawn("cost", {"k": k, "d": d, "seed": args.seed, "before_budget": args.before_budget,
                       "threads": args.threads}, args.timeout)
        for k, d in sizes(args.sizes)
    ]  # fmt: skip
    pairs = [int(v) for v in args.pairs.split(",") if v.strip()]
    noise = [
        spawn("noise", {"k": k, "d": d, "seed": args.seed, "pairs": pairs, "draws": args.draws,
                        "threads": args.threads}, args.timeout)
        for k, d in sizes(args.noise)
    ]  # fmt: skip
    coverage = [
        spawn("coverage", {"k": k, "d": d, "seed": args.seed, "pairs": args.coverage_pairs,
                           "windows": args.windows, "threads": args.threads}, args.timeout)
        for k, d in sizes(args.coverage)
    ]  # fmt: skip
    if cost:
        print_cost(cost, args.threads)
    if noise:
        print_noise(noise, args.draws)
    if coverage:
        print_coverage(coverage)
    return 1 if any("error" in r for r in cost + noise + coverage) else 0


if __name__ == "__main__":
    raise SystemExit(main())
