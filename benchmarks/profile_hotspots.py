"""Hot spots of the three paths that carry the load, profiled with pyinstrument.

- update: `CollapseStats.update` of 4,096 x 768 float32 batches, V = 50,257, with the
  pipeline's default 256 random Fourier features (three bandwidths), as a worker runs it;
- evaluate: `compute_metrics` at K = 5,000 classes, d = 768, with the second moment, a
  classifier and 5,000 NC4 evaluation samples (bench_evaluate.py's synthetic statistics);
- ingest: `Ingestor.ingest` of encoded float16 payloads of 4,096 x 768 (what
  `MonitorClient.submit_features(half_precision=True)` sends) into the embedded memory store:
  decode, validate, partial statistics, serialisation, store.

For each path: wall time per call, then the frames with the most self time (time spent in the
function itself, not in its callees; C extensions such as torch ops count as the Python
frame that called them), aggregated over calls. Prints Markdown on stdout.

    .venv/bin/python benchmarks/profile_hotspots.py [--quick] [--html DIR] [--only update]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pyinstrument import Profiler
from pyinstrument.frame import Frame

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from monitor import CollapseStats, compute_metrics  # noqa: E402
from monitor.stats import RFFConfig, median_bandwidth  # noqa: E402

VOCAB = 50_257


@dataclass(frozen=True)
class Hotspot:
    function: str
    location: str
    self_seconds: float
    share: float


@dataclass(frozen=True)
class PathProfile:
    name: str
    calls: int
    seconds_per_call: float
    hotspots: list[Hotspot]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def self_times(root: Frame) -> dict[tuple[str, str], float]:
    """Self time per (function, file:line), summed over the whole call tree."""
    totals: dict[tuple[str, str], float] = {}
    stack = [root]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.is_synthetic:  # pyinstrument's [self] / [await] leaves: credit the parent
            continue
        own = frame.total_self_time
        if own <= 0:
            continue
        where = f"{frame.file_path_short}:{frame.line_no}"
        name = frame.function
        parent = frame.parent
        if frame.file_path_short in ("<built-in>", "") and parent is not None:
            # A C function (a torch op) is named after the Python function that calls it:
            # `Tensor.sum` alone does not say which of a dozen sums is slow.
            name = f"{frame.function} in {parent.function}"
            where = f"{parent.file_path_short}:{parent.line_no}"
        key = (name, where)
        totals[key] = totals.get(key, 0.0) + own
    return totals


def profile(
    name: str, setup: Callable[[], Callable[[int], object]], calls: int, top: int, html: Path | None
) -> PathProfile:
    step = setup()
    step(0)  # warm-up: first-call dispatch, caches, allocator pools
    profiler = Profiler(interval=0.0005)
    started = time.perf_counter()
    profiler.start()
    for i in range(calls):
        step(i + 1)
    profiler.stop()
    elapsed = time.perf_counter() - started
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    totals = self_times(root) if root is not None else {}
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    if html is not None:
        html.mkdir(parents=True, exist_ok=True)
        (html / f"{name}.html").write_text(profiler.output_html())
    return PathProfile(
        name,
        calls,
        elapsed / calls,
        [Hotspot(f, where, s, s / whole) for (f, where), s in ranked],
    )


# --------------------------------------------------------------------------- the paths
def bandwidths(x: torch.Tensor) -> tuple[float, float, float]:
    m = median_bandwidth(x)
    return (m / 2, m, 2 * m)


def setup_update(batch: int, dim: int) -> Callable[[], Callable[[int], object]]:
    def setup() -> Callable[[int], object]:
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(batch, dim, generator=gen) for _ in range(8)]
        ys = [torch.randint(0, VOCAB, (batch,), generator=gen) for _ in range(8)]
        config = RFFConfig(dim, 256, bandwidths(xs[0]))
        stats = CollapseStats(VOCAB, dim, rff=config)

        def step(i: int) -> object:
            stats.update(xs[i % 8], ys[i % 8])
            return None

        return step

    return setup


def setup_evaluate(k: int, dim: int, eval_samples: int) -> Callable[[], Callable[[int], object]]:
    def setup() -> Callable[[int], object]:
        from bench_evaluate import build_stats

        stats, means = build_stats(k, dim, 3, second_moment=True, seed=0)
        gen = torch.Generator().manual_seed(1)
        classifier = means + 0.1 * torch.randn(k, dim, generator=gen)
        rows = torch.randint(0, k, (eval_samples,), generator=gen)
        eval_features = means[rows] + 0.5 * torch.randn(rows.numel(), dim, generator=gen)

        def step(i: int) -> object:
            return compute_metrics(
                stats,
                classifier=classifier,
                bias=torch.zeros(k),
                eval_features=eval_features,
                nc4_max_samples=eval_samples,
                seed=i,
                device="cpu",
            )

        return step

    return setup


def setup_ingest(batch: int, dim: int) -> Callable[[], Callable[[int], object]]:
    def setup() -> Callable[[int], object]:
        from monitor.config import Settings
        from monitor.pipeline.payload import encode_batch
        from monitor.pipeline.runtime import Runtime

        models = [{"name": "bench", "vocab_size": VOCAB, "dim": dim}]
        runtime = Runtime(Settings(models=models))  # type: ignore[arg-type]
        rng = np.random.default_rng(0)
        ranks = np.arange(1, VOCAB + 1)
        p = 1.0 / ranks**1.1
        xs = [rng.normal(size=(batch, dim)).astype(np.float16) for _ in range(4)]
        ys = [rng.choice(VOCAB, size=batch, p=p / p.sum()) for _ in range(4)]
        ingestor = runtime.ingestor

        def step(i: int) -> object:
            payload = encode_batch("bench", xs[i % 4], ys[i % 4], batch_id=f"b{i}")
            return ingestor.ingest(payload)

        return step

    return setup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--top", type=int, default=8, help="frames listed per path")
    p.add_argument("--html", type=Path, default=None, help="also write pyinstrument HTML here")
    p.add_argument("--only", type=str, default=None, help="update, evaluate or ingest")
    args = p.parse_args(argv)
    dim, batch, k, calls = (64, 512, 300, 3) if args.quick else (768, 4_096, 5_000, 20)
    paths = {
        "update": (setup_update(batch, dim), calls),
        "evaluate": (setup_evaluate(k, dim, k), max(1, calls // 10)),
        "ingest": (setup_ingest(batch, dim), calls),
    }
    results = []
    for name, (setup, n) in paths.items():
        if args.only and args.only != name:
            continue
        log(f"profiling {name} ({n} calls) ...")
        results.append(profile(name, setup, n, args.top, args.html))
    print(
        f"pyinstrument {__import__('pyinstrument').__version__}, {torch.get_num_threads()} "
        f"torch threads; d = {dim}, batch {batch:,}, V = {VOCAB:,}, K = {k:,} for evaluate. "
        "Self time = time in the frame itself (torch and numpy calls count as the line that "
        "makes them), summed over calls; share = of all sampled self time."
    )
    for r in results:
        print()
        print(f"**{r.name}**: {r.seconds_per_call * 1e3:,.1f} ms per call ({r.calls} calls)")
        print()
        print("| function | where | self s | share |")
        print("|---|---|---:|---:|")
        for h in r.hotspots:
            print(f"| `{h.function}` | {h.location} | {h.self_seconds:.3f} | {h.share:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
