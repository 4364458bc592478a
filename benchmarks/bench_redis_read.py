"""Reading a large state from Redis: redis-py's pure-Python reply parser against hiredis.

A window is read field by field in chunks (`RedisStore.scan_state`: HKEYS, then HMGET of about
32 MiB at a time); at d = 4,096 each class row is 32,784 bytes. The parser that turns Redis's
replies into Python bytes is the client's share of that read. This writes one synthetic
window of `--fields` rows of `8 d + 16` bytes into a redis-server on loopback (AOF off) and reads
it whole through `RedisStore.scan_state` with each parser in turn, `--repeats` times,
alternating, so both see the same server and machine load. Prints Markdown: MB/s per parser and
the ratio. The parser is chosen per connection pool (`parser_class`); redis-py uses hiredis by
itself whenever the package is installed.

    .venv/bin/python benchmarks/bench_redis_read.py                 # 8,000 rows at d = 4,096
    .venv/bin/python benchmarks/bench_redis_read.py --dim 768 --fields 40000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from redis._parsers import _HiredisParser, _RESP2Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from servers import RedisServer  # noqa: E402

from monitor.store.redis_store import RedisStore  # noqa: E402

PARSERS = {"python": _RESP2Parser, "hiredis": _HiredisParser}
MODEL = "bench"


def fill(client: redis.Redis, key: str, fields: int, dim: int) -> int:
    """`fields` random rows of 8 d + 16 bytes under `key`; returns the bytes written."""
    rng = np.random.default_rng(0)
    row = 8 * dim + 16
    written = 0
    for start in range(0, fields, 256):
        batch = {str(c).encode(): rng.bytes(row) for c in range(start, min(start + 256, fields))}
        client.hset(key, mapping=batch)  # type: ignore[arg-type]
        written += row * len(batch)
    return written


def read_once(port: int, parser: type, key_state: str) -> float:
    pool = redis.ConnectionPool(host="127.0.0.1", port=port, parser_class=parser)
    store = RedisStore(redis.Redis(connection_pool=pool))
    started = time.perf_counter()
    with store.locked(MODEL):
        for _ in store.scan_state(MODEL, key_state):
            pass
    elapsed = time.perf_counter() - started
    pool.disconnect()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--fields", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 rows, once")
    args = parser.parse_args()
    if args.quick:
        args.fields, args.repeats = 500, 1
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = server.client()
            client.config_set("appendonly", "no")
            state = "window:bench"
            key = RedisStore(client).keys(MODEL).state(state)
            size = fill(client, key, args.fields, args.dim)
            times: dict[str, list[float]] = {name: [] for name in PARSERS}
            for i in range(args.repeats):
                for name, cls in PARSERS.items():
                    times[name].append(read_once(server.port, cls, state))
                print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            server.stop()
    mb = size / 1e6
    print(
        f"Read of {args.fields:,} rows at d = {args.dim:,} ({mb:,.0f} MB), median of "
        f"{args.repeats}, redis-py {redis.__version__}\n"
    )
    print("| parser | seconds | MB/s |")
    print("|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {mb / seconds:,.0f} |")
    print(f"\nhiredis / python speed: {medians['python'] / medians['hiredis']:.2f}x")


if __name__ == "__main__":
    main()
