"""Before/after timing of NC4 agreement (`ncc_agreement`), interleaved, values checked equal.

Loads `monitor/metrics/nc4.py` as it was at git revision `--before` (default: the commit before
the class-tiled version) beside the current module, draws K class means, an LM head near them
and N samples once, and times both alternately so machine noise hits both alike. Prints a
Markdown table row.

    .venv/bin/python benchmarks/ab_nc4.py --k 30000 --n 20000 [--before REV] [--rounds 3]
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

from git_module import module_at  # noqa: E402

from monitor.metrics import nc4  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=30_000)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default="e721a14", help="revision with the old nc4.py")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(args.k, args.dim, generator=gen, dtype=torch.float64)
    weight = means + 0.5 * torch.randn(args.k, args.dim, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(args.k, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, args.k, (args.n,), generator=gen)
    noise = 4.0 * torch.randn(args.n, args.dim, generator=gen, dtype=torch.float64)
    features = means[labels] + noise  # enough noise that the two decisions often differ
    with tempfile.TemporaryDirectory() as tmp:
        before = module_at(args.before, "monitor/metrics/nc4.py", Path(tmp))
        times: dict[str, list[float]] = {"before": [], "after": []}
        results = {}
        for _ in range(args.rounds):
            for name, module in (("before", before), ("after", nc4)):
                start = time.perf_counter()
                results[name] = module.ncc_agreement(features, means, weight, bias)
                times[name].append(time.perf_counter() - start)
    if not torch.equal(results["before"], results["after"]):
        print("values differ", file=sys.stderr)
        return 1
    old, new = (statistics.median(times[k]) for k in ("before", "after"))
    print("| K | N | d | before (s) | after (s) | speed-up | agreement |")
    print("|---|---|---|---|---|---|---|")
    share = float(results["after"].double().mean())
    print(f"| {args.k:,} | {args.n:,} | {args.dim} | {old:.2f} | {new:.2f} | {old / new:.2f}x "
          f"| {share:.4f} (equal) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
