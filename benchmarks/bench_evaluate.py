"""Evaluation time and peak memory of the full metric set, and of the pairwise part alone.

For K classes at d = 768 (and 4,096 for small K), each measurement runs in a fresh subprocess
(this script with `--child`), which builds synthetic statistics, then measures one step:

- `full`: `compute_metrics` with the classifier and bias, the second moment (trace ratio,
  effective rank) and NC4 on 20,000 evaluation samples; exact pairs (`max_exact_classes` above
  K) or sampled pairs (`pair_samples` = 500,000) with standard errors;
- `pairs`: the pairwise metrics alone (`exact_pair_metrics` / `sampled_pair_metrics`), the part
  a direct implementation is compared with;
- `direct`: a direct implementation that materialises the K x K matrices in float64 (Gram,
  squared distances, variance sums, CDNV, CDNV2, cosines, log energy) and reduces their upper
  triangles, as reference neural-collapse code does. Run only where it fits in memory.

Peak memory is that of the measured step alone: after the set-up, free heap memory is returned
to the OS (`malloc_trim`), "5" is written to /proc/self/clear_refs to reset VmHWM, and the step's
peak is VmHWM after it minus VmRSS before it.

Synthetic data: class means ~ N(0, I_d), samples = mean + N(0, 0.5^2 I_d), `--per-class` samples
per class (default 3), labels 0..K-1, classifier = means + N(0, 0.1^2 I_d), zero bias, 20,000
evaluation samples from uniformly drawn classes. The statistics are built with `update()` in
batches of 8,192 samples; the same seed gives the same statistics in every subprocess, so exact
and sampled values of one K are of the same data.

Prints Markdown tables on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor import CollapseStats, compute_metrics
from monitor.metrics.pairwise import PairInputs, exact_pair_metrics, sampled_pair_metrics

PAIR_KEYS = (
    "nc1_cdnv",
    "nc1_cdnv2",
    "nc2_equiangularity_mean",
    "nc2_equiangularity_std",
    "nc2_log_energy_mean",
    "nc2_log_energy_std",
)
F64 = torch.float64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child side
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_stats(
    k: int, dim: int, per_class: int, second_moment: bool, seed: int, device: str = "cpu"
) -> tuple[CollapseStats, torch.Tensor]:
    """Synthetic statistics of K classes on `device`; returns them and the class means used
    (on the CPU: the data are drawn there, so every device sees the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=gen)
    stats = CollapseStats(num_classes=k, dim=dim, second_moment=second_moment, device=device)
    labels = torch.arange(k).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    for start in range(0, labels.numel(), 8192):
        y = labels[start : start + 8192]
        x = means[y] + 0.5 * torch.randn(y.numel(), dim, generator=gen)
        stats.update(x, y)
    return stats, means


def pair_inputs(stats: CollapseStats, min_count: int) -> PairInputs:
    """The PairInputs compute_metrics builds: centred class means, variances, squared norms."""
    kept = stats.classes(min_count=min_count)
    means = kept.means()
    centred = means - means.mean(dim=0)
    norms = centred.norm(dim=1)
    return PairInputs(centred, kept.variances(), norms * norms)


def direct_pair_metrics(inputs: PairInputs) -> dict[str, float]:
    """The K x K way: every pairwise matrix in full, then the upper triangle of each."""
    m, var, sq = inputs.centred, inputs.variances, inputs.sq_norms
    k = m.shape[0]
    gram = m @ m.T
    dist2 = sq[:, None] + sq[None, :] - 2.0 * gram
    var_sum = var[:, None] + var[None, :]
    upper = torch.ones(k, k, dtype=torch.bool, device=m.device).triu(diagonal=1)
    cdnv = var_sum / (2.0 * dist2)
    cdnv2 = cdnv / dist2
    norms = sq.sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    log_energy = -0.5 * torch.log(2.0 - 2.0 * cos)
    c, le = cos[upper], log_energy[upper]
    return {
        "nc1_cdnv": float(cdnv[upper].mean()),
        "nc1_cdnv2": float(cdnv2[upper].mean()),
        "nc2_equiangularity_mean": float(c.mean()),
        "nc2_equiangularity_std": float(c.std(correction=0)),
        "nc2_log_energy_mean": float(le.mean()),
        "nc2_log_energy_std": float(le.std(correction=0)),
    }


