"""Compaction and window maintenance on Redis (`RedisStore.compact` and `.maintain`).

Compaction adds pending partials to their buckets and windows inside WATCH/MULTI on the partial,
state, window-table and lock keys: of two racing compactors one commits and the other retries
against the new state, and a crash before EXEC leaves everything as it was. Maintenance holds
the model's state lock (compaction defers meanwhile) while it slides, rebuilds, starts or prunes
windows (`monitor.store.windows` plans the steps) and drops buckets past retention.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import WatchError

from monitor.store.base import (
    CompactionResult,
    FieldAlgebra,
    MaintenanceResult,
    WindowState,
    bucket_state,
)
from monitor.store.keys import LEVELS, ModelKeys
from monitor.store.redis_states import StateOps
from monitor.store.windows import WindowPlanner

if TYPE_CHECKING:
    from monitor.store.redis_store import RedisStore

_MAX_RETRIES = 20


def compact(store: RedisStore, model: str, algebra: FieldAlgebra, limit: int) -> CompactionResult:
    """Add pending partials to their buckets and windows, exactly once (module docstring)."""
    started = time.perf_counter()
    k = store.keys(model)
    store.check_format(model)
    entries = cast(list[Any], store.client.zrange(k.pending, 0, limit - 1, withscores=True))
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for raw_id, ts in entries:
        key = (store.policy.start("fine", ts), store.policy.start("coarse", ts))
        groups[key].append(raw_id.decode())
    merged = retries = steps = 0
    for (fine, coarse), members in groups.items():
        while members:
            outcome = _compact_step(store, k, fine, coarse, members, algebra)
            if outcome is None:
                return CompactionResult(
                    merged, steps, retries, time.perf_counter() - started, deferred=True
                )
            done, tries, members = outcome
            merged, retries, steps = merged + done, retries + tries, steps + 1
    return CompactionResult(merged, steps, retries, time.perf_counter() - started)


def _compact_step(
    store: RedisStore,
    k: ModelKeys,
    fine: int,
    coarse: int,
    members: list[str],
    algebra: FieldAlgebra,
) -> tuple[int, int, list[str]] | None:
    """Merge a prefix of `members` (up to `group_bytes` of fields) in one transaction.

    Returns (partials merged, retries, members left), or None when the state lock is held.
    """
    for attempt in range(_MAX_RETRIES):
        with store.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(k.state_lock, k.windows)
                if pipe.exists(k.state_lock):
                    return None
                windows = parse_windows(cast(dict[bytes, bytes], pipe.hgetall(k.windows)))
                planner = WindowPlanner(store.policy)
                targets = planner.targets(fine, coarse, windows)
                state_keys = [k.state(t.state) for t in targets]
                pipe.watch(*state_keys)
                scores = cast(list[Any], pipe.zmscore(k.pending, members))
                live = [m for m, s in zip(members, scores, strict=True) if s is not None]
                if not live:
                    return 0, attempt, []  # another compactor got there first
                taken, parts, size = [], [], 0
                for member in live:
                    pipe.watch(k.partial(member))
                    fields = cast(dict[bytes, bytes], pipe.hgetall(k.partial(member)))
                    taken.append(member)
                    if fields:
                        parts.append(fields)
                        size += sum(len(v) for v in fields.values())
                    if size >= store.policy.group_bytes:
                        break
                delta = algebra.merge_all(parts)
                updates = []
                for target, key in zip(targets, state_keys, strict=True) if delta else []:
                    part = target.fields_of(delta, algebra)
                    names = list(part)
                    current = cast(list[bytes | None], pipe.hmget(key, names))
                    if target.record is not None:  # a new window: no debris of a past one
                        current = [None] * len(names)
                    merged = target.merge(algebra, names, current, list(part.values()), fine)
                    updates.append((key, names, merged))
                pipe.multi()
                for target, (key, names, merged) in zip(targets, updates, strict=False):
                    if target.record is not None:
                        pipe.delete(key)
                    StateOps.write(pipe, key, names, merged)
                for target in targets if delta else []:
                    if target.record is not None:
                        pipe.hset(k.windows, target.record[0], dump_window(target.record[1]))
                if delta:
                    for level, start in (("fine", fine), ("coarse", coarse)):
                        pipe.expire(
                            k.state(bucket_state(level, start)), store.policy.key_ttl(level)
                        )
                        pipe.zadd(k.bucket_index(level), {str(start): start})
                pipe.zrem(k.pending, *taken)
                pipe.delete(*[k.partial(m) for m in taken])
                if len(parts) < len(taken):  # partials that expired before compaction
                    pipe.hincrby(k.counters, "partials_expired", len(taken) - len(parts))
                pipe.hset(k.meta, "last_compaction", time.time())
                pipe.execute()
                return len(parts), attempt, live[len(taken) :]
            except WatchError:
                continue
    raise RuntimeError(f"compaction of {k.model} lost {_MAX_RETRIES} races in a row")


def maintain(store: RedisStore, model: str, algebra: FieldAlgebra, now: float) -> MaintenanceResult:
    """Slide or start every window, rebuild the ones that need it, drop old buckets."""
    started = time.perf_counter()
    store.check_format(model)
    k = store.keys(model)
    planner = WindowPlanner(store.policy)
    subtracted = rebuilt = dropped = 0
    with store.locked(model):
        windows = store.windows(model)
        if planner.mode_changed(windows):  # buckets of the other mode: windows start again
            dropped += _drop_buckets(store, k, float("inf"))
        starts = {level: store.bucket_starts(model, level) for level in LEVELS}
        for step in planner.plan(windows, starts, now, _bucket_exists(store, k)):
            if step.prune_tau is not None:
                _prune(store, k, step.target, step.at, step.prune_tau, algebra)
                store.client.hset(k.windows, step.label, dump_window(step.state))
                continue
            store.client.hset(k.windows, step.label, dump_window(step.dirty_state()))
            target = k.state(step.target)
            if step.rebuild:
                store.client.delete(target)
                rebuilt += 1
            for source, sign in step.sources:
                store.ops.apply(k, k.state(source), target, algebra, sign)
            subtracted += sum(1 for _, sign in step.sources if sign < 0)
            store.client.hset(k.windows, step.label, dump_window(step.state))
        for label in planner.unconfigured(windows):
            store.client.delete(k.state(f"window:{label}"))
            store.client.hdel(k.windows, label)
        dropped += _drop_buckets(store, k, now)
    store.decay_frequencies(model, now)
    return MaintenanceResult(subtracted, rebuilt, dropped, time.perf_counter() - started)


def _bucket_exists(store: RedisStore, k: ModelKeys) -> Callable[[str], bool]:
    return lambda state: bool(store.client.exists(k.state(state)))


def _prune(
    store: RedisStore, k: ModelKeys, state: str, now: float, tau: float, algebra: FieldAlgebra
) -> None:
    """Delete a decayed window's rows that weigh less than the minimum (under the lock;
    HDEL is idempotent, and reads leave such rows out anyway, so a crash midway is harmless)."""
    key = k.state(state)
    for chunk in store.ops.scan(k, key, 32 * 2**20):
        gone = algebra.expired(chunk, now, tau, store.policy.decay_min_weight)
        if gone:
            store.client.hdel(key, *gone)


def _drop_buckets(store: RedisStore, k: ModelKeys, now: float) -> int:
    """Delete the buckets past retention (all of them when `now` is infinite)."""
    dropped = 0
    for level in LEVELS:
        horizon = store.policy.expired_before(level, now)
        index = k.bucket_index(level)
        old = cast(list[bytes], store.client.zrangebyscore(index, "-inf", f"({horizon}"))
        if old:
            pipe = store.client.pipeline(transaction=True)
            pipe.delete(*[k.state(bucket_state(level, int(s))) for s in old])
            pipe.zrem(index, *old)
            pipe.execute()
            dropped += len(old)
    return dropped


def parse_windows(raw: dict[bytes, bytes]) -> dict[str, WindowState]:
    out = {}
    for label, doc in raw.items():
        try:
            out[label.decode()] = WindowState(**json.loads(doc))
        except (TypeError, ValueError):
            continue  # unreadable: treated as absent, so the window is rebuilt
    return out


def dump_window(state: WindowState) -> str:
    return json.dumps(
        {
            "seconds": state.seconds,
            "level": state.level,
            "since": state.since,
            "built": state.built,
            "dirty": state.dirty,
            "mode": state.mode,
        }
    )
