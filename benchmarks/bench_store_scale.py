"""The split statistics store at LLM scale (issue 14): real Redis, real workers, this machine.

Every phase starts its own redis-server on loopback (tests/integration/servers.py; AOF off by
default, `--aof` to keep it) and stops it, with every process it started, before the next.

1. latency: 2 `collapse-monitor worker` processes (queue ingest), 1 maintenance worker and
   `collapse-monitor beat` (compaction every `--compaction-interval` s, evaluation every
   `--evaluation-interval` s, the three default windows 15m/1h/24h). A steady load of
   `--latency-batches` batches of `--batch-size` rows at `--latency-rate` batches/s goes
   through `MonitorClient.submit_features(half_precision=True)` (float16 on the wire). Per
   batch, from the submit call to: its `seen` marker (ingested), its id leaving `pending`
   (compacted: in every window), and the first snapshot (what the gauges show at the next
   scrape) whose sample count includes it, for the first and the last window evaluated.
   Batches are ranked by compaction time, so "includes it" is exact (equal batch sizes).
2. throughput: the same stack with evaluation off (interval 10^6 s); `--batches` batches
   submitted at once; samples/s from the first submit until all are ingested, and until all
   are in the windows (ingest + compaction, the sustained rate). Then the store's memory
   against the formula of docs/architecture.md and the largest value Redis holds.
3. growth: in this process, `runtime.ingestor.ingest(encode_batch(...))` and `compact_model`
   with the window `1h` only (targets: fine bucket, coarse bucket, 1h window), all batches
   in one 5-minute bucket. The window is filled with new classes (one sample each) up to each
   of `--stages` classes, then `--stage-batches` Zipf batches are ingested and their
   compaction is timed: the merge cost per 1,000 samples as the window grows.
4. before: the same growth with the store of `--before-rev` (one blob per bucket), in a child
   process importing `monitor` from `git archive <rev> monitor`, at the stages whose bucket
   blob stays under Redis's 512 MiB value limit (above it the old compaction fails).
5. read: a window of `--read-k` classes (default: the vocabulary) written straight into Redis
   in the store format (synthetic rows; the globals field of a real batch), then read by
   `window_stats` in a fresh child process: seconds, and peak RSS (`ru_maxrss`) against the
   RSS before the read. The metrics on such a window are timed by bench_scale_eval.py.
6. modes: the memory of `window_mode` exact against decayed: the same simulated day and more of
   Zipf traffic through both, through real ingestion, compaction and maintenance, against the
   formula of docs/architecture.md (benchmarks/window_memory.py says how).

Phases that need more than 3 GiB wait (up to `--memory-wait` s) until MemAvailable is at least
12 GiB (or their estimate + 2 GiB), else they are skipped with a note. Features are normal,
drawn once into a pool of 4 matrices (the store's costs do not depend on their values); labels
are Zipf (`--zipf`) over the vocabulary. Prints Markdown; progress on stderr.

    .venv/bin/python benchmarks/bench_store_scale.py                      # V=128,256, d=4,096
    .venv/bin/python benchmarks/bench_store_scale.py --vocab 50257 --dim 768 --batches 96
    .venv/bin/python benchmarks/bench_store_scale.py --tiny               # seconds: smoke test
    .venv/bin/python benchmarks/bench_store_scale.py --phases modes       # the two window modes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from servers import (  # noqa: E402
    RedisServer,
    service_env,
    start_worker,
    stop_process,
    wait_for,
)

MODEL = "bench"
DEFAULT_WINDOWS = {"15m": 900, "1h": 3600, "24h": 86400}
GROWTH_WINDOWS = {"1h": 3600}
LIMIT_BYTES = 64 * 2**20  # the design's bound on one Redis value
MAX_BULK = 512 * 2**20  # Redis's default proto-max-bulk-len: no value may be larger
BIG_PHASE_GIB = 3.0  # phases above this wait for MIN_FREE_GIB of MemAvailable
MIN_FREE_GIB = 12.0
POOL = 4  # feature matrices drawn once and reused
PHASES = ("latency", "throughput", "growth", "before", "read", "modes")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs
def zipf_probabilities(vocab: int, s: float) -> np.ndarray:
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -s
    return p / p.sum()


def expected_classes(p: np.ndarray, samples: int) -> float:
    """Expected number of distinct labels among `samples` draws from `p`."""
    return float((1.0 - (1.0 - p) ** samples).sum())


def feature_pool(rows: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16) for _ in range(POOL)
    ]


def row_bytes(dim: int) -> int:
    """One class row of the store format: count, sum of squared norms, sum (float64)."""
    return 8 * dim + 16


# ----------------------------------------------------------------------------- memory gate
def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def memory_ok(need_gib: float, wait_s: float, what: str) -> tuple[bool, str]:
    """Wait until a phase needing `need_gib` may run; (False, why) after `wait_s`."""
    if need_gib <= BIG_PHASE_GIB:
        return True, ""
    want = max(MIN_FREE_GIB, need_gib + 2.0)
    deadline = time.monotonic() + wait_s
    while True:
        free = available_gib()
        if free >= want:
            return True, ""
        if time.monotonic() > deadline:
            return False, f"skipped: {what} needs ~{need_gib:.1f} GiB, {free:.1f} GiB available"
        log(f"{what}: {free:.1f} GiB available, waiting for {want:.0f} GiB")
        time.sleep(15)


# ----------------------------------------------------------------------------- servers
def start_redis(workdir: Path, aof: str) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir)
    server.start()
    client = server.client()
    if aof == "no":
        client.config_set("appendonly", "no")
    else:
        client.config_set("appendfsync", aof)
    return server


@contextlib.contextmanager
def redis_running(workdir: Path, aof: str) -> Iterator[RedisServer]:
    server = start_redis(workdir, aof)
    try:
        yield server
    finally:
        server.stop()


def models_json(args: argparse.Namespace) -> str:
    return json.dumps([{"name": MODEL, "vocab_size": args.vocab, "dim": args.dim}])


def settings_for(url: str, args: argparse.Namespace, windows: dict[str, int], **extra: Any) -> Any:
    from monitor.config import Settings

    return Settings(redis_url=url, models=json.loads(models_json(args)), windows=windows, **extra)


@contextlib.contextmanager
def service_stack(
    workdir: Path, url: str, args: argparse.Namespace, *, evaluation_s: float
) -> Iterator[None]:
    """Ingest workers, one maintenance worker and beat, as in production; all stopped after."""
    env = service_env(
        url,
        models_json(args),
        COLLAPSE_WINDOWS=json.dumps(DEFAULT_WINDOWS),
        COLLAPSE_COMPACTION_INTERVAL=str(args.compaction_interval),
        COLLAPSE_EVALUATION_INTERVAL=str(evaluation_s),
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        logs = [workdir / f"ingest{i}.log" for i in range(args.ingest_workers)]
        procs += [start_worker(env, log_path) for log_path in logs]
        logs.append(workdir / "maintenance.log")
        procs.append(start_worker(env, logs[-1], queues="maintenance"))
        for log_path in logs:
            try:
                wait_for(
                    lambda p=log_path: "ready." in p.read_text(errors="replace"), 300, "worker"
                )
            except TimeoutError as exc:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise TimeoutError(f"{exc}; {log_path.name} ends: {tail}") from exc
        out = open(workdir / "beat.log", "ab")  # noqa: SIM115 - lives with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "monitor.cli", "beat", "--loglevel", "info"],
                env=env,
                cwd=workdir,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        )
        beat_log = workdir / "beat.log"
        wait_for(lambda: "Sending due task" in beat_log.read_text(errors="replace"), 120, "beat")
        yield
    finally:
        for proc in procs:
            stop_process(proc)


# ----------------------------------------------------------------------------- Redis reads
def largest_value(client: Any) -> tuple[int, str]:
    """The largest single value Redis holds (string, hash field, list element), and where."""
    best, where = 0, ""
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        name = key.decode(errors="replace")
        if kind == b"string":
            sizes = [(int(client.strlen(key)), name)]
        elif kind == b"hash":
            fields = client.hkeys(key)
            sizes = []
            for start in range(0, len(fields), 10_000):
                part = fields[start : start + 10_000]
                pipe = client.pipeline(transaction=False)
                for f in part:
                    pipe.hstrlen(key, f)
                sizes += [
                    (int(n), f"{name}[{f.decode(errors='replace')}]")
                    for f, n in zip(part, pipe.execute(), strict=True)
                ]
        elif kind == b"list":
            sizes = [(len(v), f"{name}[{i}]") for i, v in enumerate(client.lrange(key, 0, 63))]
        else:
            continue
        for size, label in sizes:
            if size > best:
                best, where = size, label
    return best, where


def hash_sizes(client: Any, key: bytes) -> tuple[int, int, int]:
    """(fields, bytes of the values, bytes Redis accounts to the key)."""
    fields = client.hkeys(key)
    total = 0
    for start in range(0, len(fields), 10_000):
        pipe = client.pipeline(transaction=False)
        for f in fields[start : start + 10_000]:
            pipe.hstrlen(key, f)
        total += sum(int(n) for n in pipe.execute())
    usage = int(client.memory_usage(key, samples=0) or 0)
    return len(fields), total, usage


def memory_report(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The model's Redis memory against docs/architecture.md's formula (row = 8 d + 16 plus a
    per-field overhead), with the overhead measured: (bytes Redis accounts to the statistics
    hashes - bytes of their values) / their fields."""
    client, keys = store.client, store.keys(MODEL)
    states = sorted(
        key
        for key in client.scan_iter(match=f"{keys.base}:rows:*", count=1000)
        if key.decode().split(":rows:", 1)[1].startswith(("bucket:", "window:", "baseline:"))
    )
    fields = values = usage = 0
    per_state: dict[str, int] = {}
    for key in states:
        n, v, u = hash_sizes(client, key)
        fields, values, usage = fields + n, values + v, usage + u
        per_state[key.decode().split(":rows:", 1)[1]] = n
    rows = sum(per_state.values()) - len(per_state)  # every state has one `g` field
    g_bytes = values - rows * row_bytes(args.dim)
    formula = sum(n - 1 for n in per_state.values()) * (row_bytes(args.dim) + 60) + g_bytes
    info = client.info("memory")
    return {
        "windows": {w: dataclasses.asdict(state) for w, state in store.windows(MODEL).items()},
        "window_counts": window_counts(store),
        "states": len(per_state),
        "rows": rows,
        "fields": fields,
        "values_bytes": values,
        "states_bytes": usage,
        "overhead_per_field": (usage - values) / max(fields, 1),
        "formula_bytes": formula,
        "model_bytes": int(store.memory_bytes(MODEL)),
        "used_memory": int(info["used_memory"]),
        "used_memory_peak": int(info["used_memory_peak"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "fields_by_state": per_state,
    }


def window_counts(store: Any) -> dict[str, int | None]:
    """Samples each window's globals field holds (None: no state), read without the lock."""
    from monitor.stats.fields import GLOBAL_FIELD, decode_globals

    out: dict[str, int | None] = {}
    for w in store.windows(MODEL):
        g = decode_globals(store.state_field(MODEL, f"window:{w}", GLOBAL_FIELD))
        out[w] = None if g is None else g.sample_count
    return out


# ----------------------------------------------------------------------------- 1. latency
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_latency(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from monitor.pipeline.client import MonitorClient
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import maintain_model

    p = zipf_probabilities(args.vocab, args.zipf)
    pool = feature_pool(args.batch_size, args.dim)
    rng = np.random.default_rng(1)
    n, rows = args.latency_batches, args.batch_size
    windows = sorted(DEFAULT_WINDOWS, key=DEFAULT_WINDOWS.__getitem__)
    first, last = windows[0], windows[-1]
    with redis_running(workdir, args.aof) as server:
        settings = settings_for(server.url, args, DEFAULT_WINDOWS)
        with service_stack(workdir, server.url, args, evaluation_s=args.evaluation_interval):
            runtime = Runtime(settings)
            store, client = runtime.store, MonitorClient(settings)
            keys = store.keys(MODEL)
            maintain_model(store, MODEL)  # windows exist before the load, as in a deployment
            poll = server.client()  # the poller's own connections
            ids: list[str] = []
            sent: dict[str, float] = {}
            ingested: dict[str, float] = {}
            compacted: dict[str, float] = {}
            snaps: dict[str, list[tuple[float, int]]] = {first: [], last: []}
            stop = threading.Event()

            def poller() -> None:
                while not stop.is_set():
                    now = time.time()
                    todo = [i for i in list(ids) if i not in compacted]
                    if todo:
                        pipe = poll.pipeline(transaction=False)
                        for i in todo:
                            pipe.exists(keys.seen(i))
                            pipe.zscore(keys.pending, i)
                        got = pipe.execute()
                        for j, i in enumerate(todo):
                            seen, pending = got[2 * j], got[2 * j + 1]
                            if seen and i not in ingested:
                                ingested[i] = now
                            if seen and pending is None:
                                compacted[i] = now
                    for w in (first, last):
                        raw = poll.get(keys.snapshot(w))
                        if raw is not None:
                            count = int(json.loads(raw)["sample_count"])
                            if not snaps[w] or snaps[w][-1][1] != count:
                                snaps[w].append((now, count))
                    time.sleep(0.1)

            thread = threading.Thread(target=poller, daemon=True)
            thread.start()
            try:
                started = time.time()
                for i in range(n):
                    time.sleep(max(0.0, started + i / args.latency_rate - time.time()))
                    y = rng.choice(args.vocab, size=rows, p=p)
                    batch_id = f"lat-{i}"
                    sent[batch_id] = time.time()
                    client.submit_features(
                        MODEL, pool[i % POOL], y, batch_id=batch_id, half_precision=True
                    )
                    ids.append(batch_id)
                log(f"latency: {n} batches sent in {time.time() - started:.0f} s")
                bound = 3 * args.evaluation_interval + 600
                total = n * rows

                def done() -> bool:
                    return all(bool(s) and s[-1][1] >= total for s in snaps.values())

                wait_for(done, bound, "the last snapshot", interval=0.5)
            finally:
                stop.set()
                thread.join(timeout=10)
            evaluations = evaluation_times(store, windows)
            largest = largest_value(store.client)
    order = sorted(ids, key=lambda i: (compacted[i], int(i.split("-")[1])))
    rank = {i: r for r, i in enumerate(order)}

    def to_snapshot(w: str) -> list[float]:
        out = []
        for i in ids:
            need = (rank[i] + 1) * rows
            when = next(t for t, count in snaps[w] if count >= need)
            out.append(when - sent[i])
        return out

    return {
        "batches": n,
        "rows": rows,
        "rate": args.latency_rate,
        "to_ingested": [ingested[i] - sent[i] for i in ids],
        "to_window": [compacted[i] - sent[i] for i in ids],
        "to_first": to_snapshot(first),
        "to_last": to_snapshot(last),
        "first": first,
        "last": last,
        "evaluations": evaluations,
        "largest": largest,
    }


def evaluation_times(store: Any, windows: list[str]) -> list[float]:
    """Seconds of each whole evaluation (all windows; one `timestamp` per evaluate_model)."""
    by_time: dict[float, float] = {}
    for w in windows:
        for doc in store.history(MODEL, w, 1000):
            snap = json.loads(doc)
            if snap["sample_count"]:
                t = float(snap["timestamp"])
                by_time[t] = by_time.get(t, 0.0) + float(snap["duration_seconds"])
    return [by_time[t] for t in sorted(by_time)]


# ----------------------------------------------------------------------------- 2. throughput
def run_throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from monitor.pipeline.client import MonitorClient
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import maintain_model

    p = zipf_probabilities(args.vocab, args.zipf)
    pool = feature_pool(args.batch_size, args.dim)
    rng = np.random.default_rng(2)
    n, rows = args.batches, args.batch_size
    total = n * rows
    with redis_running(workdir, args.aof) as server:
        settings = settings_for(server.url, args, DEFAULT_WINDOWS)
        with service_stack(workdir, server.url, args, evaluation_s=1e6):
            runtime = Runtime(settings)
            store, client = runtime.store, MonitorClient(settings)
            maintain_model(store, MODEL)  # windows exist before the load, as in a deployment
            labels = [rng.choice(args.vocab, size=rows, p=p) for _ in range(n)]
            seen = {"ingested": None, "compacted": None, "pending": 0}
            started = time.perf_counter()

            def observe() -> None:
                now = time.perf_counter() - started
                seen["pending"] = max(seen["pending"], store.pending_count(MODEL))
                ingested = store.counters(MODEL).get("samples_ingested", 0)
                if seen["ingested"] is None and ingested >= total:
                    seen["ingested"] = now
                counts = window_counts(store).values()
                if seen["compacted"] is None and all(c == total for c in counts):
                    seen["compacted"] = now

            broker_message = 0
            for i, y in enumerate(labels):
                # The producer outruns the workers; a bounded backlog keeps the broker's
                # memory out of the measurement.
                while store.client.llen("ingest") >= 2 * args.ingest_workers:
                    time.sleep(0.05)
                client.submit_features(
                    MODEL, pool[i % POOL], y, batch_id=f"tp-{i}", half_precision=True
                )
                if not broker_message:  # one message's size, while one is queued
                    queued = store.client.lrange("ingest", 0, 0)
                    broker_message = max((len(m) for m in queued), default=0)
                observe()
            submitted = time.perf_counter() - started
            deadline = time.monotonic() + args.phase_timeout
            while seen["compacted"] is None and time.monotonic() < deadline:
                observe()
                time.sleep(0.2)
            if seen["compacted"] is None:
                raise TimeoutError(f"throughput: not all compacted after {args.phase_timeout} s")
        # Measured with every service stopped: no maintenance moves a state meanwhile.
        memory = memory_report(store, args)
        largest = largest_value(store.client)
    return {
        "batches": n,
        "rows": rows,
        "samples": total,
        "submit_s": submitted,
        "ingested_s": seen["ingested"],
        "compacted_s": seen["compacted"],
        "peak_pending": seen["pending"],
        "broker_message": broker_message,
        "memory": memory,
        "largest": largest,
    }


# ----------------------------------------------------------------------------- 3./4. growth
def run_growth(
    args: argparse.Namespace,
    ingest: Callable[[np.ndarray, np.ndarray, str], None],
    compact: Callable[[], int],
    probe: Callable[[], dict[str, Any]],
    label: str,
) -> list[dict[str, Any]]:
    """Fill the window with new classes up to each stage, then time the compaction of
    `--stage-batches` Zipf batches into it. Same data for every store given the same args."""
    p = zipf_probabilities(args.vocab, args.zipf)
    pool = feature_pool(args.batch_size, args.dim)
    rng = np.random.default_rng(3)
    fill_order = rng.permutation(args.vocab)
    seen = np.zeros(args.vocab, dtype=bool)
    position, fills, out = 0, 0, []

    def fill_to(target: int) -> None:
        nonlocal position, fills
        while int(seen.sum()) < target:
            want = min(target - int(seen.sum()), args.batch_size)
            fresh = []
            while len(fresh) < want:
                c = int(fill_order[position])
                position += 1
                if not seen[c]:
                    fresh.append(c)
            y = np.array(fresh, dtype=np.int64)
            ingest(pool[fills % POOL][: len(y)], y, f"fill-{fills}")
            seen[y] = True
            fills += 1
            compact()

    for stage in args.stages:
        try:
            fill_to(min(stage, args.vocab))
            classes = int(seen.sum())
            labels = [
                rng.choice(args.vocab, size=args.batch_size, p=p) for _ in range(args.stage_batches)
            ]
            # Rows the merge reads back (classes the window has) cost more than rows it
            # creates, so the share of touched classes already in the window is reported.
            touched = np.unique(np.concatenate(labels))
            present = float(seen[touched].mean())
            for j, y in enumerate(labels):
                ingest(pool[j % POOL], y, f"m{stage}-{j}")
                seen[y] = True
            started = time.perf_counter()
            steps = compact()
            seconds = time.perf_counter() - started
        except Exception as exc:  # the old store gives up on large buckets: say where
            out.append({"classes": int(seen.sum()), "error": f"{type(exc).__name__}: {exc}"})
            log(f"{label}: failed with {int(seen.sum()):,} classes: {out[-1]['error']}")
            break
        samples = args.stage_batches * args.batch_size
        out.append(
            {
                "classes": classes,
                "samples": samples,
                "seconds": seconds,
                "per_1000": seconds / (samples / 1000),
                "steps": steps,
                "touched": len(touched),
                "present": present,
                **probe(),
            }
        )
        log(f"{label}: K = {classes:,}: {seconds:.2f} s for {samples:,} samples ({steps} steps)")
    return out


def growth_ts() -> float:
    """One timestamp for the whole growth phase: every batch lands in one fine bucket."""
    now = time.time()
    return now - now % 300 + 1.0


def run_growth_new(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from monitor.pipeline.payload import encode_batch
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import compact_model, maintain_model, window_summary

    with redis_running(workdir, args.aof) as server:
        runtime = Runtime(settings_for(server.url, args, GROWTH_WINDOWS))
        store = runtime.store
        maintain_model(store, MODEL)  # the window exists before data arrives: added to directly
        ts = growth_ts()

        def ingest(x: np.ndarray, y: np.ndarray, batch_id: str) -> None:
            runtime.ingestor.ingest(encode_batch(MODEL, x, y, batch_id=batch_id, ts=ts))

        def compact() -> int:
            return int(compact_model(store, MODEL).buckets)

        def probe() -> dict[str, Any]:
            summary = window_summary(store, MODEL, "1h", 3600)
            return {"window_classes": summary.class_count, "model_bytes": store.memory_bytes(MODEL)}

        stages = run_growth(args, ingest, compact, probe, "growth")
        memory = memory_report(store, args)
        largest = largest_value(store.client)
    return {"stages": stages, "memory": memory, "largest": largest}


def run_growth_before(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The growth phase on the store of `--before-rev`, in a child importing that code."""
    code = workdir / "code"
    code.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", args.before_rev, "monitor"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    stages = before_stages(args)
    skipped = [s for s in args.stages if s not in stages]
    with redis_running(workdir, args.aof) as server:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *child_args(args),
            "--stages",
            ",".join(str(s) for s in stages),
            "--child",
            "before",
            "--code",
            str(code),
            "--redis-url",
            server.url,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.phase_timeout, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"before child failed: {proc.stderr[-2000:]}")
    sys.stderr.write(proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout)
    for stage in skipped:
        result["stages"].append({"classes": stage, "skipped": True})
    return result


def before_stages(args: argparse.Namespace) -> list[int]:
    """Stages whose bucket blob stays under Redis's proto-max-bulk-len (512 MiB): a larger
    value is refused, the connection drops and the old compaction retries until it gives up
    ("lost 20 races in a row") after re-merging the blob 20 times."""
    p = zipf_probabilities(args.vocab, args.zipf)
    added = expected_classes(p, args.stage_batches * args.batch_size)  # by the timed batches
    limit = 0.95 * MAX_BULK / row_bytes(args.dim)
    return [s for s in args.stages if min(s, args.vocab) + added < limit]


def child_before(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(args.code).resolve()))
    import monitor
    from monitor.pipeline.payload import encode_batch
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import compact_model

    if not Path(monitor.__file__).resolve().is_relative_to(Path(args.code).resolve()):
        raise RuntimeError(f"imported {monitor.__file__}, not the code under {args.code}")
    runtime = Runtime(settings_for(args.redis_url, args, GROWTH_WINDOWS))
    store = runtime.store
    ts = growth_ts()

    def ingest(x: np.ndarray, y: np.ndarray, batch_id: str) -> None:
        runtime.ingestor.ingest(encode_batch(MODEL, x, y, batch_id=batch_id, ts=ts))

    def compact() -> int:
        return int(compact_model(store, MODEL).buckets)

    def probe() -> dict[str, Any]:
        size, where = largest_value(store.client)
        return {"largest": size, "largest_key": where}

    return {"stages": run_growth(args, ingest, compact, probe, "before")}


# ----------------------------------------------------------------------------- 5. read
def run_read(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from monitor.pipeline.payload import encode_batch
    from monitor.pipeline.runtime import Runtime
    from monitor.stats.fields import GLOBAL_FIELD, Globals
    from monitor.store.base import WindowState, window_state

    k = min(args.read_k or args.vocab, args.vocab)
    with redis_running(workdir, args.aof) as server:
        runtime = Runtime(settings_for(server.url, args, GROWTH_WINDOWS))
        store = runtime.store
        # The globals field of a real batch (the model's RFF layout), then counts to match.
        x = feature_pool(64, args.dim)[0]
        runtime.ingestor.ingest(encode_batch(MODEL, x, np.arange(64) % args.vocab, batch_id="g"))
        real = Globals.decode(store.client.hget(store.keys(MODEL).partial("g"), GLOBAL_FIELD))
        store.client.flushall()
        rng = np.random.default_rng(5)
        ids = rng.permutation(args.vocab)[:k]
        counts = rng.integers(1, 17, size=k)
        dtype = np.dtype([("n", "<i8"), ("q", "<f8"), ("s", "<f8", (args.dim,))])
        step = max(1, 32 * 2**20 // dtype.itemsize)
        g = dataclasses.replace(
            real,
            counters={
                "sample_count": int(counts.sum()),
                "unit_count": int(counts.sum()),
                "nc4_hits": 0,
                "nc4_total": 0,
            },
        )

        def chunks() -> Iterator[dict[bytes, bytes]]:
            yield {GLOBAL_FIELD: g.encode()}
            for start in range(0, k, step):
                part = slice(start, start + step)
                rows = np.empty(len(ids[part]), dtype=dtype)
                rows["n"] = counts[part]
                rows["s"] = rng.standard_normal((len(rows), args.dim)) * rows["n"][:, None]
                rows["q"] = (rows["s"] ** 2).sum(axis=1) / rows["n"] + args.dim * rows["n"]
                yield {str(c).encode(): r.tobytes() for c, r in zip(ids[part], rows, strict=True)}

        started = time.perf_counter()
        store.write_state(MODEL, window_state("1h"), chunks())
        written = time.perf_counter() - started
        now = time.time()
        state = WindowState(3600, "fine", store.policy.window_since(3600, now), built=now)
        store.client.hset(store.keys(MODEL).windows, "1h", json.dumps(dataclasses.asdict(state)))
        fields, values, usage = hash_sizes(store.client, store.keys(MODEL).state("window:1h"))
        used = int(store.client.info("memory")["used_memory"])
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *child_args(args),
            "--child",
            "read",
            "--redis-url",
            server.url,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.phase_timeout, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"read child failed: {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout)
    if child["classes"] != k or child["samples"] != int(counts.sum()):
        raise RuntimeError(f"read back {child}, wrote {k} classes, {int(counts.sum())} samples")
    return {
        "k": k,
        "write_s": written,
        "fields": fields,
        "values_bytes": values,
        "state_bytes": usage,
        "used_memory": used,
        **child,
    }


def child_read(args: argparse.Namespace) -> dict[str, Any]:
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import window_stats

    runtime = Runtime(settings_for(args.redis_url, args, GROWTH_WINDOWS))
    runtime.store.ping()
    before = rss_kib()
    started = time.perf_counter()
    stats = window_stats(runtime.store, MODEL, "1h", 3600).stats
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert stats is not None
    return {
        "read_s": seconds,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "classes": int(stats.touched_classes),
        "samples": int(stats.sample_count),
        "tensor_mib": stats.touched_classes * row_bytes(args.dim) / 2**20,
    }


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- output
def mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def ms_list(values: list[float]) -> str:
    return f"{percentile(values, 0.5):.1f} s / {percentile(values, 0.95):.1f} s"


def print_tables(args: argparse.Namespace, r: dict[str, Any]) -> None:
    if any(isinstance(r.get(name), dict) for name in PHASES if name != "modes"):
        print_store_tables(args, r)
    if isinstance(r.get("modes"), dict):
        from window_memory import print_modes

        print_modes(args, r["modes"])
    notes = [f"- {name}: {r[name]}" for name in PHASES if isinstance(r.get(name), str)]
    if notes:
        print("\nPhases not measured:\n")
        print("\n".join(notes))


def print_store_tables(args: argparse.Namespace, r: dict[str, Any]) -> None:
    print(
        f"#### Split store at V = {args.vocab:,}, d = {args.dim:,} (Zipf s = {args.zipf}, "
        f"float16 wire, batches of {args.batch_size:,}, Redis AOF: {args.aof})\n"
    )
    print(
        f"Machine load (1-minute average) at the start {r['load'][0]:.1f}, at the end "
        f"{r['load'][1]:.1f}; {os.cpu_count()} cores. Row = 8 d + 16 = "
        f"{row_bytes(args.dim):,} B.\n"
    )
    print("| measure | value | goal / note |")
    print("| --- | --- | --- |")
    lat, tp = r.get("latency"), r.get("throughput")
    if isinstance(tp, dict):
        total = tp["samples"]
        print(
            f"| sustained ingest + compaction ({args.ingest_workers} ingest worker(s), 1 "
            f"maintenance worker, compaction every {args.compaction_interval:g} s) "
            f"| **{total / tp['compacted_s']:,.0f} samples/s** ({total:,} samples in "
            f"{tp['compacted_s']:.0f} s) | ingest alone {total / tp['ingested_s']:,.0f} "
            f"samples/s; submit {tp['submit_s']:.0f} s; up to {tp['peak_pending']} partials "
            "pending; evaluation off |"
        )
    if isinstance(lat, dict):
        evals = lat["evaluations"]
        one = max(evals) if evals else float("nan")
        bound = 2 * args.evaluation_interval + one
        p95 = percentile(lat["to_last"], 0.95)
        print(
            f"| arrival -> ingested (`seen`), p50 / p95 | {ms_list(lat['to_ingested'])} "
            f"| steady {lat['rate']:g} batches/s, {lat['batches']} batches |"
        )
        print(
            f"| arrival -> in the windows (compacted), p50 / p95 | {ms_list(lat['to_window'])} "
            f"| compaction every {args.compaction_interval:g} s |"
        )
        print(
            f"| arrival -> snapshot `{lat['first']}` (evaluated first), p50 / p95 "
            f"| {ms_list(lat['to_first'])} | the gauge shows it at the next scrape |"
        )
        print(
            f"| arrival -> snapshot `{lat['last']}` (evaluated last), p50 / p95 "
            f"| {ms_list(lat['to_last'])} | goal <= 2 x {args.evaluation_interval:g} s + one "
            f"evaluation ({one:.1f} s) = {bound:.0f} s: "
            f"**{'met' if p95 <= bound else 'not met'}** (p95) |"
        )
        if evals:
            print(
                f"| one evaluation (3 windows, metrics included), median / max "
                f"| {statistics.median(evals):.1f} s / {max(evals):.1f} s "
                f"| {len(evals)} evaluations |"
            )
    largest = [
        r[k]["largest"] for k in ("latency", "throughput", "growth") if isinstance(r.get(k), dict)
    ]
    if largest:
        size, where = max(largest)
        met = "met" if size <= LIMIT_BYTES else "NOT met"
        print(f"| largest Redis value (every key of every phase) | {mib(size)} (`{where}`) "
              f"| <= 64 MB: **{met}** |")  # fmt: skip
    if isinstance(tp, dict) and tp["broker_message"]:
        print(
            f"| largest broker message (queue `ingest`, one batch) | {mib(tp['broker_message'])} "
            "| the broker's, not the store's |"
        )
    for label, key in (("after the throughput run, 3 windows", "throughput"),
                       ("after growth, window 1h only", "growth")):  # fmt: skip
        phase = r.get(key)
        if isinstance(phase, dict):
            m = phase["memory"]
            print(
                f"| Redis memory of the model ({label}) | {mib(m['model_bytes'])} "
                f"(`used_memory` {mib(m['used_memory'])}, peak {mib(m['used_memory_peak'])}) "
                f"| formula with 60 B/field: {mib(m['formula_bytes'])} "
                f"({m['model_bytes'] / max(m['formula_bytes'], 1):.2f}x); {m['rows']:,} rows "
                f"in {m['states']} hashes; measured overhead **{m['overhead_per_field']:,.0f} "
                "B per field** |"
            )
    rd = r.get("read")
    if isinstance(rd, dict):
        over = (rd["state_bytes"] - rd["values_bytes"]) / rd["fields"]
        print(
            f"| `window_stats` of a window of K = {rd['k']:,} classes (fresh process) "
            f"| **{rd['read_s']:.1f} s**, peak RSS {rd['peak_mib']:,.0f} MiB "
            f"({rd['rss_before_mib']:,.0f} MiB before the read) "
            f"| K x row = {rd['tensor_mib']:,.0f} MiB; Redis holds the window in "
            f"{mib(rd['state_bytes'])} ({over:,.0f} B/field over the values); metrics: "
            "bench_scale_eval.py |"
        )

    growth, before = r.get("growth"), r.get("before")
    if isinstance(growth, dict) or isinstance(before, dict):
        print(
            f"\nCompaction of {args.stage_batches} Zipf batches "
            f"({args.stage_batches * args.batch_size:,} samples) into a window that holds "
            "K classes (filled with new classes between stages; one 5-minute bucket "
            "throughout). New store: window `1h` only, so 3 targets (fine bucket, coarse "
            "bucket, 1h); with the default three windows it writes 5. "
            f"Before ({args.before_rev}): one blob per bucket, 2 targets (fine, coarse), "
            "each re-read, merged and rewritten whole.\n"
        )
        new_rows = growth["stages"] if isinstance(growth, dict) else []
        old_rows = before["stages"] if isinstance(before, dict) else []
        print(
            "| window K | classes the batches touch (in the window already) "
            "| new: s per 1,000 samples | new: merge s (steps) "
            "| before: s per 1,000 samples | before: merge s | before: largest value |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for i in range(max(len(new_rows), len(old_rows))):
            n = new_rows[i] if i < len(new_rows) else None
            o = old_rows[i] if i < len(old_rows) else None
            k = (n or o or {}).get("classes", 0)
            t = n if n and "error" not in n else o if o and "error" not in o else {}
            cells = [f"{k:,}", f"{t.get('touched', 0):,} ({100 * t.get('present', 0):.0f}%)"]
            for row, width in ((n, 2), (o, 3)):
                if row is None:
                    cells += [""] * width
                elif row.get("skipped"):
                    cells += [
                        f"not run: a bucket blob of K + the new classes, x {row_bytes(args.dim):,}"
                        " B, is over Redis's 512 MiB value limit (the old compaction fails)"
                    ] + [""] * (width - 1)
                elif "error" in row:
                    cells += [f"fails while filling to this K, at {row['classes']:,} classes: "
                              f"{row['error'][:160]}"] + [""] * (width - 1)  # fmt: skip
                elif width == 2:
                    cells += [f"{row['per_1000']:.3f}", f"{row['seconds']:.2f} ({row['steps']})"]
                else:
                    cells += [
                        f"{row['per_1000']:.3f}",
                        f"{row['seconds']:.2f}",
                        mib(row["largest"]),
                    ]
            print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- main
def child_args(args: argparse.Namespace) -> list[str]:
    """The options a child needs to rebuild the same inputs."""
    return [
        "--vocab", str(args.vocab),
        "--dim", str(args.dim),
        "--batch-size", str(args.batch_size),
        "--zipf", str(args.zipf),
        "--stages", ",".join(str(s) for s in args.stages),
        "--stage-batches", str(args.stage_batches),
    ]  # fmt: skip


def phase(
    results: dict[str, Any], name: str, need_gib: float, args: argparse.Namespace, fn: Any
) -> None:
    ok, why = memory_ok(need_gib, args.memory_wait, name)
    if not ok:
        log(why)
        results[name] = why
        return
    log(f"{name}: starting (estimated {need_gib:.1f} GiB)")
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"bss-{name}-") as tmp:
            results[name] = fn(args, Path(tmp))
    except Exception as exc:  # the other phases still run; the exit code says it failed
        results[name] = f"FAILED: {type(exc).__name__}: {exc}"
        results.setdefault("failed", []).append(name)
        log(f"{name}: {results[name]}")
    log(f"{name}: {time.perf_counter() - started:.0f} s")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--batches", type=int, default=16, help="throughput run: batches")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--zipf", type=float, default=1.1, help="label exponent")
    p.add_argument("--latency-batches", type=int, default=16)
    p.add_argument("--latency-rate", type=float, default=0.2, help="batches/s, steady")
    p.add_argument("--compaction-interval", type=float, default=5.0)
    p.add_argument("--evaluation-interval", type=float, default=60.0)
    p.add_argument("--ingest-workers", type=int, default=2)
    p.add_argument(
        "--stages",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1_000, 5_000, 10_000, 20_000, 50_000],
        help="window sizes (classes)",
    )
    p.add_argument("--stage-batches", type=int, default=4, help="Zipf batches timed per stage")
    p.add_argument("--read-k", type=int, default=0, help="classes of the read (0: vocabulary)")
    p.add_argument("--before", choices=["on", "off"], default="on")
    p.add_argument("--before-rev", default="aef66a4")
    p.add_argument("--phases", default="latency,throughput,growth,before,read,modes")
    p.add_argument("--modes-hours", type=int, default=48, help="modes: simulated hours")
    p.add_argument(
        "--modes-samples", type=int, default=512, help="modes: samples per 5-minute bucket"
    )
    p.add_argument("--modes-pin", type=int, choices=[0, 1], default=1, help="modes: pin 24h")
    p.add_argument("--aof", choices=["no", "everysec", "always"], default="no")
    p.add_argument("--memory-wait", type=float, default=900.0, help="seconds to wait for RAM")
    p.add_argument("--phase-timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--child", choices=["before", "read"], help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.dim, args.batch_size = min(args.vocab, 2_000), 32, 256
        args.batches, args.latency_batches, args.latency_rate = 4, 4, 4.0
        args.compaction_interval, args.evaluation_interval = 1.0, 2.0
        args.ingest_workers, args.stages, args.stage_batches = 1, [100, 400], 2
        args.memory_wait, args.phase_timeout = 0.0, 240.0
        args.modes_hours, args.modes_samples = 8, 64
    return args


def main(argv: list[str] | None = None) -> int:
    from window_memory import need_bytes, run_modes  # imports this module's helpers

    args = parse(argv)
    if args.child == "before":
        print(json.dumps(child_before(args)))
        return 0
    if args.child == "read":
        print(json.dumps(child_read(args)))
        return 0
    # Rough needs in bytes, to wait for memory (row: allocator size classes, measured below).
    row = row_bytes(args.dim) * 1.3 + 100
    p = zipf_probabilities(args.vocab, args.zipf)
    partial = expected_classes(p, args.batch_size) * row
    latency = 5 * expected_classes(p, args.latency_batches * args.batch_size) * row + 3e9
    stack = 5 * expected_classes(p, args.batches * args.batch_size) * row + 6 * partial + 3e9
    growth = 3 * max(args.stages) * row + 2e9
    before = 6 * min(max(before_stages(args), default=0), args.vocab) * row + 1e9
    read = 2 * (args.read_k or args.vocab) * row + 1e9
    wanted = args.phases.split(",")
    if args.before == "off":
        wanted = [w for w in wanted if w != "before"]
    results: dict[str, Any] = {"load": [os.getloadavg()[0], 0.0]}
    plan = {
        "latency": (latency, run_latency),
        "throughput": (stack, run_throughput),
        "growth": (growth, run_growth_new),
        "before": (before, run_growth_before),
        "read": (read, run_read),
        "modes": (need_bytes(args), run_modes),
    }
    for name, (need, fn) in plan.items():
        if name in wanted:
            phase(results, name, need / 2**30, args, fn)
    results["load"][1] = os.getloadavg()[0]
    print_tables(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
