"""`RedisStore`: partials, buckets, baselines, snapshots and counters in Redis.

Exactly once: a partial is written by a Lua script that first checks a `seen` marker which
outlives the partial itself, so a redelivered task finds its batch id and adds nothing, even
after compaction removed the partial. Compaction merges partials into buckets inside
WATCH/MULTI on the bucket and partial keys: of two racing compactors one commits and the other
retries against the new state, and a crash before EXEC leaves everything as it was.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any, cast

import redis
from redis.exceptions import WatchError

from monitor.store.base import (
    Baseline,
    BaselineExists,
    BucketPolicy,
    CompactionResult,
    MergeFn,
)
from monitor.store.keys import LEVELS, ModelKeys, models_key

# The ingestion counters move in the same script as the partial, so they stay exactly once too.
_PUT_PARTIAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[4], 'batches_duplicate', 1)
  return 0
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
redis.call('HINCRBY', KEYS[4], 'batches_ingested', 1)
redis.call('HINCRBY', KEYS[4], 'samples_ingested', ARGV[6])
return 1
"""
_MAX_RETRIES = 20


class RedisStore:
    """The production store; `client` must be created with `decode_responses=False`."""

    def __init__(
        self, client: redis.Redis, policy: BucketPolicy | None = None, prefix: str = "cm"
    ) -> None:
        self.client = client
        self.policy = policy or BucketPolicy()
        self.prefix = prefix
        self._put_partial = client.register_script(_PUT_PARTIAL)

    def keys(self, model: str) -> ModelKeys:
        return ModelKeys(self.prefix, model)

    def ping(self) -> bool:
        return bool(self.client.ping())

    # ------------------------------------------------------------- partials
    def put_partial(self, model: str, batch_id: str, blob: bytes, ts: float, samples: int) -> bool:
        k = self.keys(model)
        written = self._put_partial(
            keys=[k.seen(batch_id), k.partial(batch_id), k.pending, k.counters],
            args=[blob, ts, self.policy.seen_ttl, self.policy.partial_ttl, batch_id, samples],
        )
        if written:
            self.client.sadd(models_key(self.prefix), model)
        return bool(written)

    def pending_count(self, model: str) -> int:
        return int(self.client.zcard(self.keys(model).pending))

    def oldest_pending(self, model: str) -> float | None:
        first = cast(list[Any], self.client.zrange(self.keys(model).pending, 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    # ----------------------------------------------------------- compaction
    def compact(self, model: str, merge: MergeFn, *, limit: int = 64) -> CompactionResult:
        started = time.perf_counter()
        k = self.keys(model)
        entries = cast(list[Any], self.client.zrange(k.pending, 0, limit - 1, withscores=True))
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for raw_id, ts in entries:
            key = (self.policy.start("fine", ts), self.policy.start("coarse", ts))
            groups[key].append(raw_id.decode())
        merged = retries = 0
        for (fine, coarse), members in groups.items():
            done, tries = self._compact_group(k, fine, coarse, members, merge)
            merged += done
            retries += tries
        return CompactionResult(
            partials=merged,
            buckets=len(groups),
            retries=retries,
            seconds=time.perf_counter() - started,
        )

    def _compact_group(
        self, k: ModelKeys, fine: int, coarse: int, members: list[str], merge: MergeFn
    ) -> tuple[int, int]:
        fine_key, coarse_key = k.bucket("fine", fine), k.bucket("coarse", coarse)
        partial_keys = [k.partial(m) for m in members]
        for attempt in range(_MAX_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(fine_key, coarse_key, *partial_keys)  # type: ignore[no-untyped-call]
                    scores = cast(list[Any], pipe.zmscore(k.pending, members))
                    live = [m for m, s in zip(members, scores, strict=True) if s is not None]
                    if not live:
                        return 0, attempt  # another compactor got there first
                    blobs = cast(list[bytes | None], pipe.mget([k.partial(m) for m in live]))
                    present = [b for b in blobs if b is not None]
                    fine_cur = cast(bytes | None, pipe.get(fine_key))
                    coarse_cur = cast(bytes | None, pipe.get(coarse_key))
                    pipe.multi()
                    if present:
                        for level, key, start, cur in (
                            ("fine", fine_key, fine, fine_cur),
                            ("coarse", coarse_key, coarse, coarse_cur),
                        ):
                            parts = present if cur is None else [cur, *present]
                            pipe.set(key, merge(parts), ex=self.policy.key_ttl(level))
                            pipe.zadd(k.bucket_index(level), {str(start): start})
                    pipe.zrem(k.pending, *live)
                    pipe.delete(*[k.partial(m) for m in live])
                    if len(present) < len(live):  # partials that expired before compaction
                        pipe.hincrby(k.counters, "partials_expired", len(live) - len(present))
                    pipe.hset(k.meta, "last_compaction", time.time())
                    pipe.execute()
                    return len(present), attempt
                except WatchError:
                    continue
        raise RuntimeError(f"compaction of {k.model} lost {_MAX_RETRIES} races in a row")

    # -------------------------------------------------------------- buckets
    def window_blobs(self, model: str, level: str, since: int) -> list[bytes]:
        k = self.keys(model)
        starts = [
            int(s)
            for s in cast(
                list[bytes], self.client.zrangebyscore(k.bucket_index(level), since, "+inf")
            )
        ]
        if not starts:
            return []
        blobs = cast(list[bytes | None], self.client.mget([k.bucket(level, s) for s in starts]))
        return [b for b in blobs if b is not None]

    def bucket_starts(self, model: str, level: str) -> list[int]:
        index = self.keys(model).bucket_index(level)
        return [int(s) for s in cast(list[bytes], self.client.zrange(index, 0, -1))]

    def expire_buckets(self, model: str, now: float) -> int:
        k = self.keys(model)
        dropped = 0
        for level in LEVELS:
            horizon = self.policy.expired_before(level, now)
            old = cast(
                list[bytes], self.client.zrangebyscore(k.bucket_index(level), "-inf", f"({horizon}")
            )
            if old:
                pipe = self.client.pipeline(transaction=True)
                pipe.delete(*[k.bucket(level, int(s)) for s in old])
                pipe.zrem(k.bucket_index(level), *old)
                pipe.execute()
                dropped += len(old)
        return dropped

    # ------------------------------------------------------------ baselines
    def pin_baseline(
        self,
        model: str,
        name: str,
        blob: bytes,
        meta: dict[str, object],
        *,
        replace: bool,
        calibration: bytes | None = None,
    ) -> None:
        k = self.keys(model)
        document = json.dumps(meta, sort_keys=True)
        if not replace and not self.client.hsetnx(k.baselines, name, document):
            raise BaselineExists(f"baseline {name!r} of model {model!r} is pinned already")
        pipe = self.client.pipeline(transaction=True)
        pipe.set(k.baseline(name), blob)
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
        pipe.get(k.baseline(name))
        pipe.hget(k.baselines, name)
        pipe.get(k.calibration(name))
        blob, document, calibration = pipe.execute()
        if blob is None or document is None:
            return None
        return Baseline(name, blob, json.loads(document), calibration)

    def baselines(self, model: str) -> dict[str, dict[str, object]]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).baselines))
        return {n.decode(): json.loads(v) for n, v in sorted(raw.items())}

    def unpin_baseline(self, model: str, name: str) -> bool:
        k = self.keys(model)
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(k.baselines, name)
        pipe.delete(k.baseline(name), k.calibration(name))
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
        """Redis's own accounting (MEMORY USAGE) summed over the model's keys."""
        total = 0
        pattern = f"{self.keys(model).base}:*"
        for key in self.client.scan_iter(match=pattern, count=500):
            total += int(self.client.memory_usage(key, samples=0) or 0)
        return total

    # ----------------------------------------------------- meta, reference
    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        key = self.keys(model).meta
        self.client.hsetnx(key, field, value)
        current = cast(bytes | None, self.client.hget(key, field))
        return value if current is None else current.decode()

    def meta(self, model: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys(model).meta))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def put_reference(self, model: str, blob: bytes) -> None:
        self.client.set(self.keys(model).reference, blob)

    def reference(self, model: str) -> bytes | None:
        return cast(bytes | None, self.client.get(self.keys(model).reference))
