"""`MemoryStore`: the in-process store of embedded mode, with `RedisStore`'s behaviour."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

from monitor.store.base import (
    Baseline,
    BaselineExists,
    BucketPolicy,
    CompactionResult,
    MergeFn,
)
from monitor.store.keys import LEVELS


class _ModelState:
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # batch id -> expiry time
        self.partials: dict[str, tuple[bytes, float]] = {}
        self.buckets: dict[str, dict[int, bytes]] = {level: {} for level in LEVELS}
        self.baselines: dict[str, Baseline] = {}
        self.snapshots: dict[str, list[str]] = defaultdict(list)
        self.counters: dict[str, int] = defaultdict(int)
        self.meta: dict[str, str] = {}
        self.reference: bytes | None = None


class MemoryStore:
    """A dict per model behind one lock; TTLs are checked lazily against `clock`."""

    def __init__(
        self, policy: BucketPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.policy = policy or BucketPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[str, _ModelState] = defaultdict(_ModelState)

    def _now(self) -> float:
        return float(self._clock())

    def ping(self) -> bool:
        return True

    def put_partial(self, model: str, batch_id: str, blob: bytes, ts: float, samples: int) -> bool:
        with self._lock:
            state = self._models[model]
            expiry = state.seen.get(batch_id)
            if expiry is not None and expiry > self._now():
                state.counters["batches_duplicate"] += 1
                return False
            state.seen[batch_id] = self._now() + self.policy.seen_ttl
            state.partials[batch_id] = (bytes(blob), float(ts))
            state.counters["batches_ingested"] += 1
            state.counters["samples_ingested"] += int(samples)
            return True

    def pending_count(self, model: str) -> int:
        with self._lock:
            return len(self._models[model].partials)

    def oldest_pending(self, model: str) -> float | None:
        with self._lock:
            stamps = [ts for _, ts in self._models[model].partials.values()]
        return min(stamps) if stamps else None

    def compact(self, model: str, merge: MergeFn, *, limit: int = 64) -> CompactionResult:
        started = time.perf_counter()
        with self._lock:
            state = self._models[model]
            ids = sorted(state.partials, key=lambda i: state.partials[i][1])[:limit]
            groups: dict[tuple[int, int], list[str]] = defaultdict(list)
            for batch_id in ids:
                ts = state.partials[batch_id][1]
                key = (self.policy.start("fine", ts), self.policy.start("coarse", ts))
                groups[key].append(batch_id)
            for (fine, coarse), members in groups.items():
                blobs = [state.partials[i][0] for i in members]
                for level, start in (("fine", fine), ("coarse", coarse)):
                    current = state.buckets[level].get(start)
                    parts = blobs if current is None else [current, *blobs]
                    state.buckets[level][start] = merge(parts)
                for batch_id in members:
                    del state.partials[batch_id]
            return CompactionResult(
                partials=len(ids), buckets=len(groups), seconds=time.perf_counter() - started
            )

    def window_blobs(self, model: str, level: str, since: int) -> list[bytes]:
        with self._lock:
            buckets = self._models[model].buckets[level]
            return [buckets[s] for s in sorted(buckets) if s >= since]

    def bucket_starts(self, model: str, level: str) -> list[int]:
        with self._lock:
            return sorted(self._models[model].buckets[level])

    def expire_buckets(self, model: str, now: float) -> int:
        dropped = 0
        with self._lock:
            state = self._models[model]
            for level in LEVELS:
                horizon = self.policy.expired_before(level, now)
                for start in [s for s in state.buckets[level] if s < horizon]:
                    del state.buckets[level][start]
                    dropped += 1
            state.seen = {k: v for k, v in state.seen.items() if v > now}
        return dropped

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
        with self._lock:
            baselines = self._models[model].baselines
            if name in baselines and not replace:
                raise BaselineExists(f"baseline {name!r} of model {model!r} is pinned already")
            baselines[name] = Baseline(name, bytes(blob), dict(meta), calibration)

    def baseline(self, model: str, name: str) -> Baseline | None:
        with self._lock:
            return self._models[model].baselines.get(name)

    def baselines(self, model: str) -> dict[str, dict[str, object]]:
        with self._lock:
            return {n: dict(b.meta) for n, b in self._models[model].baselines.items()}

    def unpin_baseline(self, model: str, name: str) -> bool:
        with self._lock:
            return self._models[model].baselines.pop(name, None) is not None

    def put_snapshot(self, model: str, window: str, document: str, *, history: int) -> None:
        with self._lock:
            entries = self._models[model].snapshots[window]
            entries.insert(0, document)
            del entries[max(history, 1) :]

    def snapshot(self, model: str, window: str) -> str | None:
        with self._lock:
            entries = self._models[model].snapshots.get(window)
            return entries[0] if entries else None

    def history(self, model: str, window: str, count: int) -> list[str]:
        with self._lock:
            return list(self._models[model].snapshots.get(window, [])[:count])

    def add_counters(self, model: str, deltas: dict[str, int]) -> None:
        with self._lock:
            counters = self._models[model].counters
            for name, value in deltas.items():
                counters[name] += int(value)

    def counters(self, model: str) -> dict[str, int]:
        with self._lock:
            return dict(self._models[model].counters)

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def memory_bytes(self, model: str) -> int:
        with self._lock:
            state = self._models[model]
            total = sum(len(b) for b, _ in state.partials.values())
            total += sum(len(b) for level in state.buckets.values() for b in level.values())
            total += sum(len(b.blob) for b in state.baselines.values())
            return total

    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        with self._lock:
            return self._models[model].meta.setdefault(field, value)

    def meta(self, model: str) -> dict[str, str]:
        with self._lock:
            return dict(self._models[model].meta)

    def put_reference(self, model: str, blob: bytes) -> None:
        with self._lock:
            self._models[model].reference = bytes(blob)

    def reference(self, model: str) -> bytes | None:
        with self._lock:
            return self._models[model].reference
