"""End-to-end pipeline throughput, compaction cost and Redis memory, on this machine.

Starts a real redis-server and two `collapse-monitor worker` processes on loopback, streams
feature batches through MonitorClient (features path), and reports:
  * sustained samples/s from the first submit until every batch is stored as a partial,
  * compaction time per bucket (the merge of all partials of a 5-minute bucket),
  * Redis memory per million samples at d = 768 with a 50,257-token vocabulary (Zipf labels),
  * latency from a batch's submission to its partial being stored (median, p95),
  * latency from a sample's arrival to its effect on the exporter's /metrics: a second run with
    beat (compaction every second, evaluation every 2 s), a maintenance worker and the
    exporter, under a steady load; /metrics is scraped every 50 ms and, per batch, the time
    from its submission until `collapse_samples_ingested_total` (read from Redis at scrape
    time) and until the window gauge `collapse_window_samples` (written by an evaluation)
    include it is recorded.
Usage: python benchmarks/bench_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from servers import (  # noqa: E402
    RedisServer,
    free_port,
    service_env,
    start_worker,
    stop_process,
    wait_for,
)

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


GAUGE_WINDOW = "5m"
COMPACTION_S, EVALUATION_S, SCRAPE_S = 1.0, 2.0, 0.05


def scrape(url: str) -> tuple[float, float] | None:
    """(samples_ingested_total, sample_count of the window) on the exporter page, or None."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    ingested = re.search(r'^collapse_samples_ingested_total\{model="bench"\} (\S+)$', text, re.M)
    window = re.search(
        rf'^collapse_window_samples\{{model="bench",window="{GAUGE_WINDOW}"\}} (\S+)$', text, re.M
    )
    return (
        float(ingested.group(1)) if ingested else 0.0,
        float(window.group(1)) if window else 0.0,
    )


def first_reaching(samples: list[tuple[float, float, float]], col: int, target: float) -> float:
    for row in samples:
        if row[col] >= target:
            return row[0]
    return float("nan")


