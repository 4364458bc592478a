"""End-to-end pipeline throughput, compaction cost and Redis memory, on this machine.

Starts a real redis-server and two `collapse-monitor worker` processes on loopback, streams
feature batches through MonitorClient (features path), and reports:
  * sustained samples/s from the first submit until every batch is stored as a partial,
  * compaction time per bucket (the merge of all partials of a 5-minute bucket),
  * Redis memory per million samples at d = 768 with a 50,257-token vocabulary (Zipf labels),
  * latency from a batch's submission to its partial being stored (median, p95).
Usage: python benchmarks/bench_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from servers import RedisServer, service_env, start_worker, stop_process, wait_for  # noqa: E402

from monitor.config import Settings  # noqa: E402
from monitor.pipeline.client import MonitorClient  # noqa: E402
from monitor.pipeline.runtime import Runtime  # noqa: E402
from monitor.pipeline.windows import compact_model  # noqa: E402

VOCAB = 50_257


def zipf_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    ranks = np.arange(1, VOCAB + 1)
    p = 1.0 / ranks**1.1
    return rng.choice(VOCAB, size=n, p=p / p.sum())


def run(batches: int, rows: int, dim: int, workers: int) -> dict[str, float]:
    models = [{"name": "bench", "vocab_size": VOCAB, "dim": dim}]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        procs = []
        try:
            env = service_env(server.url, json.dumps(models))
            logs = [Path(tmp) / f"w{i}.log" for i in range(workers)]
            procs = [start_worker(env, log) for log in logs]
            for log in logs:
                wait_for(lambda log=log: "ready." in log.read_text(errors="replace"), 90, "worker")
            settings = Settings(redis_url=server.url, models=models)  # type: ignore[arg-type]
            runtime = Runtime(settings)
            client = MonitorClient(settings)
            rng = np.random.default_rng(0)
            payloads = [
                (rng.normal(size=(rows, dim)).astype(np.float32), zipf_labels(rng, rows))
                for _ in range(batches)
            ]
            sent_at: list[float] = []
            started = time.perf_counter()
            for i, (x, y) in enumerate(payloads):
                sent_at.append(time.perf_counter())
                client.submit_features("bench", x, y, batch_id=f"bench-{i}", half_precision=True)
            latencies: list[float] = []
            seen = 0
            deadline = time.monotonic() + 600
            while seen < batches and time.monotonic() < deadline:
                now_seen = runtime.store.counters("bench").get("batches_ingested", 0)
                latencies += [time.perf_counter() - sent_at[j] for j in range(seen, now_seen)]
                seen = now_seen
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
            c0 = time.perf_counter()
            result = compact_model(runtime.store, "bench")
            compaction = time.perf_counter() - c0
            memory = runtime.store.memory_bytes("bench")
            info = server.client().info("memory")
        finally:
            for proc in procs:
                stop_process(proc)
            server.stop()
    samples = batches * rows
    return {
        "samples": samples,
        "samples_per_s": samples / elapsed,
        "latency_median_s": statistics.median(latencies),
        "latency_p95_s": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
        "compaction_s_per_bucket": compaction / max(result.buckets, 1),
        "buckets": result.buckets,
        "model_memory_mb": memory / 2**20,
        "redis_used_memory_mb": float(info["used_memory"]) / 2**20,
        "memory_mb_per_million_samples": memory / 2**20 / (samples / 1e6),
    }


def run_texts(texts: list[str], per_task: int) -> dict[str, float]:
    """The text path: one `embed` worker (solo pool) running the bundled tiny GPT-2."""
    from monitor.capture.tinymodel import ensure_tiny_model

    checkpoint = ensure_tiny_model()
    models = [{"name": "tiny", "checkpoint": str(checkpoint)}]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        proc = None
        try:
            env = service_env(server.url, json.dumps(models))
            log = Path(tmp) / "embed.log"
            proc = start_worker(env, log, queues="embed")
            wait_for(lambda: "ready." in log.read_text(errors="replace"), 90, "embed worker")
            settings = Settings(redis_url=server.url, models=models)  # type: ignore[arg-type]
            runtime = Runtime(settings)
            client = MonitorClient(settings)
            client.submit_texts("tiny", texts[:per_task], batch_id="warm")  # loads the model
            wait_for(
                lambda: runtime.store.counters("tiny").get("batches_ingested", 0) == 1, 90, "warm"
            )
            base = runtime.store.counters("tiny")["samples_ingested"]
            started = time.perf_counter()
            ids = client.submit_texts("tiny", texts, texts_per_task=per_task, batch_id="t")
            wait_for(
                lambda: runtime.store.counters("tiny").get("batches_ingested", 0) == len(ids) + 1,
                600,
                "texts embedded",
                interval=0.05,
            )
            elapsed = time.perf_counter() - started
            samples = runtime.store.counters("tiny")["samples_ingested"] - base
        finally:
            if proc is not None:
                stop_process(proc)
            server.stop()
    return {"texts": len(texts), "samples": samples, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds of smoke")
    args = parser.parse_args()
    batches, rows = (8, 1024) if args.quick else (120, 4096)
    r = run(batches=batches, rows=rows, dim=768, workers=2)
    print(f"## Pipeline end to end (2 workers, real Redis, d=768, V={VOCAB:,}, float16 wire)\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| samples streamed | {r['samples']:,} in {batches} batches of {rows} |")
    print(f"| sustained throughput | {r['samples_per_s']:,.0f} samples/s |")
    print(f"| submit-to-stored latency, median / p95 | {r['latency_median_s']:.2f} s / "
          f"{r['latency_p95_s']:.2f} s |")  # fmt: skip
    print(f"| compaction per bucket | {r['compaction_s_per_bucket']:.2f} s "
          f"({r['buckets']} bucket(s)) |")  # fmt: skip
    print(f"| Redis memory of the model (fine + coarse bucket) | {r['model_memory_mb']:.0f} MB |")
    print(f"| per million samples | {r['memory_mb_per_million_samples']:.0f} MB |")
    print(f"| redis used_memory | {r['redis_used_memory_mb']:.0f} MB |")

    from monitor.data import read_corpus

    sentences = [s for doc in read_corpus("train") for s in doc.split(". ") if len(s) > 20]
    texts = sentences[:64] if args.quick else (sentences * 4)[:1024]
    t = run_texts(texts, per_task=32)
    print("\n## Text path (1 embed worker, tiny GPT-2 on CPU, 32 texts per task)\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| texts | {t['texts']:,} ({t['samples']:,} labelled positions) |")
    print(f"| throughput | {t['samples'] / t['seconds']:,.0f} samples/s, "
          f"{t['texts'] / t['seconds']:,.1f} texts/s |")  # fmt: skip


if __name__ == "__main__":
    main()
