"""Evaluation at LLM scale (issue 14, point 4): time and peak memory of `compute_metrics` and
`compute_drift` at K = 128,256 classes, d = 4,096 (a Llama-3-sized vocabulary and width).

Each step runs in a fresh process (this script with `--child`) that builds its inputs, then
measures the step alone:

- `metrics`: `compute_metrics(stats, head, bias, ...)` with sampled pairs (`max_exact_classes`
  below K, `--pair-samples` pairs) and NC4 on a subsample of `--nc4-max` of `--nc4-eval`
  evaluation features (`--nc4-eval 0`: NC4 skipped, no evaluation set); `--max-exact` at or
  above K gives exact pairs instead, with `--device cuda` the GPU row of benchmarks/gpu.sh
  (host peak as VmHWM, the device's as torch.cuda.max_memory_allocated);
- `drift`: `compute_drift(window, base)` against a baseline of the same classes.

Inputs are synthetic statistics written straight into `CollapseStats` (no samples are fed: at
this size `update()` would take hours): per class a mean mu_c ~ offset + N(0, I_d), a count
n_c in [2, 16], the sum s_c = n_c mu_c + sqrt(n_c) 0.5 N(0, I_d) and q_c = ||s_c||^2/n_c +
0.25 d (n_c - 1) (a within-class variance of 0.25 per coordinate). `--layout shuffled` (default)
stores the rows in a random class order, as a window merged from several buckets is; `sorted`
stores them in class-id order, as statistics loaded from one blob are. The baseline of `drift`
is sorted, with every mean moved by 0.1 N(0, I_d). The head is `mean + 0.1 N(0, I_d)` in
`--head-dtype` (an LLM head is stored in bf16/fp16/fp32), the bias 0.01 N(0, 1) in float32.

Memory: after the set-up, free heap memory is returned to the OS (`malloc_trim`), "5" is
written to /proc/self/clear_refs to reset VmHWM, and the step's peak is VmHWM after it. "input"
is VmRSS just before the step (the inputs plus the interpreter and torch); "above input" =
peak - input. `ru_maxrss` is the process's lifetime maximum, set-up included. Prints Markdown.

    .venv/bin/python benchmarks/bench_scale_eval.py                       # K=128,256, d=4,096
    .venv/bin/python benchmarks/bench_scale_eval.py --k 50257 --d 768
    .venv/bin/python benchmarks/bench_scale_eval.py --code /tmp/before    # another checkout

`--code DIR` imports `monitor` from DIR (e.g. `git archive REV monitor | tar -x -C DIR`), to
measure the code of an earlier revision with the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHOWN_KEYS = (
    "nc1_cdnv",
    "nc2_equiangularity_std",
    "nc2_equinorm_cv",
    "nc3_duality_mean_cos",
    "nc4_ncc_agreement",
    "drift_mean_shift",
    "drift_class_mean_cos",
    "drift_label_js",
)
TILE = 2048  # rows generated at a time: the set-up never holds a second K x d matrix


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


def synthetic_stats(
    k: int, d: int, *, seed: int, shuffled: bool, second_moment: bool, shift: float = 0.0
) -> Any:
    """CollapseStats of K classes whose rows are written directly (see the module docstring).

    Uses the statistics' private row storage (`_reserve`, `_slots_for`, `_sums`, ...): the
    public way in is samples, which at this size would take hours. With `shift`, every class
    mean of the same seed is moved by `shift * N(0, I_d)` (a drifted baseline).
    """
    from monitor import CollapseStats

    gen = torch.Generator().manual_seed(seed)
    offset = 0.5 * torch.randn(d, generator=gen, dtype=F64)
    shuffle = torch.Generator().manual_seed(seed + 7)
    order = torch.randperm(k, generator=shuffle) if shuffled else torch.arange(k)
    stats = CollapseStats(num_classes=k, dim=d, second_moment=second_moment)
    stats._reserve(k)
    unit_sum = torch.zeros(d, dtype=F64)
    total = 0
    moved = torch.Generator().manual_seed(seed + 1000)
    for start in range(0, k, TILE):
        # Classes first seen together get slots in id order, as `_slots_for` assigns them.
        stats._slots_for(order[start : start + TILE].sort().values)
    for start in range(0, k, TILE):
        # Drawn in class-id order: a class gets the same numbers in either layout.
        ids = torch.arange(start, min(start + TILE, k))
        slots = stats._slot[ids]
        rows = ids.numel()
        mu = offset + torch.randn(rows, d, generator=gen, dtype=F64)
        if shift:
            mu += shift * torch.randn(rows, d, generator=moved, dtype=F64)
        n = torch.randint(2, 17, (rows,), generator=gen)
        nf = n.to(F64)
        s = nf[:, None] * mu + 0.5 * nf.sqrt()[:, None] * torch.randn(
            rows, d, generator=gen, dtype=F64
        )
        q = (s * s).sum(dim=1) / nf + 0.25 * d * (nf - 1.0)
        stats._counts[slots] = n
        stats._sums[slots] = s
        stats._sq_norms[slots] = q
        unit_sum += (nf / mu.norm(dim=1)) @ mu
        total += int(n.sum())
        if stats.second is not None:
            scaled = s / nf.sqrt()[:, None]
            stats.second.addmm_(scaled.T, scaled)
            stats.second.diagonal().add_(0.25 * float((nf - 1.0).sum()))
    stats.sample_count = total
    stats.unit_count = total
    stats.unit_sum = unit_sum
    return stats


def synthetic_head(stats: Any, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, d) head in `dtype` near the class means (indexed by class id), (V,) float32 bias."""
    gen = torch.Generator().manual_seed(seed)
    k, d = stats.num_classes, stats.dim
    weight = torch.empty(k, d, dtype=dtype)
    for start in range(0, k, TILE):
        ids = torch.arange(start, min(start + TILE, k))
        slots = stats._slot[ids]
        mu = stats._sums[slots] / stats._counts[slots].to(F64)[:, None]
        weight[ids] = (mu + 0.1 * torch.randn(mu.shape, generator=gen, dtype=F64)).to(dtype)
    bias = 0.01 * torch.randn(k, generator=gen)
    return weight, bias


