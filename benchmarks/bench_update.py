"""Statistics update throughput (samples/s) against the usual ways of accumulating class sums.

Timed side by side in one run, at vocabulary V = 50,257, batch 4,096, d = 768 and 4,096,
float32 input:

- `CollapseStats.update`, without and with the d x d second moment;
- dense one-hot accumulation, `sums += one_hot(y, V).to(dtype).T @ x`, as reference
  neural-collapse code does it (float32, the faster and so the stricter baseline; and
  float64, i.e. `.to(float)` as usually written, at d = 768 only);
- a per-class Python loop, `for c in unique(y): sums[c] += x[y == c].sum(0)` (float64 sums);
- `update` again with torch limited to one thread: on a shared machine, parallel regions stall
  when another process holds a core, and this row shows how much of `update` that costs;
- a plain memory copy of the same bytes: `x.clone()` (allocates) and `out.copy_(x)` into a
  preallocated buffer; the faster of the two is the ceiling ("memcpy").

The baselines only accumulate per-class sums (and the one-hot counts come for free); ours also
validates the batch, converts to float64 and keeps counts, squared norms, the global sum and the
unit-vector sum, so the comparison favours the baselines.

Method: a pool of distinct random batches (uniform labels, the worst case for the per-class loop)
bigger than the last-level cache, so no method reads cache-hot input. Every round times every
method once (interleaved, so machine noise hits all of them alike); each method's figure is the
median over rounds of its mean time per batch. The statistics are warmed up on the whole pool
first, so every timed update is the steady state of a window that has seen those classes.
Prints a Markdown table on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.functional import one_hot as dense_one_hot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor import CollapseStats

MiB = 1 << 20


@dataclass
class Method:
    """One contender: `step(i)` processes batch i of the pool."""

    name: str
    step: Callable[[int], object]
    batches_per_round: int
    rounds: int
    times: list[float] = field(default_factory=list)
    note: str = ""

    def median(self) -> float:
        return statistics.median(self.times)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pool(
    count: int, batch: int, dim: int, vocab: int, device: torch.device, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, dim, generator=gen).to(device) for _ in range(count)]
    ys = [torch.randint(0, vocab, (batch,), generator=gen).to(device) for _ in range(count)]
    return xs, ys


def check_agreement(
    xs: list[torch.Tensor], ys: list[torch.Tensor], vocab: int, dim: int, device: torch.device
) -> float:
    """Max abs difference between our class sums and the per-class loop's, on one batch."""
    ours = CollapseStats(vocab, dim, device=device)
    ours.update(xs[0], ys[0])
    ref = torch.zeros(vocab, dim, dtype=torch.float64, device=device)
    for c in torch.unique(ys[0]).tolist():
        ref[c] += xs[0][ys[0] == c].sum(0)
    mine = torch.zeros_like(ref)
    mine[ours.class_ids] = ours.sums
    return float((mine - ref).abs().max())


