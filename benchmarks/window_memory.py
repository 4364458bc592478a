"""Redis memory of the two window modes (issue 14): the `modes` phase of bench_store_scale.py.

The same Zipf traffic goes into two redis-servers, one per `window_mode`, through the real
ingestion (`Runtime.ingestor.ingest(encode_batch(...))` on the exact stack; its partial's fields
are put unchanged into the decayed stack, so both compact the same bytes), the real compaction
(`compact_model`) and maintenance (`maintain_model` at the batch's time). Time is simulated:
one batch of `--modes-samples` rows in every 5-minute bucket for `--modes-hours` hours ending
when the phase starts, with the default policy (fine buckets 5 min kept 1 h, coarse 3 h kept for
the longest window) and windows 15m / 1h / 24h. Then both are maintained at the real present, a
baseline is pinned from `24h` (`pin_window`, `--modes-pin`), and each model's memory
(`store.memory_bytes`, what `status` and the gauge report) is set against the formula of
docs/architecture.md applied to the class rows each state holds:

    sum over states of K_state x row + sum over states of alloc(g)
    row = alloc(value + 10) + FIELD_OVERHEAD, alloc = jemalloc's size class,
    value = 8 d + 16 (exact rows, baselines) or 8 d + 32 (decayed window rows)

(the 10-byte string header and the ~56 B of a field's dict entry and name: docs/architecture.md).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_store_scale import (
    DEFAULT_WINDOWS,
    MODEL,
    POOL,
    expected_classes,
    feature_pool,
    largest_value,
    log,
    mib,
    redis_running,
    settings_for,
    zipf_probabilities,
)

MODES = ("exact", "decayed")
FINE, COARSE, FINE_KEPT = 300, 10800, 3600  # the default bucket policy (docs/configuration.md)
STRING_HEADER = 10  # what Redis adds to a string value before the allocator rounds it
FIELD_OVERHEAD = 56  # a hash field's dict entry, its name and its slot in the table


def alloc(size: int) -> int:
    """jemalloc's size class of `size` bytes: four classes per doubling above 64 B."""
    if size <= 64:
        return max(8, -(-size // 16) * 16)
    step = 1 << (math.ceil(math.log2(size)) - 3)
    return -(-size // step) * step


def row_cost(value: int) -> int:
    return alloc(value + STRING_HEADER) + FIELD_OVERHEAD


def expected_rows(args: argparse.Namespace) -> dict[str, float]:
    """Class rows the traffic should leave, from its Zipf law (for sizing and the memory gate)."""
    p = zipf_probabilities(args.vocab, args.zipf)
    per = args.modes_samples  # samples per fine bucket

    def k(seconds: float) -> float:
        return expected_classes(p, round(per * seconds / FINE))

    windows = {w: k(s) for w, s in DEFAULT_WINDOWS.items()}
    hours = min(args.modes_hours, 27)
    buckets = (FINE_KEPT / FINE + 2) * k(FINE) + (hours * 3600 / COARSE + 1) * k(COARSE)
    return {**windows, "buckets": buckets, "baseline": windows["24h"] * args.modes_pin}


def need_bytes(args: argparse.Namespace) -> float:
    e = expected_rows(args)
    rows = 2 * (e["15m"] + e["1h"] + e["24h"] + e["baseline"]) + e["buckets"]
    return rows * row_cost(8 * args.dim + 32) * 1.2 + 2e9


# ----------------------------------------------------------------------------- measuring
def measure(runtime: Any, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model's memory, its class rows per state, and the formula applied to them."""
    from monitor.stats.decayed import DecayedGlobals, is_decayed
    from monitor.stats.fields import GLOBAL_FIELD, Globals

    store = runtime.store
    client, keys = store.client, store.keys(MODEL)
    rows: dict[str, int] = {"windows": 0, "buckets": 0, "baselines": 0}
    per_window: dict[str, int] = {}
    samples: dict[str, int] = {}
    formula = states = 0
    for key in client.scan_iter(match=f"{keys.base}:rows:*", count=1000):
        state = key.decode().split(":rows:", 1)[1]
        kind = {"window": "windows", "bucket": "buckets", "baseline": "baselines"}.get(
            state.split(":", 1)[0]
        )
        if kind is None:
            continue
        blob = client.hget(key, GLOBAL_FIELD)
        k = int(client.hlen(key)) - (blob is not None)
        decayed = blob is not None and is_decayed(blob)
        value = 8 * args.dim + (32 if decayed else 16)
        formula += k * row_cost(value) + (0 if blob is None else alloc(len(blob) + STRING_HEADER))
        rows[kind] += k
        states += 1
        if kind == "windows" and blob is not None:
            label = state.split(":", 1)[1]
            per_window[label] = k
            if decayed:  # Kish's effective count, what `status` shows
                samples[label] = DecayedGlobals.decode(blob).effective_samples()
            else:
                samples[label] = Globals.decode(blob).sample_count
    info = client.info("memory")
    size, where = largest_value(client)
    return {
        "mode": mode,
        "model_bytes": int(store.memory_bytes(MODEL)),
        "formula_bytes": formula,
        "rows": rows,
        "states": states,
        "window_classes": per_window,
        "window_samples": samples,
        "largest": size,
        "largest_key": where,
        "used_memory": int(info["used_memory"]),
        "used_memory_peak": int(info["used_memory_peak"]),
    }


# ----------------------------------------------------------------------------- the phase
def run_modes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from monitor.pipeline.baselines import pin_window
    from monitor.pipeline.payload import encode_batch
    from monitor.pipeline.runtime import Runtime
    from monitor.pipeline.windows import compact_model, maintain_model

    p = zipf_probabilities(args.vocab, args.zipf)
    pool = feature_pool(args.modes_samples, args.dim, seed=3)
    rng = np.random.default_rng(11)
    with contextlib.ExitStack() as stack:
        runtimes = {}
        for mode in MODES:
            server = stack.enter_context(redis_running(workdir / mode, args.aof))
            settings = settings_for(server.url, args, DEFAULT_WINDOWS, window_mode=mode)
            runtimes[mode] = Runtime(settings)
        start = time.time() // FINE * FINE - args.modes_hours * 3600
        for runtime in runtimes.values():  # the windows exist before the data
            maintain_model(runtime.store, MODEL, start)
        seconds = dict.fromkeys(MODES, 0.0)
        trace: dict[str, list[int]] = {mode: [] for mode in MODES}  # after every batch
        series: list[dict[str, Any]] = []
        source = runtimes["exact"]
        i, bucket = 0, start
        # Every bucket that has ended by the wall clock (the run catches up with it), so the
        # traffic reaches the present and the pin, which maintains at the wall clock, sees a
        # window less than one bucket after its last batch.
        while bucket + FINE <= time.time():
            ts = bucket + float(rng.uniform(0, FINE))
            y = rng.choice(args.vocab, size=args.modes_samples, p=p)
            batch_id = f"m-{i}"
            payload = encode_batch(MODEL, pool[i % POOL], y, batch_id=batch_id, ts=ts)
            source.ingestor.ingest(payload, now=ts)
            redis_store: Any = source.store  # a RedisStore: its raw client and key names
            fields = redis_store.client.hgetall(redis_store.keys(MODEL).partial(batch_id))
            runtimes["decayed"].store.put_partial(MODEL, batch_id, fields, ts, len(y))
            for mode, runtime in runtimes.items():
                began = time.perf_counter()
                compact_model(runtime.store, MODEL)
                maintain_model(runtime.store, MODEL, ts)
                seconds[mode] += time.perf_counter() - began
                trace[mode].append(int(runtime.store.memory_bytes(MODEL)))
            if (bucket - start) % COARSE == COARSE - FINE:  # every 3 simulated hours
                point = {m: trace[m][-1] for m in MODES}
                series.append({"hours": (bucket + FINE - start) / 3600, **point})
                log(
                    f"modes: {series[-1]['hours']:.0f} h simulated, exact {mib(point['exact'])}, "
                    f"decayed {mib(point['decayed'])}; compaction + maintenance "
                    f"{seconds['exact']:.0f} s / {seconds['decayed']:.0f} s"
                )
            i, bucket = i + 1, bucket + FINE
        now = time.time()
        last_day = -round(min(24.0, args.modes_hours / 2) * 3600 / FINE)
        result: dict[str, Any] = {
            "series": series,
            "seconds": seconds,
            "samples": args.modes_samples * i,
            "hours": (bucket - start) / 3600,
            "steady_hours": -last_day * FINE / 3600,
            "steady": {m: (min(trace[m][last_day:]), max(trace[m][last_day:])) for m in MODES},
        }
        for mode, runtime in runtimes.items():
            maintain_model(runtime.store, MODEL, now)
            result[mode] = measure(runtime, mode, args)
            if args.modes_pin:
                pin_window(runtime.store, runtime.registry, MODEL, "day", "24h", 86400)
                result[f"{mode}_pinned"] = measure(runtime, mode, args)
    result["expected"] = expected_rows(args)
    return result


# ----------------------------------------------------------------------------- output
def print_modes(args: argparse.Namespace, r: dict[str, Any]) -> None:
    e = r["expected"]
    print(
        f"\n#### Window modes at V = {args.vocab:,}, d = {args.dim:,}: Redis memory of the model "
        f"(Zipf s = {args.zipf}, {args.modes_samples:,} samples per 5-minute bucket for "
        f"{r['hours']:.1f} simulated hours: {r['samples']:,} samples; windows 15m / 1h / 24h; "
        "default buckets)\n"
    )
    print(
        f"Row in the formula: exact {row_cost(8 * args.dim + 16):,} B, decayed window "
        f"{row_cost(8 * args.dim + 32):,} B (value + {STRING_HEADER} B header rounded to "
        f"jemalloc's size class, + {FIELD_OVERHEAD} B per field). Expected from the traffic's "
        f"Zipf law: 15m {e['15m']:,.0f}, 1h {e['1h']:,.0f}, 24h {e['24h']:,.0f} classes, "
        f"{e['buckets']:,.0f} bucket rows (exact).\n"
    )
    print(
        "| mode | state | Redis memory of the model | formula | measured / formula "
        "| class rows: windows / buckets / baselines | classes 15m / 1h / 24h "
        "| samples 15m / 1h / 24h | largest value |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    stages = [("", "windows and buckets")]
    if args.modes_pin:
        stages.append(("_pinned", "+ baseline pinned from 24h"))
    for suffix, label in stages:
        for mode in MODES:
            m = r[mode + suffix]
            rows = m["rows"]
            wc, ws = m["window_classes"], m["window_samples"]
            order = sorted(wc, key=DEFAULT_WINDOWS.__getitem__)
            print(
                f"| {mode} | {label} | **{mib(m['model_bytes'])}** | {mib(m['formula_bytes'])} "
                f"| {m['model_bytes'] / max(m['formula_bytes'], 1):.3f} "
                f"| {rows['windows']:,} / {rows['buckets']:,} / {rows['baselines']:,} "
                f"| {' / '.join(f'{wc[w]:,}' for w in order)} "
                f"| {' / '.join(f'{ws[w]:,}' for w in order)} "
                f"| {m['largest']:,} B (`{m['largest_key'].split(':rows:')[-1]}`) |"
            )
    ex, de = r["exact"], r["decayed"]
    print(
        f"\nExact / decayed: {ex['model_bytes'] / max(de['model_bytes'], 1):.2f}x. Compaction + "
        f"maintenance of the whole traffic: exact {r['seconds']['exact']:.0f} s, decayed "
        f"{r['seconds']['decayed']:.0f} s. Peak `used_memory`: exact "
        f"{mib(ex['used_memory_peak'])}, decayed {mib(de['used_memory_peak'])}. Decayed samples "
        "are Kish effective counts (what `status` shows).\n"
    )
    print("| simulated hours | " + " | ".join(f"{s['hours']:.0f}" for s in r["series"]) + " |")
    print("| --- |" + " --- |" * len(r["series"]))
    for mode in MODES:
        print(f"| {mode} | " + " | ".join(mib(s[mode]) for s in r["series"]) + " |")
    low_high = {m: " - ".join(mib(v) for v in r["steady"][m]) for m in MODES}
    print(
        f"\nRedis memory of the model after each batch of the last {r['steady_hours']:g} "
        f"simulated hours, least - most: exact {low_high['exact']}, decayed "
        f"{low_high['decayed']} (decayed windows drop their rows below `decay_min_weight` "
        "every max(tau / 2, 60 s): 6 h for 24h)."
    )
