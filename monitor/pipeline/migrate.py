"""`collapse-monitor store migrate`: statistics of store format 1 (one blob per bucket,
baseline or partial) rewritten as format 2 (a hash of fields per state), losing nothing.

Baselines, buckets and pending partials are converted in place under the same names; windows
need no conversion, maintenance builds them from the converted buckets. The old bucket
indexes go last, so the store refuses to run (`LegacyStoreFormat`) until everything else is
converted, and a migration interrupted midway can simply be run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from monitor.stats import CollapseStats
from monitor.stats.fields import VERSION, field_chunks, to_fields
from monitor.store.base import baseline_state, bucket_state
from monitor.store.keys import LEVELS, legacy_indexes
from monitor.store.redis_store import RedisStore


@dataclass(frozen=True)
class MigrationResult:
    model: str
    baselines: int = 0
    buckets: int = 0
    partials: int = 0


def migrate_model(
    store: RedisStore, model: str, progress: Callable[[str], None] = lambda _: None
) -> MigrationResult:
    client: Any = store.client
    k = store.keys(model)
    baselines = buckets = partials = 0
    for name, document in cast(dict[bytes, bytes], client.hgetall(k.baselines)).items():
        old = f"{k.base}:baseline:{name.decode()}"
        if client.type(old) != b"string":
            continue
        stats = CollapseStats.from_bytes(client.get(old))
        store.write_state(model, baseline_state(name.decode()), field_chunks(stats))
        calibration = client.get(f"{old}:calibration")
        if calibration is not None:
            client.set(k.calibration(name.decode()), calibration)
        meta = {**json.loads(document), "store_format": VERSION}
        client.hset(k.baselines, name, json.dumps(meta, sort_keys=True))
        client.delete(old, f"{old}:calibration")
        baselines += 1
        progress(f"baseline {name.decode()}")
    for level in LEVELS:
        old_index = f"{k.base}:buckets:{level}"
        for raw in cast(list[bytes], client.zrange(old_index, 0, -1)):
            start = int(raw)
            old = f"{k.base}:bucket:{level}:{start}"
            blob = client.get(old)
            if blob is not None:
                state = bucket_state(level, start)
                store.write_state(model, state, field_chunks(CollapseStats.from_bytes(blob)))
                client.expire(k.state(state), store.policy.key_ttl(level))
                client.zadd(k.bucket_index(level), {str(start): start})
                buckets += 1
            client.delete(old)
            client.zrem(old_index, raw)
    for raw in cast(list[bytes], client.zrange(k.pending, 0, -1)):
        old = f"{k.base}:partial:{raw.decode()}"
        blob = client.get(old)
        if blob is None:
            continue
        ttl = int(client.ttl(old))
        fields = to_fields(CollapseStats.from_bytes(blob))
        client.hset(k.partial(raw.decode()), mapping=fields)
        client.expire(k.partial(raw.decode()), max(ttl, 60))
        client.delete(old)
        partials += 1
    client.delete(f"{k.base}:reference", *legacy_indexes(k))  # the evaluator rewrites it
    progress(f"{model}: {baselines} baselines, {buckets} buckets, {partials} partials")
    return MigrationResult(model, baselines, buckets, partials)
