"""Random-Fourier-feature MMD (as the product computes it) against exact quadratic-time MMD.

The product's drift MMD (monitor/metrics/drift.py `mmd_unbiased`) is the unbiased U-statistic
of squared MMD in a fixed random-Fourier-feature space (monitor/stats/rff.py), from sums that
`CollapseStats.update` accumulates. Its kernel is the mean of three Gaussian kernels, with
bandwidths half, once and twice the median pairwise distance of the first batch (the
registry's default, `ModelRegistry.rff`). This script measures, on the same samples:

- RFF: `CollapseStats(1, d, rff=RFFConfig(d, D, (m/2, m, 2m)))`, `update` in batches of
  8,192 rows on both sides, then `mmd_unbiased(bucket_sums(x), bucket_sums(y))`, for
  D = 256 (the product's default), 1,024 and 4,096 features;
- exact: the unbiased U-statistic with the same kernel (the same three bandwidths, the same
  float32 samples, computed in float64),
  `(sum_{i != j} k(x_i, x_j))/(n(n-1)) + (sum_{i != j} k(y_i, y_j))/(m(m-1))
  - 2 sum_{i, j} k(x_i, y_j)/(n m)`, over tiles of T x T pairs so memory stays O(T^2 + N d);
  the within-sample sums visit only tiles on or above the diagonal.

Like with like: both are unbiased (U-statistic) estimates; the difference between them is the
error of the feature approximation alone, since the samples are identical.

Two cases, N samples per side: "same" (x and y both N(0, I_d)) and "shifted" (y's mean moved
by `--shift` along every coordinate). Exact runs up to `--exact-max-n`; beyond it its time is
estimated from the pair rate measured at the largest exact N (and marked so). The memory of a
naive, untiled implementation is computed, not allocated: one N x N float64 matrix is 8 N^2
bytes, and it needs three (Kxx, Kyy, Kxy); the table says where that exceeds this machine's
memory (RAM, or the GPU's memory on `--device cuda`).

Prints Markdown on stdout (progress on stderr); `--json PATH` also writes the raw rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.metrics.drift import mmd_unbiased
from monitor.stats import CollapseStats, RFFConfig, median_bandwidth
from monitor.stats.rff import bucket_sums

F64 = torch.float64
CHUNK = 8_192  # rows per generated chunk and per `update` call


@dataclass(frozen=True)
class Row:
    """One measurement: a method at one N and case."""

    n: int
    case: str
    method: str  # "exact" or "rff"
    features: int  # 0 for exact
    mmd2: float | None  # None where exact was not run
    seconds: float
    estimated: bool = False  # seconds estimated from the measured pair rate


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- data
def sample_chunks(
    n: int, dim: int, seed: int, shift: float, device: torch.device
) -> Iterator[torch.Tensor]:
    """N rows of N(shift, I_d) in float32, in chunks of CHUNK rows.

    Chunk i depends only on (seed, i), so the first rows are the same for every N and a
    sample of 1M rows never has to be held in memory at once.
    """
    for i, start in enumerate(range(0, n, CHUNK)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        rows = min(CHUNK, n - start)
        yield (torch.randn(rows, dim, generator=gen) + shift).to(device)


def make_samples(n: int, dim: int, seed: int, shift: float, device: torch.device) -> torch.Tensor:
    return torch.cat(list(sample_chunks(n, dim, seed, shift, device)))


def bandwidths(dim: int, device: torch.device) -> tuple[float, float, float]:
    """The product's default: the median heuristic on the first batch, halved and doubled."""
    first = next(sample_chunks(CHUNK, dim, 1, 0.0, device))
    median = median_bandwidth(first)
    return (median / 2, median, 2 * median)