def bench_dim(args: argparse.Namespace, dim: int, device: torch.device) -> list[dict[str, object]]:
    vocab, batch = args.vocab, args.batch
    batch_bytes = batch * dim * 4
    pool = max(2, -(-args.pool_mib * MiB // batch_bytes))
    log(f"d={dim}: pool of {pool} batches ({pool * batch_bytes / MiB:.0f} MiB of float32 input)")
    xs, ys = make_pool(pool, batch, dim, vocab, device, seed=dim)
    diff = check_agreement(xs, ys, vocab, dim, device)
    if diff > 1e-3:
        raise SystemExit(f"d={dim}: our class sums differ from the loop's by {diff}")

    stats = CollapseStats(vocab, dim, device=device)
    stats2 = CollapseStats(vocab, dim, second_moment=True, device=device)
    for i in range(pool):  # warm-up: allocate the rows of every class of the pool
        stats.update(xs[i], ys[i])
    # At large d one second-moment update costs seconds; row allocation is noise beside it.
    for i in range(pool if dim <= 1024 else 1):
        stats2.update(xs[i], ys[i])

    out = torch.empty_like(xs[0])
    sums32 = torch.zeros(vocab, dim, dtype=torch.float32, device=device)
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    loop_sums = torch.zeros(vocab, dim, dtype=torch.float64, device=device)
    with_f64 = dim <= args.one_hot64_max_dim
    sums64 = torch.zeros(vocab if with_f64 else 1, dim, dtype=torch.float64, device=device)

    def memcpy_clone(i: int) -> object:
        return xs[i].clone()

    def memcpy_copy(i: int) -> object:
        return out.copy_(xs[i])

    def ours(i: int) -> object:
        stats.update(xs[i], ys[i])
        return None

    def ours_1thread(i: int) -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            stats.update(xs[i], ys[i])
        finally:
            torch.set_num_threads(threads)
        return None

    def ours2(i: int) -> object:
        stats2.update(xs[i], ys[i])
        return None

    def one_hot32(i: int) -> object:
        onehot = dense_one_hot(ys[i], vocab).to(torch.float32)
        sums32.add_(onehot.T @ xs[i])
        counts.add_(onehot.sum(0))
        return None

    def one_hot64(i: int) -> object:
        onehot = dense_one_hot(ys[i], vocab).to(float)
        sums64.add_(onehot.T @ xs[i].to(float))
        return None

    def per_class_loop(i: int) -> object:
        x, y = xs[i], ys[i]
        for c in torch.unique(y).tolist():
            loop_sums[c] += x[y == c].sum(0)
        return None

    r = args.rounds
    slow = args.slow_rounds_768 if dim <= 768 else args.slow_rounds_large
    methods = [
        Method("memcpy `x.clone()`", memcpy_clone, pool, r),
        Method("memcpy `out.copy_(x)`", memcpy_copy, pool, r),
        Method("**collapse-monitor `update`**", ours, pool, r),
        Method("collapse-monitor `update`, 1 torch thread", ours_1thread, pool, r),
        Method(
            "collapse-monitor `update`, second_moment=True",
            ours2,
            pool if dim <= 1024 else 1,
            r if dim <= 1024 else max(2, slow + 1),
        ),
        Method("per-class Python loop", per_class_loop, min(pool, 4), max(2, r // 2)),
        Method("dense one-hot float32", one_hot32, 1, slow),
    ]
    if with_f64:
        methods.append(Method("dense one-hot float64 (`.to(float)`)", one_hot64, 1, slow))

    for rnd in range(max(m.rounds for m in methods)):
        for m in methods:
            if rnd >= m.rounds:
                continue
            n = m.batches_per_round
            first = (rnd * n) % pool
            sync(device)
            t0 = time.perf_counter()
            for k in range(n):
                m.step((first + k) % pool)
            sync(device)
            m.times.append((time.perf_counter() - t0) / n)
        log(f"d={dim}: round {rnd + 1} done")

    by_name = {m.name: m for m in methods}
    ceiling = min(by_name["memcpy `x.clone()`"].median(), by_name["memcpy `out.copy_(x)`"].median())
    one_hot = by_name["dense one-hot float32"].median()
    rows = []
    for m in methods:
        t = m.median()
        rows.append(
            {
                "method": m.name,
                "d": dim,
                "ms": t * 1e3,
                "rate": batch / t,
                "gbs": batch_bytes / t / 1e9,
                "vs_one_hot": one_hot / t,
                "vs_memcpy": ceiling / t,
                "reps": f"{len(m.times)}x{m.batches_per_round}",
            }
        )
    return rows


def fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k"
    return f"{rate:.0f}"


def fmt_ratio(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    p.add_argument("--vocab", type=int, default=50_257)
    p.add_argument("--batch", type=int, default=4_096)
    p.add_argument("--dims", type=str, default="768,4096", help="comma-separated")
    p.add_argument("--rounds", type=int, default=7, help="rounds of the fast methods")
    p.add_argument("--slow-rounds-768", type=int, default=3, help="one-hot rounds at d <= 768")
    p.add_argument("--slow-rounds-large", type=int, default=2, help="one-hot rounds at d > 768")
    p.add_argument("--one-hot64-max-dim", type=int, default=768)
    p.add_argument("--pool-mib", type=int, default=256, help="input pool size (> LLC)")
    p.add_argument("--device", type=str, default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.dims = 5_000, 1_024, "64,256"
        args.rounds, args.slow_rounds_768, args.slow_rounds_large = 2, 1, 1
        args.pool_mib, args.one_hot64_max_dim = 4, 256
    device = torch.device(args.device)
    dims = [int(v) for v in args.dims.split(",") if v]

    rows: list[dict[str, object]] = []
    for dim in dims:
        rows.extend(bench_dim(args, dim, device))

    print(
        f"Update throughput, V = {args.vocab:,}, batch {args.batch:,}, float32 input, "
        f"device {device}, {torch.get_num_threads()} torch threads. "
        "Median over interleaved rounds (reps = rounds x batches per round)."
    )
    print()
    print(
        "| method | d | ms / batch | samples/s | input GB/s | vs one-hot f32 | "
        "fraction of memcpy | reps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['d']:,} | {row['ms']:.2f} | {fmt_rate(row['rate'])} "
            f"| {row['gbs']:.2f} | {fmt_ratio(row['vs_one_hot'])} "
            f"| {row['vs_memcpy']:.3f} | {row['reps']} |"
        )
    print()
    judged = args.vocab == 50_257 and args.batch == 4_096
    for dim in dims:
        ours = next(r for r in rows if r["d"] == dim and "**" in str(r["method"]))
        vs_one_hot, vs_memcpy = float(ours["vs_one_hot"]), float(ours["vs_memcpy"])  # type: ignore[arg-type]
        verdict = (
            f"{'met' if vs_one_hot >= 100 else 'NOT met'} / "
            f"{'met' if vs_memcpy >= 0.5 else 'NOT met'}"
            if judged
            else "not judged (the goals are for V = 50,257, batch 4,096)"
        )
        print(
            f"- d = {dim:,}: `update` is {fmt_ratio(vs_one_hot)} the dense one-hot float32 rate "
            f"(goal >= 100x) and {vs_memcpy:.1%} of the memcpy rate (goal >= 50%): {verdict}."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
