"""Probe overhead on the forward pass, measured side by side with the unhooked model.

Two models: the tiny demo GPT-2 (trained, from the cache; `--tiny-random` uses random weights
of the same shape instead of building it) and a ~110M-parameter GPT-2 config with random
weights. For each, four variants share the same weights: unhooked, and probed at token rates
1%, 10% and 100%, each probe shipping into an in-process `CollapseStats` sink (so the shipping
thread's work competes for the same cores, as it would in production). Repetitions are
interleaved in a shuffled order; the table reports medians. Goal: <= 3% added latency at 10%
sampling on CPU.

    .venv/bin/python benchmarks/probe_overhead.py [--reps 30] [--tiny-random]
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor import CollapseStats
from monitor.capture import CollapseProbe, InProcessSink, SamplingPolicy

RATES = (0.01, 0.10, 1.00)


def tiny_model(random_weights: bool) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    from monitor.capture.mirror import load_model
    from monitor.capture.tinymodel import DEFAULT_SPEC, ensure_tiny_model

    if not random_weights:
        model, _ = load_model(ensure_tiny_model(progress=lambda m: print(m, file=sys.stderr)))
        return model
    s = DEFAULT_SPEC
    cfg = GPT2Config(
        vocab_size=s.vocab_size,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        n_positions=s.n_positions,
    )
    return GPT2LMHeadModel(cfg).eval()


def gpt2_100m() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=32000, n_embd=768, n_layer=12, n_head=12, n_positions=512)
    return GPT2LMHeadModel(cfg).eval()


def twin(model: Any) -> Any:
    """A copy with its own module objects (hooks) but the same weight tensors."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def bench(name: str, model: Any, batch: int, length: int, reps: int) -> list[str]:
    torch.manual_seed(0)
    vocab, dim = model.config.vocab_size, model.config.n_embd
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    # "unhooked twin" is a second unhooked copy: its "overhead" is the noise floor (A/A test).
    variants: dict[str, Any] = {"unhooked": model, "unhooked twin": twin(model)}
    probes: dict[str, CollapseProbe] = {}
    for rate in RATES:
        key = f"{rate:.0%}"
        variants[key] = twin(model)
        sink = InProcessSink(CollapseStats(vocab, dim))
        policy = SamplingPolicy(token_rate=rate, seed=1)
        probes[key] = CollapseProbe.attach(variants[key], sink, policy)  # default buffering
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m(input_ids=ids, attention_mask=mask)
        for _ in range(reps):
            rng.shuffle(order)
            for key in order:
                start = time.perf_counter()
                variants[key](input_ids=ids, attention_mask=mask)
                times[key].append(time.perf_counter() - start)
    for probe in probes.values():
        probe.detach()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    base = statistics.median(times["unhooked"])
    rows = []
    for key in variants:
        med = statistics.median(times[key])
        q1, _, q3 = statistics.quantiles(times[key], n=4)
        over = "" if key == "unhooked" else f"{(med / base - 1) * 100:+.1f}%"
        shipped = str(probes[key].counters.shipped) if key in probes else ""
        rows.append(
            f"| {name} ({params:.0f}M) | {batch}x{length} | {key} | {med * 1e3:.2f} "
            f"| {(q3 - q1) * 1e3:.2f} | {over} | {shipped} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--big-reps", type=int, default=25)
    parser.add_argument("--tiny-random", action="store_true", help="skip building the model")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; medians of interleaved repetitions"
    )
    print()
    print(
        "| model | batch x tokens | probe rate | forward ms (median) | IQR ms "
        "| overhead vs unhooked | rows shipped |"
    )
    print("|---|---|---|---|---|---|---|")
    tiny = tiny_model(args.tiny_random)
    for line in bench("tiny GPT-2", tiny, 8, 128, args.reps):
        print(line, flush=True)
    big = gpt2_100m()
    for line in bench("GPT-2 config", big, 2, 128, args.big_reps):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