# ------------------------------------------------------------------------------ exact
def kernel_sum(
    a: torch.Tensor, b: torch.Tensor, sigmas: tuple[float, ...], tile: int, symmetric: bool
) -> float:
    """sum_{i, j} k(a_i, b_j), k = mean over sigmas of exp(-||a - b||^2 / (2 sigma^2)).

    float64, T x T tiles. `symmetric` (a is b): only tiles on or above the diagonal, the
    others counted twice. Each Gaussian factorises as
    `exp(-|a|^2 / 2s^2) exp(a.b / s^2) exp(-|b|^2 / 2s^2)`, so a tile costs one GEMM, one exp
    pass and a matrix-vector product per bandwidth, about half the passes over T x T memory
    of forming the squared distances first (the exponent a.b / s^2 stays below
    |a||b| / s^2, checked against overflow).
    """
    a64, b64 = a.to(F64), b.to(F64)
    sq_a, sq_b = (a64 * a64).sum(1), (b64 * b64).sum(1)
    reach = float(sq_a.max().sqrt() * sq_b.max().sqrt()) / min(sigmas) ** 2
    if reach > 600:
        raise ValueError(f"|a||b|/sigma^2 = {reach:.0f}: the factorised kernel would overflow")
    # Per bandwidth: rows of a pre-scaled by 1/s^2, and the outer factors exp(-|.|^2 / 2s^2).
    scaled = [
        (a64 / (s * s), (-sq_a / (2 * s * s)).exp(), (-sq_b / (2 * s * s)).exp()) for s in sigmas
    ]
    total = torch.zeros((), dtype=F64, device=a.device)
    for i in range(0, a64.shape[0], tile):
        for j in range(i if symmetric else 0, b64.shape[0], tile):
            bj = b64[j : j + tile]
            part = torch.zeros((), dtype=F64, device=a.device)
            for a_scaled, u_a, u_b in scaled:
                e = torch.mm(a_scaled[i : i + tile], bj.T).exp_()
                part += u_a[i : i + tile] @ (e @ u_b[j : j + tile])
            total += part if not symmetric or i == j else 2.0 * part
    return float(total) / len(sigmas)


def exact_mmd2_from_sums(n: int, m: int, kxx: float, kyy: float, kxy: float) -> float:
    """The unbiased U-statistic from full kernel sums; k(x, x) = 1, so the diagonals are n, m."""
    return (kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2.0 * kxy / (n * m)


def exact_mmd2(x: torch.Tensor, y: torch.Tensor, sigmas: tuple[float, ...], tile: int) -> float:
    """Exact unbiased MMD^2 of samples x, y (rows) with the mean-of-Gaussians kernel."""
    kxx = kernel_sum(x, x, sigmas, tile, symmetric=True)
    kyy = kernel_sum(y, y, sigmas, tile, symmetric=True)
    kxy = kernel_sum(x, y, sigmas, tile, symmetric=False)
    return exact_mmd2_from_sums(x.shape[0], y.shape[0], kxx, kyy, kxy)


def symmetric_pairs(n: int, tile: int) -> int:
    """Kernel evaluations `kernel_sum(..., symmetric=True)` makes: whole tiles on or above
    the diagonal."""
    full, rest = divmod(n, tile)
    sizes = [tile] * full + ([rest] if rest else [])
    return sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i, len(sizes)))


# -------------------------------------------------------------------------------- rff
def rff_mmd2(
    n: int, dim: int, seeds: tuple[int, int], shift: float, config: RFFConfig, device: torch.device
) -> tuple[float, float]:
    """The product's MMD: `update` both samples into RFF-carrying statistics, then the sums.

    Returns (MMD^2, seconds); the seconds count `update` and `mmd_unbiased` only, not the
    generation of the samples.
    """
    sides = []
    seconds = 0.0
    for seed, side_shift in ((seeds[0], 0.0), (seeds[1], shift)):
        stats = CollapseStats(1, dim, rff=config, device=device)
        for chunk in sample_chunks(n, dim, seed, side_shift, device):
            labels = torch.zeros(chunk.shape[0], dtype=torch.int64, device=device)
            sync(device)
            t0 = time.perf_counter()
            stats.update(chunk, labels)
            sync(device)
            seconds += time.perf_counter() - t0
        sides.append(stats)
    t0 = time.perf_counter()
    value = mmd_unbiased(bucket_sums(sides[0]), bucket_sums(sides[1]))
    return value, seconds + time.perf_counter() - t0