# Parts of compute_metrics timed inside the full step: wrappers around the names the engine
# module calls (a name the engine no longer has is simply not reported).
TIMED_PARTS = {
    "exact_pair_metrics": "pairs",
    "sampled_pair_metrics": "pairs",
    "nc4_from_samples": "nc4",
    "trace_ratio": "trace ratio",
    "effective_rank": "eff. rank",
}


def install_part_timers() -> dict[str, float]:
    """Wrap the engine's helpers with timers; returns the dict they add seconds to."""
    from monitor.metrics import engine

    spent: dict[str, float] = {}
    for name, part in TIMED_PARTS.items():
        inner = getattr(engine, name, None)
        if inner is None:
            continue

        def timed(*a: Any, _inner: Any = inner, _part: str = part, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[_part] = spent.get(_part, 0.0) + time.perf_counter() - t0

        setattr(engine, name, timed)
    return spent


def prepare(spec: dict[str, Any]) -> Callable[[], tuple[dict[str, Any], dict[str, Any]]]:
    """Build the inputs of one measurement; returns the step, which gives (values, stderr)."""
    k, dim, step, mode = spec["k"], spec["dim"], spec["step"], spec["mode"]
    device = spec.get("device", "cpu")
    full = step == "full"
    stats, means = build_stats(
        k, dim, spec["per_class"], second_moment=full, seed=spec["seed"], device=device
    )
    if full:
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        classifier = (means + 0.1 * torch.randn(k, dim, generator=gen)).to(device)
        bias = torch.zeros(k, device=device)
        rows = torch.randint(0, k, (spec["eval_samples"],), generator=gen)
        eval_features = (means[rows] + 0.5 * torch.randn(rows.numel(), dim, generator=gen)).to(
            device
        )

        def run_full() -> tuple[dict[str, Any], dict[str, Any]]:
            report = compute_metrics(
                stats,
                classifier=classifier,
                bias=bias,
                min_count=spec["min_count"],
                max_exact_classes=k + 1 if mode == "exact" else k - 1,
                pair_samples=spec["pair_samples"],
                eval_features=eval_features,
                nc4_max_samples=spec["eval_samples"],
                seed=0,
                device=device,
                tile_size=spec["tile"],
            )
            if report.exact_pairs != (mode == "exact"):
                raise SystemExit(f"asked for {mode} pairs, got exact_pairs={report.exact_pairs}")
            flat = report.as_dict()
            values = {key: v for key, v in flat.items() if not key.endswith("_stderr")}
            return values, {key: flat.get(key + "_stderr") for key in PAIR_KEYS}

        return run_full

    inputs = pair_inputs(stats, spec["min_count"])

    def run_pairs() -> tuple[dict[str, Any], dict[str, Any]]:
        if step == "direct":
            return dict(direct_pair_metrics(inputs)), {}
        if mode == "exact":
            est = exact_pair_metrics(inputs, tile=spec["tile"])
        else:
            est = sampled_pair_metrics(inputs, samples=spec["pair_samples"], seed=0)
        return {key: est[key].value for key in PAIR_KEYS}, {
            key: est[key].stderr for key in PAIR_KEYS
        }

    return run_pairs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_gflops(device: str = "cpu") -> float:
    """Float64 GEMM rate right now: how much of the (shared, noisy) machine this row got."""
    a = torch.randn(1024, 1024, dtype=F64, device=device)
    a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    sync(device)
    return 4 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    # Warm-up on a tiny problem of the same kind: thread pools, first-call dispatch, imports.
    warm = {**spec, "k": min(spec["k"], 512), "pair_samples": 1000, "eval_samples": 100}
    spent = install_part_timers()
    prepare(warm)()
    started = time.perf_counter()
    step = prepare(spec)
    setup_s = time.perf_counter() - started
    spent.clear()

    device = spec.get("device", "cpu")
    on_gpu = device.startswith("cuda")
    gflops = gemm_gflops(device)
    trim_heap()
    rss_before = proc_status_kib("VmRSS")
    can_reset = reset_peak()
    if on_gpu:  # on a GPU the peak is the CUDA allocator's, not the process RSS
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    values, stderr = step()
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = proc_status_kib("VmHWM") if can_reset else None
    if on_gpu:
        rss_before = gpu_before // 1024
        peak_kib = torch.cuda.max_memory_allocated() // 1024
    return {
        **spec,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "gemm_gflops": gflops,
        "setup_seconds": setup_s,
        "rss_before_mib": rss_before / 1024,
        "peak_delta_mib": None if peak_kib is None else (peak_kib - rss_before) / 1024,
        "values": values,
        "stderr": stderr,
        "parts": dict(spent),
    }


# -------------------------------------------------------------------------- parent side
def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "per_class": args.per_class,
        "min_count": 2,
        "pair_samples": args.pair_samples,
        "eval_samples": args.eval_samples,
        "tile": args.tile,
        "seed": 0,
        "device": args.device,
    }
    specs: list[dict[str, Any]] = []

    def add(k: int, dim: int, step: str, mode: str) -> None:
        specs.append({**base, "k": k, "dim": dim, "step": step, "mode": mode})

    for dim, ks in ((args.dim, args.ks), (args.large_dim, args.large_ks)):
        for k in ks:
            if dim == args.dim or k <= args.large_full_max_k:
                add(k, dim, "full", "exact")
            if k <= args.pairs_max_k:
                add(k, dim, "pairs", "exact")
            if k <= args.direct_max_k:
                add(k, dim, "direct", "exact")
            if k in args.sampled_ks and dim == args.dim:
                add(k, dim, "full", "sampled")
                add(k, dim, "pairs", "sampled")
    return specs


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def fmt_s(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


STEP_LABEL = {
    ("full", "exact"): "compute_metrics, exact pairs",
    ("full", "sampled"): "compute_metrics, sampled pairs",
    ("pairs", "exact"): "pairwise only, exact (tiled)",
    ("pairs", "sampled"): "pairwise only, sampled",
    ("direct", "exact"): "direct K x K (float64)",
}


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cores = os.cpu_count()
    if args.device != "cpu":
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device
        print(
            f"Device {args.device} ({name}): seconds include a synchronize; peak = "
            "torch.cuda.max_memory_allocated during the step minus memory_allocated before "
            "it (GPU memory, not RSS); the GEMM gauge is the GPU's float64 rate."
        )
        print()
    print(
        f"Evaluation, {args.per_class} samples per class, min_count 2, tile {args.tile}, "
        f"{args.eval_samples:,} NC4 evaluation samples, {args.pair_samples:,} sampled pairs, "
        f"{torch.get_num_threads()} torch threads on {cores} cores. One fresh process per row; "
        "seconds = wall clock, CPU s = process CPU time (user + system, all threads: about "
        f"{torch.get_num_threads()}x the wall time when the cores are not shared); GEMM GFLOP/s = "
        "a 1024^3 float64 matrix product timed just before the step, a gauge of how much of "
        "this shared machine the row got; "
        "peak = VmHWM during the step minus VmRSS before it; K x d float64 = the size of one "
        "class-mean matrix, K x K float64 = one pairwise matrix."
    )
    print()
    print(
        "| K | d | step | seconds | CPU s | GEMM GFLOP/s | peak MiB | K x d f64 MiB "
        "| K x K f64 MiB | note |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        kd = r["k"] * r["dim"] * 8 / 2**20
        kk = r["k"] * r["k"] * 8 / 2**20
        label = STEP_LABEL[(r["step"], r["mode"])]
        if "error" in r:
            err = str(r["error"]).replace("|", "/")
            print(
                f"| {r['k']:,} | {r['dim']:,} | {label} | - | - | - | - | {kd:,.0f} | {kk:,.0f} "
                f"| {err} |"
            )
            continue
        note = ""
        if r["step"] == "full":
            note = ", ".join(f"{part} {fmt_s(t)} s" for part, t in r.get("parts", {}).items())
        if r["step"] == "direct":
            ref = find(results, r["k"], r["dim"], "pairs", "exact")
            if ref is not None and "error" not in ref:
                note = (
                    f"{r['seconds'] / ref['seconds']:.1f}x the tiled time, "
                    f"{r['peak_delta_mib'] / max(ref['peak_delta_mib'], 1):.0f}x its peak; "
                    f"max rel. diff {max_rel_diff(r['values'], ref['values']):.0e}"
                )
        print(
            f"| {r['k']:,} | {r['dim']:,} | {label} | {fmt_s(r['seconds'])} "
            f"| {fmt_s(r['cpu_seconds'])} | {r['gemm_gflops']:.0f} "
            f"| {fmt_mib(r['peak_delta_mib'])} | {kd:,.0f} "
            f"| {kk:,.0f} | {note} |"
        )
    print()
    sampled = [r for r in results if r["mode"] == "sampled" and r["step"] == "full"]
    sampled = [r for r in sampled if "error" not in r]
    if sampled:
        print(
            "Sampled against exact (compute_metrics, same statistics), per key: the exact value, "
            "the sampled estimate, its stderr, and "
            "z = |sampled - exact| / stderr (|z| < 2 about 95% of the time if the stderr is "
            "right)."
        )
        print()
        print("| K | d | key | exact | sampled | stderr | z |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        for r in sampled:
            ref = find(results, r["k"], r["dim"], r["step"], "exact")
            if ref is None or "error" in ref:
                continue
            for key in PAIR_KEYS:
                ex, sv, se = ref["values"][key], r["values"][key], r["stderr"].get(key)
                z = abs(sv - ex) / se if se else math.inf
                print(
                    f"| {r['k']:,} | {r['dim']:,} | `{key}` | {ex:.6g} | {sv:.6g} "
                    f"| {se:.2g} | {z:.2f} |"
                )
        print()
    print_goals(results, args)


def print_goals(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One line per goal of the benchmark issue, with the measured figure."""
    d = args.dim
    lines = []
    for step, mode in (("full", "exact"), ("pairs", "exact"), ("direct", "exact")):
        rows = [
            r
            for r in results
            if (r["step"], r["mode"], r["dim"]) == (step, mode, d) and "error" not in r
        ]
        if not rows or rows[0]["peak_delta_mib"] is None:
            continue
        peaks = ", ".join(
            f"K = {r['k']:,}: {r['peak_delta_mib']:,.0f} MiB = "
            f"{r['peak_delta_mib'] / (r['k'] * d * 8 / 2**20):.1f} K d f64 = "
            f"{r['peak_delta_mib'] / (r['k'] ** 2 * 8 / 2**20):.2f} K^2 f64"
            for r in rows
        )
        lines.append(f"Peak memory, {STEP_LABEL[(step, mode)]}, d = {d}: {peaks}.")
    for k in (30_000,):
        full_exact = find(results, k, d, "full", "exact")
        if full_exact is not None and "error" not in full_exact:
            pairs = full_exact.get("parts", {}).get("pairs")
            met = "met" if full_exact["seconds"] <= 60 else "NOT met"
            extra = f"; the exact pairwise part alone {pairs:.1f} s" if pairs is not None else ""
            threads = torch.get_num_threads()
            lines.append(
                f"Exact metrics at K = {k:,}, d = {d}, at most 60 s: full compute_metrics "
                f"{full_exact['seconds']:.1f} s wall ({met} in this run){extra}; its CPU time "
                f"/ {threads} threads = {full_exact['cpu_seconds'] / threads:.1f} s, the wall "
                f"time to expect on {threads} unshared cores (the GEMM gauge read "
                f"{full_exact['gemm_gflops']:.0f} GFLOP/s before it)."
            )
    for k in (50_000,):
        full_s = find(results, k, d, "full", "sampled")
        pairs_s = find(results, k, d, "pairs", "sampled")
        if full_s is not None and "error" not in full_s:
            pairs_t = pairs_s["seconds"] if pairs_s and "error" not in pairs_s else math.nan
            lines.append(
                f"Sampled estimates at K = {k:,}: the sampled pairwise metrics take "
                f"{pairs_t:.1f} s; the full compute_metrics with them {full_s['seconds']:.1f} s."
            )
    zs = []
    for r in results:
        if r["mode"] != "sampled" or r["step"] != "full" or "error" in r:
            continue
        ref = find(results, r["k"], r["dim"], "full", "exact")
        if ref is None or "error" in ref:
            continue
        for key in PAIR_KEYS:
            se = r["stderr"].get(key)
            zs.append(abs(r["values"][key] - ref["values"][key]) / se if se else math.inf)
    if zs:
        lines.append(
            f"Stderr covers the exact value: {sum(z < 2 for z in zs)} of {len(zs)} sampled "
            f"estimates within 2 stderr of the exact value, {sum(z < 3 for z in zs)} within 3; "
            f"largest |z| = {max(zs):.2f}."
        )
    for line in lines:
        print(f"- {line}")


def find(
    results: list[dict[str, Any]], k: int, dim: int, step: str, mode: str
) -> dict[str, Any] | None:
    for r in results:
        if (r["k"], r["dim"], r["step"], r["mode"]) == (k, dim, step, mode):
            return r
    return None


def max_rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in PAIR_KEYS)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    p.add_argument("--ks", type=ints, default=[1_000, 10_000, 30_000, 50_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--large-ks", type=ints, default=[1_000, 5_000], help="Ks at --large-dim")
    p.add_argument("--large-dim", type=int, default=4_096)
    p.add_argument(
        "--large-full-max-k", type=int, default=1_000, help="largest K of compute_metrics at it"
    )
    p.add_argument("--pairs-max-k", type=int, default=10_000, help="largest K of exact pairs-only")
    p.add_argument("--sampled-ks", type=ints, default=[30_000, 50_000])
    p.add_argument("--direct-max-k", type=int, default=10_000)
    p.add_argument("--per-class", type=int, default=3)
    p.add_argument("--pair-samples", type=int, default=500_000)
    p.add_argument("--eval-samples", type=int, default=20_000)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--timeout", type=float, default=900, help="per subprocess, seconds")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda (GPU memory peaks)")
    p.add_argument("--json", type=str, default=None, help="also write raw results here")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.ks, args.dim, args.large_ks, args.large_dim = [400], 32, [], 64
        args.sampled_ks, args.direct_max_k, args.pairs_max_k = [400], 400, 400
        args.pair_samples, args.eval_samples = 20_000, 1_000

    results = []
    started = time.perf_counter()
    for spec in plan(args):
        label = STEP_LABEL[(spec["step"], spec["mode"])]
        log(f"K={spec['k']:,} d={spec['dim']:,} {label} ...")
        r = spawn(spec, args.timeout)
        if "error" in r:
            log(f"  failed: {r['error']}")
        else:
            log(f"  {r['seconds']:.2f} s, peak {fmt_mib(r['peak_delta_mib'])} MiB")
        results.append(r)
    log(f"total {time.perf_counter() - started:.0f} s")
    print_tables(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
