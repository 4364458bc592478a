"""`RedisStore`: partials, buckets, windows, baselines, snapshots and counters in Redis.

Exactly once: a partial is written by a Lua script that first checks a `seen` marker which
outlives the partial itself, so a redelivered task finds its batch id and adds nothing, even
after compaction removed the partial. Compaction and maintenance are
`monitor.store.redis_compaction` (WATCH/MULTI, exactly once under races and crashes). Every
statistics state is a hash of fields (`monitor.stats.fields`), so a merge reads and
writes only the classes the new data touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from monitor.store import redis_compaction
from monitor.store.base import (
    FREQUENCY_DECAYED_FIELD,
    FREQUENCY_FLOOR,
    Baseline,
    BaselineExists,
    BucketPolicy,
    Chunk,
    CompactionResult,
    FieldAlgebra,
    Fields,
    LegacyStoreFormat,
    MaintenanceResult,
    TrackedCounts,
    WindowState,
    baseline_state,
    bucket_state,
)
from monitor.store.keys import LEVELS, ModelKeys, legacy_indexes, models_key
from monitor.store.redis_compaction import parse_windows
from monitor.store.redis_states import StateLock, StateOps

# The ingestion counters move in the same script as the partial, so they stay exactly once too;
# so do a capped model's class frequencies (max_tracked_classes) and untracked samples
# (ARGV[6]; ARGV[7] = number of class/count pairs, 0 without the cap). The `seen` marker is set
# last: Redis does not roll a script back, so if a command fails midway (a key of the wrong
# type) the batch id is not burned and a retry rewrites the same fields.
_PUT_PARTIAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[4], 'batches_duplicate', 1)
  return 0
end
local first = 8 + 2 * tonumber(ARGV[7])
for i = first, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'batches_ingested', 1)
redis.call('HINCRBY', KEYS[4], 'samples_ingested', ARGV[5])
if tonumber(ARGV[6]) > 0 then
  redis.call('HINCRBY', KEYS[4], 'untracked_samples', ARGV[6])
end
for i = 8, first - 1, 2 do
  redis.call('ZINCRBY', KEYS[5], ARGV[i + 1], ARGV[i])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
return 1
"""
# Frequencies halve once per whole half-life since the stamp in meta, atomically with it.
_DECAY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = redis.call('HGET', KEYS[2], ARGV[4])
if not last then
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[1])
  return 0
