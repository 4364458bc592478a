"""Before/after timing of the pair metrics (exact walk, or `--sampled`), interleaved.

Loads `monitor/metrics/pairwise.py` as it was at git revision `--before` (default: the commit
before the pair-walk fix) beside the current module, builds bench_evaluate.py's synthetic
class means once, and times `exact_pair_metrics` of both, alternating, so machine noise hits
both alike. Also checks that both give the same values. Prints a Markdown table row.
`--sampled` times `sampled_pair_metrics` (500,000 pairs) instead, against `--before`
(give the revision before its fix, e.g. `--before df2cef2`).

    .venv/bin/python benchmarks/ab_pair_walk.py --k 5000 [--before REV] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_evaluate import build_stats, pair_inputs  # noqa: E402
from git_module import module_at  # noqa: E402

from monitor.metrics import pairwise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--before", type=str, default="991b737~1", help="git revision")
    p.add_argument("--sampled", action="store_true", help="sampled_pair_metrics instead")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old = module_at(args.before, "monitor/metrics/pairwise.py", Path(tmp))
        stats, _ = build_stats(args.k, args.dim, 3, False, 0)
        new_in = pair_inputs(stats, 2)
        old_in = old.PairInputs(new_in.centred, new_in.variances, new_in.sq_norms)
        runs = {
            "before": lambda: old.exact_pair_metrics(old_in, tile=args.tile),
            "after": lambda: pairwise.exact_pair_metrics(new_in, tile=args.tile),
        }
        if args.sampled:
            runs = {
                "before": lambda: old.sampled_pair_metrics(old_in, samples=500_000, seed=0),
                "after": lambda: pairwise.sampled_pair_metrics(new_in, samples=500_000, seed=0),
            }
        values = {name: run() for name, run in runs.items()}  # warm-up, and the values
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    same = all(values["before"][k].value == values["after"][k].value for k in values["after"])
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print("| K | d | tile | threads | before (median) | after (median) | speed-up | same values |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {args.k:,} | {args.dim} | {args.tile} | {torch.get_num_threads()} | {before:.3f} s "
        f"| {after:.3f} s | {before / after:.2f}x | {'yes' if same else 'NO'} |"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