def eval_features(stats: Any, rows: int, seed: int) -> torch.Tensor:
    """`rows` float32 features: the mean of a uniformly drawn class plus 0.5 N(0, I_d)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, stats.num_classes, (rows,), generator=gen)
    slots = stats._slot[labels]
    mu = stats._sums[slots] / stats._counts[slots].to(F64)[:, None]
    return (mu + 0.5 * torch.randn(mu.shape, generator=gen, dtype=F64)).float()


def prepare(spec: dict[str, Any]) -> tuple[Any, int]:
    """The measured step as a closure, and the bytes of its inputs (tensors only)."""
    from monitor import compute_metrics
    from monitor.metrics.drift import compute_drift

    k, d, seed = spec["k"], spec["d"], spec["seed"]
    shuffled = spec["layout"] == "shuffled"
    stats = synthetic_stats(k, d, seed=seed, shuffled=shuffled, second_moment=spec["second_moment"])
    inputs = stats._sums.numel() * 8 + (0 if stats.second is None else stats.second.numel() * 8)
    if spec["step"] == "drift":
        base = synthetic_stats(k, d, seed=seed, shuffled=False, second_moment=False, shift=0.1)
        inputs += base._sums.numel() * 8

        def run_drift() -> dict[str, Any]:
            return dict(compute_drift(stats, base).as_dict())

        return run_drift, inputs

    weight, bias = synthetic_head(stats, DTYPES[spec["head_dtype"]], seed + 1)
    inputs += weight.numel() * weight.element_size() + bias.numel() * 4
    feats = None
    if spec["nc4_eval"] > 0:
        feats = eval_features(stats, spec["nc4_eval"], seed + 2)
        inputs += feats.numel() * 4

    def run_metrics() -> dict[str, Any]:
        report = compute_metrics(
            stats,
            weight,
            bias,
            max_exact_classes=spec["max_exact"],
            pair_samples=spec["pair_samples"],
            eval_features=feats,
            nc4_max_samples=spec["nc4_max"],
            seed=0,
            device=spec.get("device", "cpu"),
        )
        return dict(report.as_dict())

    return run_metrics, inputs


def gemm_gflops() -> float:
    """Float64 GEMM rate right now: how much of the (shared, noisy) machine this row got."""
    a = torch.randn(1024, 1024, dtype=F64)
    a @ a
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    step, input_bytes = prepare(spec)
    setup_s = time.perf_counter() - started
    gflops = gemm_gflops()
    trim_heap()
    rss_before = proc_status_kib("VmRSS")
    can_reset = reset_peak()
    cuda = str(spec.get("device", "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    values = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = proc_status_kib("VmHWM") if can_reset else None
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {
        **spec,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "setup_seconds": setup_s,
        "gemm_gflops": gflops,
        "input_mib": input_bytes / 2**20,
        "rss_before_mib": rss_before / 1024,
        "peak_mib": None if peak is None else peak / 1024,
        "above_mib": None if peak is None else (peak - rss_before) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_peak_mib": device_peak,
        "values": {key: values.get(key) for key in SHOWN_KEYS if key in values},
    }


# -------------------------------------------------------------------------- parent side
def spawn(spec: dict[str, Any], code: str | None, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    if code:
        cmd[2:2] = ["--code", code]
    log(f"-- {spec['step']} K={spec['k']:,} d={spec['d']:,}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-2:]
        return {**spec, "error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fmt(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; layout "
        f"{args.layout}; sampled pairs: {args.pair_samples:,}; NC4: "
        + (
            f"{args.nc4_max:,} of {args.nc4_eval:,} evaluation features"
            if args.nc4_eval
            else "skipped"
        )
        + f"; code: {args.code or 'this checkout'}. One fresh process per row. tensors = the "
        "inputs' own bytes (class sums, head, evaluation features; for drift both statistics), "
        "input = VmRSS before the step (inputs + interpreter + torch), peak = VmHWM during the "
        "step, above = peak - input, K x d = one K x d float64 matrix; GEMM = a 1024^3 float64 "
        "product timed just before the step, a gauge of how much of the shared machine it got."
    )
    print()
    print(
        "| step | K | d | head | seconds | CPU s | GEMM GFLOP/s | tensors MiB | input MiB "
        "| peak MiB | above input MiB | above / K x d | ru_maxrss MiB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        kd = r["k"] * r["d"] * 8 / 2**20
        head = r["head_dtype"] if r["step"] == "metrics" else "-"
        lead = f"| {r['step']} | {r['k']:,} | {r['d']:,} | {head} |"
        if "error" in r:
            print(f"{lead} - | - | - | - | - | - | - | - | {r['error'].replace('|', '/')} |")
            continue
        ratio = None if r["above_mib"] is None else r["above_mib"] / kd
        print(
            f"{lead} {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['gemm_gflops']:.0f} "
            f"| {fmt(r['input_mib'])} "
            f"| {fmt(r['rss_before_mib'])} | {fmt(r['peak_mib'])} | {fmt(r['above_mib'])} "
            f"| {fmt(ratio, 2)} | {fmt(r['ru_maxrss_mib'])} |"
        )
    print()
    for r in results:
        if "error" in r or r["peak_mib"] is None:
            continue
        kd = r["k"] * r["d"] * 8 / 2**20
        print(
            f"- {r['step']}, K = {r['k']:,}, d = {r['d']:,}: {r['above_mib']:,.0f} MiB above the "
            f"input = {r['above_mib'] / kd:.2f} K x d float64 ({kd:,.0f} MiB each); process peak "
            f"{r['peak_mib'] / 1024:.2f} GiB ({'within' if r['peak_mib'] <= 8192 else 'above'} "
            f"8 GiB), of which the input tensors {r['input_mib'] / 1024:.2f} GiB"
            + (
                f"; device {r.get('device')}: peak {r['device_peak_mib']:,.0f} MiB allocated."
                if r.get("device_peak_mib") is not None
                else "."
            )
        )
    print()
    shown = [r for r in results if "error" not in r and r["values"]]
    if shown:
        print("| step | K | d | key | value |")
        print("|---|---:|---:|---|---:|")
        for r in shown:
            for key, value in r["values"].items():
                text = "None" if value is None else f"{value:.12g}"
                print(f"| {r['step']} | {r['k']:,} | {r['d']:,} | `{key}` | {text} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=128_256, help="classes (= vocabulary size)")
    p.add_argument("--d", type=int, default=4_096, help="hidden dimension")
    p.add_argument("--head-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--layout", choices=("shuffled", "sorted"), default="shuffled")
    p.add_argument("--steps", default="metrics,drift", help="comma-separated: metrics, drift")
    p.add_argument("--pair-samples", type=int, default=500_000)
    p.add_argument(
        "--max-exact", type=int, default=30_000, help="max_exact_classes (>= K: exact pairs)"
    )
    p.add_argument("--nc4-eval", type=int, default=4_000, help="evaluation features; 0 = none")
    p.add_argument("--nc4-max", type=int, default=1_000, help="nc4_max_samples (subsample)")
    p.add_argument("--second-moment", action="store_true", help="trace ratio, effective rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        help="compute device of compute_metrics (cuda: exact pairs at full K with --max-exact)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="per step, seconds")
    p.add_argument("--code", default=None, help="import monitor from this directory")
    p.add_argument("--quick", action="store_true", help="smoke run: K = 3,000, d = 64")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    else:
        sys.path.insert(0, str(ROOT))
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.k, args.d, args.pair_samples, args.nc4_eval, args.nc4_max = 3_000, 64, 20_000, 400, 100
    base = {
        "k": args.k,
        "d": args.d,
        "head_dtype": args.head_dtype,
        "layout": args.layout,
        "pair_samples": args.pair_samples,
        "max_exact": args.max_exact,
        "nc4_eval": args.nc4_eval,
        "nc4_max": args.nc4_max,
        "second_moment": args.second_moment,
        "seed": args.seed,
        "device": args.device,
    }
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    results = [spawn({**base, "step": step}, args.code, args.timeout) for step in steps]
    print_tables(results, args)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