# ------------------------------------------------------------------------------- main
CASES = (("same", 0.0), ("shifted", None))  # None: --shift


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[Row], tuple[float, ...]]:
    sigmas = bandwidths(args.dim, device)
    log(f"bandwidths {', '.join(f'{s:.3f}' for s in sigmas)}")
    rows: list[Row] = []
    x_seed, y_seed = 1, 2
    # Warm-up: thread pools, first-call dispatch, the RFF weight cache of each config.
    warm = make_samples(256, args.dim, 9, 0.0, device)
    kernel_sum(warm, warm, sigmas, 128, symmetric=True)
    for features in args.features:
        rff_mmd2(256, args.dim, (9, 10), 0.0, RFFConfig(args.dim, features, sigmas), device)
    for n in args.ns:
        x = make_samples(n, args.dim, x_seed, 0.0, device) if n <= args.exact_max_n else None
        kxx: float | None = None
        kxx_s = 0.0
        for case, shift_or_none in CASES:
            shift = args.shift if shift_or_none is None else shift_or_none
            if x is not None:
                if kxx is None:  # both cases share x: its within-sample sum is computed once
                    sync(device)
                    t0 = time.perf_counter()
                    kxx = kernel_sum(x, x, sigmas, args.tile, symmetric=True)
                    sync(device)
                    kxx_s = time.perf_counter() - t0
                y = make_samples(n, args.dim, y_seed, shift, device)
                sync(device)
                t0 = time.perf_counter()
                kyy = kernel_sum(y, y, sigmas, args.tile, symmetric=True)
                kxy = kernel_sum(x, y, sigmas, args.tile, symmetric=False)
                value = exact_mmd2_from_sums(n, n, kxx, kyy, kxy)
                sync(device)
                seconds = time.perf_counter() - t0 + kxx_s  # the whole exact MMD of this case
                rows.append(Row(n, case, "exact", 0, value, seconds))
                log(f"N={n:,} {case}: exact {value:.4e} in {seconds:.1f} s")
                del y
            for features in args.features:
                if n * features > args.max_rff_work:
                    continue
                config = RFFConfig(args.dim, features, sigmas, seed=0)
                value, seconds = rff_mmd2(n, args.dim, (x_seed, y_seed), shift, config, device)
                rows.append(Row(n, case, "rff", features, value, seconds))
                log(f"N={n:,} {case}: RFF D={features} {value:.4e} in {seconds:.2f} s")
        del x
    return estimate_missing(rows, args), sigmas


def estimate_missing(rows: list[Row], args: argparse.Namespace) -> list[Row]:
    """Exact rows for N beyond --exact-max-n: time from the largest measured N's pair rate."""
    measured = [r for r in rows if r.method == "exact"]
    if not measured:
        return rows
    ref_n = max(r.n for r in measured)
    ref = [r for r in measured if r.n == ref_n]
    # Per case: Kyy + Kxy, plus (shared) Kxx; the measured seconds include Kxx once each.
    ref_pairs = 2 * symmetric_pairs(ref_n, args.tile) + ref_n * ref_n
    rate = ref_pairs / min(r.seconds for r in ref)
    out = list(rows)
    for n in args.ns:
        if n <= args.exact_max_n:
            continue
        pairs = 2 * symmetric_pairs(n, args.tile) + n * n
        for case, _ in CASES:
            out.append(Row(n, case, "exact", 0, None, pairs / rate, estimated=True))
    return out


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def fmt_bytes(b: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b / 2**10:,.0f} KiB"