def run_gauge_latency(batches: int, rows: int, dim: int, rate_hz: float) -> dict[str, float]:
    """Steady load through the whole stack; per batch, arrival -> counter and -> gauge."""
    models = [{"name": "bench", "vocab_size": VOCAB, "dim": dim}]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            env = service_env(
                server.url,
                json.dumps(models),
                COLLAPSE_WINDOWS=json.dumps({GAUGE_WINDOW: 300}),
                COLLAPSE_COMPACTION_INTERVAL=str(COMPACTION_S),
                COLLAPSE_EVALUATION_INTERVAL=str(EVALUATION_S),
            )
            logs = [Path(tmp) / f"w{i}.log" for i in range(2)]
            procs = [start_worker(env, log) for log in logs]
            maint_log = Path(tmp) / "maintenance.log"
            procs.append(start_worker(env, maint_log, queues="maintenance"))
            port = free_port()
            for cmd, name in (
                (["beat", "--loglevel", "info"], "beat"),
                (["exporter", "--port", str(port)], "exporter"),
            ):
                out = open(Path(tmp) / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "monitor.cli", *cmd],
                        env=env,
                        cwd=tmp,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                    )
                )
            for log in [*logs, maint_log]:
                wait_for(lambda log=log: "ready." in log.read_text(errors="replace"), 90, "worker")
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: scrape(url) is not None, 60, "exporter")
            settings = Settings(redis_url=server.url, models=models)  # type: ignore[arg-type]
            client = MonitorClient(settings)
            rng = np.random.default_rng(1)
            payloads = [
                (rng.normal(size=(rows, dim)).astype(np.float32), zipf_labels(rng, rows))
                for _ in range(batches)
            ]
            seen: list[tuple[float, float, float]] = []
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    got = scrape(url)
                    if got is not None:
                        seen.append((time.perf_counter(), *got))
                    time.sleep(SCRAPE_S)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            sent_at = []
            started = time.perf_counter()
            for i, (x, y) in enumerate(payloads):
                next_at = started + i / rate_hz
                time.sleep(max(0.0, next_at - time.perf_counter()))
                sent_at.append(time.perf_counter())
                client.submit_features("bench", x, y, batch_id=f"g-{i}", half_precision=True)
            total = batches * rows
            wait_for(lambda: bool(seen) and seen[-1][2] >= total, 120, "the gauge", interval=0.1)
            stop.set()
            poller.join(timeout=5)
            durations = re.findall(
                r"^collapse_evaluation_duration_seconds\{"
                rf'model="bench",window="{GAUGE_WINDOW}"\}} (\S+)$',
                urllib.request.urlopen(url, timeout=2).read().decode(),
                re.M,
            )
        finally:
            for proc in procs:
                stop_process(proc)
            server.stop()
    to_counter = [first_reaching(seen, 1, (i + 1) * rows) - t for i, t in enumerate(sent_at)]
    to_gauge = [first_reaching(seen, 2, (i + 1) * rows) - t for i, t in enumerate(sent_at)]
    return {
        "batches": batches,
        "rows": rows,
        "rate_hz": rate_hz,
        "counter_median_s": statistics.median(to_counter),
        "counter_p95_s": sorted(to_counter)[int(0.95 * (len(to_counter) - 1))],
        "gauge_median_s": statistics.median(to_gauge),
        "gauge_p95_s": sorted(to_gauge)[int(0.95 * (len(to_gauge) - 1))],
        "gauge_max_s": max(to_gauge),
        "last_evaluation_s": float(durations[0]) if durations else float("nan"),
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
    print(f"#### Pipeline end to end (2 workers, real Redis, d=768, V={VOCAB:,}, float16 wire)\n")
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

    g = run_gauge_latency(*((10, 512) if args.quick else (60, 1024)), dim=768, rate_hz=2.0)
    print(
        f"\n#### Arrival to gauge (2 ingest workers, 1 maintenance worker, beat, exporter; "
        f"compaction every {COMPACTION_S:.0f} s, evaluation every {EVALUATION_S:.0f} s, "
        f"/metrics scraped every {SCRAPE_S * 1e3:.0f} ms)\n"
    )
    print(
        f"Steady load: {g['batches']} batches of {g['rows']:,} at {g['rate_hz']:.0f} batches/s "
        f"(d = 768, V = {VOCAB:,}, float16 wire). Per batch, from `submit_features` returning "
        "to the first scrape whose value includes it. The counter is read from Redis at scrape "
        "time; the gauge waits for the next compaction and then the next evaluation, so it is "
        "at most about ingest + compaction interval + evaluation interval + evaluation time + "
        "scrape interval. Shorter intervals shorten it at the cost of more evaluations."
    )
    print()
    print("| measure | median | p95 | max |")
    print("| --- | --- | --- | --- |")
    print(f"| arrival -> `collapse_samples_ingested_total` | {g['counter_median_s']:.2f} s "
          f"| {g['counter_p95_s']:.2f} s | |")  # fmt: skip
    print(f"| arrival -> `collapse_window_samples{{window=\"{GAUGE_WINDOW}\"}}` "
          f"| {g['gauge_median_s']:.2f} s | {g['gauge_p95_s']:.2f} s "
          f"| {g['gauge_max_s']:.2f} s |")  # fmt: skip
    print(f"| last evaluation (`collapse_evaluation_duration_seconds`) "
          f"| {g['last_evaluation_s']:.2f} s | | |")  # fmt: skip

    from monitor.data import read_corpus

    sentences = [s for doc in read_corpus("train") for s in doc.split(". ") if len(s) > 20]
    texts = sentences[:64] if args.quick else (sentences * 4)[:1024]
    t = run_texts(texts, per_task=32)
    print("\n#### Text path (1 embed worker, tiny GPT-2 on CPU, 32 texts per task)\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| texts | {t['texts']:,} ({t['samples']:,} labelled positions) |")
    print(f"| throughput | {t['samples'] / t['seconds']:,.0f} samples/s, "
          f"{t['texts'] / t['seconds']:,.1f} texts/s |")  # fmt: skip


if __name__ == "__main__":
    main()