end
local half_life = tonumber(ARGV[2])
local steps = math.floor((tonumber(ARGV[1]) - tonumber(last)) / half_life)
if steps < 1 then return 0 end
local weight = string.format('%.17g', 0.5 ^ steps)
redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', weight)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4], string.format('%.17g', tonumber(last) + steps * half_life))
return steps
"""
RedisClient = redis.Redis | RedisCluster
MAX_PARTIALS_MEASURED = 1000  # memory_bytes measures at most this many pending partials


class RedisStore:
    """The production store; `client` (standalone, Sentinel master or cluster) must be created
    with `decode_responses=False`. Every multi-key step names keys of one `{model}` slot."""

    def __init__(
        self, client: RedisClient, policy: BucketPolicy | None = None, prefix: str = "cm"
    ) -> None:
        self.client = client
        self.policy = policy or BucketPolicy()
        self.prefix = prefix
        self._put_partial = client.register_script(_PUT_PARTIAL)
        self._decay = client.register_script(_DECAY)
        self._lock = StateLock(client, self.policy.lock_seconds)
        self.ops = StateOps(client, self._lock)

    def keys(self, model: str) -> ModelKeys:
        return ModelKeys(self.prefix, model)

    def ping(self) -> bool:
        return bool(self.client.ping())

    # ------------------------------------------------------------- partials
    def put_partial(
        self,
        model: str,
        batch_id: str,
        fields: Fields,
        ts: float,
        samples: int,
        *,
        tracked: TrackedCounts | None = None,
    ) -> bool:
        k = self.keys(model)
        args: list[Any] = [ts, self.policy.seen_ttl, self.policy.partial_ttl, batch_id, samples]
        keys = [k.seen(batch_id), k.partial(batch_id), k.pending, k.counters, k.frequencies]
        frequencies = {} if tracked is None else tracked.frequencies
        args += [0 if tracked is None else int(tracked.untracked), len(frequencies)]
        for cls, count in frequencies.items():
            args += [int(cls), repr(float(count))]
        for name, value in fields.items():
            args += [name, value]
        written = self._put_partial(keys=keys, args=args)
        if written:
            self.client.sadd(models_key(self.prefix), model)
        return bool(written)

    def pending_count(self, model: str) -> int:
        return int(self.client.zcard(self.keys(model).pending))

    def oldest_pending(self, model: str) -> float | None:
        first = cast(list[Any], self.client.zrange(self.keys(model).pending, 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    # ----------------------------------------------------- class frequencies
    def add_frequencies(self, model: str, counts: Mapping[int, float]) -> None:
        key = self.keys(model).frequencies
        pipe = self.client.pipeline(transaction=True)
        for cls, count in counts.items():
            pipe.zincrby(key, float(count), str(int(cls)))
        pipe.execute()

    def top_classes(self, model: str, m: int) -> list[int]:
        if m < 1:
            return []
        raw = cast(list[bytes], self.client.zrevrange(self.keys(model).frequencies, 0, m - 1))
        return [int(c) for c in raw]

    def decay_frequencies(self, model: str, now: float) -> int:
        k = self.keys(model)
        args: list[Any] = [repr(float(now)), repr(self.policy.tracked_half_life)]
        args += [repr(FREQUENCY_FLOOR), FREQUENCY_DECAYED_FIELD]
        return int(self._decay(keys=[k.frequencies, k.meta], args=args))

    # ---------------------------------------------- compaction, maintenance
    def compact(
        self, model: str, algebra: FieldAlgebra, *, limit: int = 64, now: float | None = None
    ) -> CompactionResult:
        return redis_compaction.compact(self, model, algebra, limit)

    def maintain(self, model: str, algebra: FieldAlgebra, now: float) -> MaintenanceResult:
        return redis_compaction.maintain(self, model, algebra, now)

    def check_format(self, model: str) -> None:
        """Refuse to work on statistics of store format 1 (one blob per bucket)."""
        k = self.keys(model)
        if self.client.exists(*legacy_indexes(k)):
            raise LegacyStoreFormat(
                f"Redis holds statistics of model {model!r} in the store format of "
                "collapse-monitor 0.1 (one blob per bucket); run `collapse-monitor store migrate` "
                "to convert its baselines and pending batches and drop its old buckets"
            )

    # ---------------------------------------------------------------- reads
    @contextmanager
    def locked(self, model: str) -> Iterator[None]:
        key = self.keys(model).state_lock
        if key in self._lock.held:  # re-entrant within this store
            yield
            return
        self._lock.acquire(key)
        try:
            yield
        finally:
            self._lock.release(key)

    def state_field(self, model: str, state: str, field: bytes) -> bytes | None:
        return cast(bytes | None, self.client.hget(self.keys(model).state(state), field))

    def state_size(self, model: str, state: str) -> int:
        return int(self.client.hlen(self.keys(model).state(state)))

    def scan_state(self, model: str, state: str, *, max_bytes: int = 32 * 2**20) -> Iterator[Chunk]:
        k = self.keys(model)
        return self.ops.scan(k, k.state(state), max_bytes)

    def write_state(self, model: str, state: str, chunks: Iterable[Fields]) -> None:
        k = self.keys(model)
        staging = self.ops.stage(k, state, chunks)
        if staging is None:
            self.client.delete(k.state(state))
        else:
            self.client.rename(staging, k.state(state))
            self.client.persist(k.state(state))
        self.client.sadd(models_key(self.prefix), model)

    def windows(self, model: str) -> dict[str, WindowState]:
        return parse_windows(
            cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).windows))
        )

    def bucket_starts(self, model: str, level: str) -> list[int]:
        index = self.keys(model).bucket_index(level)
        return [int(s) for s in cast(list[bytes], self.client.zrange(index, 0, -1))]

    # ------------------------------------------------------------ baselines
    def pin_baseline(
        self,
        model: str,
        name: str,
        chunks: Iterable[Fields],
        meta: dict[str, object],
        *,
        replace: bool,
        calibration: bytes | None = None,
    ) -> None:
        k = self.keys(model)
        document = json.dumps(meta, sort_keys=True)
        if not replace and not self.client.hsetnx(k.baselines, name, document):
            raise BaselineExists(f"baseline {name!r} of model {model!r} is pinned already")
        staging = self.ops.stage(k, baseline_state(name), chunks)
        pipe = self.client.pipeline(transaction=True)
        if staging is None:
            pipe.delete(k.state(baseline_state(name)))
        else:
            pipe.rename(staging, k.state(baseline_state(name)))
            pipe.persist(k.state(baseline_state(name)))
        if calibration is None:
            pipe.delete(k.calibration(name))
        else:
            pipe.set(k.calibration(name), calibration)
        pipe.hset(k.baselines, name, document)
        pipe.execute()
        self.client.sadd(models_key(self.prefix), model)

    def baseline(self, model: str, name: str) -> Baseline | None:
        k = self.keys(model)
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(k.state(baseline_state(name)))
        pipe.hget(k.baselines, name)
        pipe.get(k.calibration(name))
        exists, document, calibration = pipe.execute()
        if not exists or document is None:
            return None
        return Baseline(name, json.loads(document), calibration)

    def baselines(self, model: str) -> dict[str, dict[str, object]]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).baselines))
        return {n.decode(): json.loads(v) for n, v in sorted(raw.items())}

    def unpin_baseline(self, model: str, name: str) -> bool:
        k = self.keys(model)
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(k.baselines, name)
        pipe.delete(k.state(baseline_state(name)), k.calibration(name))
        removed, _ = pipe.execute()
        return bool(removed)

    # ------------------------------------------------------------ snapshots
    def put_snapshot(self, model: str, window: str, document: str, *, history: int) -> None:
        k = self.keys(model)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(k.snapshot(window), document)
        pipe.lpush(k.history(window), document)
        pipe.ltrim(k.history(window), 0, max(history, 1) - 1)
        pipe.execute()

    def snapshot(self, model: str, window: str) -> str | None:
        raw = cast(bytes | None, self.client.get(self.keys(model).snapshot(window)))
        return None if raw is None else raw.decode()

    def history(self, model: str, window: str, count: int) -> list[str]:
        raw = cast(list[bytes], self.client.lrange(self.keys(model).history(window), 0, count - 1))
        return [r.decode() for r in raw]

    # ------------------------------------------------------------- counters
    def add_counters(self, model: str, deltas: dict[str, int]) -> None:
        if not deltas:
            return
        key = self.keys(model).counters
        pipe = self.client.pipeline(transaction=False)
        for name, value in deltas.items():
            pipe.hincrby(key, name, int(value))
        pipe.execute()

    def counters(self, model: str) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).counters))
        return {n.decode(): int(v) for n, v in raw.items()}

    def models(self) -> list[str]:
        raw = cast(set[bytes], self.client.smembers(models_key(self.prefix)))
        return sorted(m.decode() for m in raw)

    def memory_bytes(self, model: str) -> int:
        """Bytes Redis accounts (MEMORY USAGE) to the model's keys, found from its indexes.

        SCAN would walk the whole keyspace, millions of dedup markers included, on every
        scrape; the indexes name every key that holds statistics or snapshots in one round
        trip. The per-batch `seen` markers (a few bytes each) are left out.
        """
        k = self.keys(model)
        pipe = self.client.pipeline(transaction=False)
        for level in LEVELS:
            pipe.zrange(k.bucket_index(level), 0, -1)
        pipe.hkeys(k.baselines)
        pipe.hkeys(k.windows)
        pipe.zrange(k.pending, 0, MAX_PARTIALS_MEASURED - 1)
        *levels, baselines, windows, partials = pipe.execute()
        keys = [k.pending, k.baselines, k.counters, k.meta, k.windows, k.state("reference")]
        keys.append(k.frequencies)  # absent (0) unless the model has max_tracked_classes
        for level, starts in zip(LEVELS, levels, strict=True):
            keys.append(k.bucket_index(level))
            keys += [k.state(bucket_state(level, int(s))) for s in starts]
        for raw in baselines:
            keys += [k.state(baseline_state(raw.decode())), k.calibration(raw.decode())]
        for raw in windows:
            keys += [k.state(f"window:{raw.decode()}"), k.snapshot(raw.decode())]
            keys.append(k.history(raw.decode()))
        keys += [k.partial(raw.decode()) for raw in partials]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        return sum(int(n or 0) for n in pipe.execute())

    # ----------------------------------------------------------- meta, claims
    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        key = self.keys(model).meta
        self.client.hsetnx(key, field, value)
        current = cast(bytes | None, self.client.hget(key, field))
        return value if current is None else current.decode()

    def meta(self, model: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).meta))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def claim(self, model: str, name: str, ttl: float) -> bool:
        key = self.keys(model).claim(name)
        return bool(self.client.set(key, "1", nx=True, ex=max(1, int(ttl + 0.999))))