def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    return f"{s:.3f}" if s < 1 else f"{s:.2f}" if s < 100 else f"{s:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def print_tables(
    rows: list[Row], sigmas: tuple[float, ...], args: argparse.Namespace, device: torch.device
) -> None:
    print(
        f"MMD^2 (unbiased U-statistic on both sides), d = {args.dim}, N samples per side, "
        f"device {device}, {torch.get_num_threads()} torch threads. Kernel: mean of Gaussians "
        f"with bandwidths {', '.join(f'{s:.3f}' for s in sigmas)} (median heuristic on the "
        f"first {CHUNK:,} rows of x, halved and doubled, as the product does). Cases: same "
        f"distribution, and y shifted by {args.shift} along each coordinate. Exact: float64, "
        f"tiles of {args.tile}; RFF: `CollapseStats.update` + `mmd_unbiased`, feature seed 0. "
        "err = |RFF - exact|; rel = err / |exact| (meaningless under 'same', where exact "
        "is ~0: compare err with the shifted case's value instead)."
    )
    print()
    print("| N | case | method | MMD^2 | abs err | rel err | seconds | speed-up vs exact |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for n in args.ns:
        for case, _ in CASES:
            exact = next(r for r in rows if (r.n, r.case, r.method) == (n, case, "exact"))
            label = "exact (estimated time, not run)" if exact.estimated else "exact"
            value = "-" if exact.mmd2 is None else f"{exact.mmd2:.4e}"
            print(f"| {n:,} | {case} | {label} | {value} | | | {fmt_s(exact.seconds)} | |")
            for r in rows:
                if (r.n, r.case, r.method) != (n, case, "rff") or r.mmd2 is None:
                    continue
                if exact.mmd2 is None:
                    err = rel = "-"
                else:
                    diff = abs(r.mmd2 - exact.mmd2)
                    err = f"{diff:.1e}"
                    rel = f"{diff / abs(exact.mmd2):.2g}" if exact.mmd2 else "-"
                print(
                    f"| {n:,} | {case} | RFF D = {r.features:,} | {r.mmd2:.4e} | {err} | {rel} "
                    f"| {fmt_s(r.seconds)} | {fmt_ratio(exact.seconds / r.seconds)} |"
                )
    print()
    memory = total_memory_bytes(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    print(
        f"Memory of the exact method ({where} here: {fmt_bytes(memory)}). Naive = the N x N "
        "float64 kernel matrices materialised (one is 8 N^2 bytes; Kxx, Kyy and Kxy together "
        "three); tiled = this script's exact method, O(T^2 + N d)."
    )
    print()
    print("| N | one N x N f64 | naive (3 matrices) | fits? | tiled (T^2 temporaries + data) |")
    print("|---:|---:|---:|---|---:|")
    for n in args.ns:
        one = 8 * n * n
        tiled = 4 * 8 * args.tile**2 + 2 * n * args.dim * (8 + 4)
        fits = "yes" if 3 * one <= memory else "**no: out of memory**"
        print(f"| {n:,} | {fmt_bytes(one)} | {fmt_bytes(3 * one)} | {fits} | {fmt_bytes(tiled)} |")
    largest_one = math.isqrt(memory // 8)
    largest_three = math.isqrt(memory // 24)
    print()
    print(
        f"- The naive method runs out of memory above N = {largest_three:,} per side (three "
        f"N x N float64 matrices in {fmt_bytes(memory)}); even one matrix does not fit above "
        f"N = {largest_one:,}."
    )
    shifted = [r for r in rows if r.case == "shifted" and r.method == "exact" and r.mmd2]
    if shifted:
        worst = max(
            abs(r.mmd2 - ex.mmd2) / abs(ex.mmd2)
            for ex in shifted
            for r in rows
            if (r.n, r.case, r.method) == (ex.n, "shifted", "rff")
            and r.features == max(args.features)
            and r.mmd2 is not None
            and ex.mmd2
        )
        print(
            f"- Shifted case, D = {max(args.features):,}: RFF within {worst:.1%} of the exact "
            "value at every N where exact ran."
        )
    est = [r for r in rows if r.estimated]
    if est:
        print(
            f"- Exact times for N > {args.exact_max_n:,} are estimates (pairs / the pair rate "
            "measured at the largest exact N), not runs."
        )


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    p.add_argument("--ns", type=ints, default=[10_000, 100_000, 1_000_000], help="N per side")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=ints, default=[256, 1_024, 4_096])
    p.add_argument("--shift", type=float, default=0.1, help="y's mean in the shifted case")
    p.add_argument("--exact-max-n", type=int, default=10_000, help="largest N exact runs at")
    p.add_argument(
        "--max-rff-work", type=float, default=1.1e9, help="skip RFF where N x D exceeds this"
    )
    # 1024: the float64 T x T temporaries (8 MiB) stay below glibc's mmap threshold, so
    # they are reused instead of page-faulted in for every tile (4096 ran at half the rate).
    p.add_argument("--tile", type=int, default=1_024)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.ns, args.dim, args.features = [300, 1_000, 3_000], 8, [256, 4_096]
        args.exact_max_n, args.tile, args.shift, args.max_rff_work = 1_000, 256, 0.3, 1e12
    device = torch.device(args.device)
    started = time.perf_counter()
    rows, sigmas = run(args, device)
    log(f"total {time.perf_counter() - started:.0f} s")
    print_tables(rows, sigmas, args, device)
    if args.json is not None:
        payload = {"sigmas": list(sigmas), "args": vars(args) | {"json": None}, "rows": []}
        payload["rows"] = [asdict(r) for r in rows]
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
