"""`MemoryStore`: the in-process store of embedded mode, with `RedisStore`'s behaviour.

States are dicts of fields, as Redis hashes are; one re-entrant lock serialises every
operation, so `locked()` simply holds it for a multi-step read.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

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
    MaintenanceResult,
    TrackedCounts,
    WindowState,
    baseline_state,
    bucket_state,
    decay_steps,
)
from monitor.store.keys import LEVELS
from monitor.store.windows import WindowPlanner


class _ModelState:
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # batch id -> expiry time
        self.partials: dict[str, tuple[dict[bytes, bytes], float]] = {}
        self.states: dict[str, dict[bytes, bytes]] = {}
        self.index: dict[str, set[int]] = {level: set() for level in LEVELS}
        self.windows: dict[str, WindowState] = {}
        self.baselines: dict[str, Baseline] = {}
        self.snapshots: dict[str, list[str]] = defaultdict(list)
        self.counters: dict[str, int] = defaultdict(int)
        self.meta: dict[str, str] = {}
        self.claims: dict[str, float] = {}
        self.frequencies: dict[int, float] = {}  # class -> decayed count (max_tracked_classes)


class MemoryStore:
    """A dict per model behind one lock; TTLs are checked lazily against `clock`."""

    def __init__(
        self, policy: BucketPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.policy = policy or BucketPolicy()
        self._clock = clock
        self._lock = threading.RLock()
        self._models: dict[str, _ModelState] = defaultdict(_ModelState)

    def _now(self) -> float:
        return float(self._clock())

    def ping(self) -> bool:
        return True

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
        with self._lock:
            state = self._models[model]
            expiry = state.seen.get(batch_id)
            if expiry is not None and expiry > self._now():
                state.counters["batches_duplicate"] += 1
                return False
            state.seen[batch_id] = self._now() + self.policy.seen_ttl
            state.partials[batch_id] = (dict(fields), float(ts))
            state.counters["batches_ingested"] += 1
            state.counters["samples_ingested"] += int(samples)
            if tracked is not None:
                self.add_frequencies(model, tracked.frequencies)
                if tracked.untracked:
                    state.counters["untracked_samples"] += int(tracked.untracked)
            return True

    def pending_count(self, model: str) -> int:
        with self._lock:
            return len(self._models[model].partials)

    def oldest_pending(self, model: str) -> float | None:
        with self._lock:
            stamps = [ts for _, ts in self._models[model].partials.values()]
        return min(stamps) if stamps else None

    def add_frequencies(self, model: str, counts: Mapping[int, float]) -> None:
        with self._lock:
            frequencies = self._models[model].frequencies
            for cls, count in counts.items():
                frequencies[int(cls)] = frequencies.get(int(cls), 0.0) + float(count)

    def top_classes(self, model: str, m: int) -> list[int]:
        with self._lock:
            items = list(self._models[model].frequencies.items())
        # ZREVRANGE's order: score, then the member (the class id as text), both descending.
        items.sort(key=lambda kv: (kv[1], str(kv[0]).encode()), reverse=True)
        return [cls for cls, _ in items[: max(m, 0)]]

    def decay_frequencies(self, model: str, now: float) -> int:
        with self._lock:
            state = self._models[model]
            if not state.frequencies:
                return 0
            last = state.meta.get(FREQUENCY_DECAYED_FIELD)
            if last is None:
                state.meta[FREQUENCY_DECAYED_FIELD] = repr(float(now))
                return 0
            steps = decay_steps(float(last), now, self.policy.tracked_half_life)
            if steps:
                factor = 0.5**steps
                state.frequencies = {
                    c: v * factor
                    for c, v in state.frequencies.items()
                    if v * factor >= FREQUENCY_FLOOR
                }
                stamp = float(last) + steps * self.policy.tracked_half_life
                state.meta[FREQUENCY_DECAYED_FIELD] = repr(stamp)
            return steps

    def compact(
        self, model: str, algebra: FieldAlgebra, *, limit: int = 64, now: float | None = None
    ) -> CompactionResult:
        started = time.perf_counter()
        with self._lock:
            state = self._models[model]
            ids = sorted(state.partials, key=lambda i: state.partials[i][1])[:limit]
            groups: dict[tuple[int, int], list[str]] = defaultdict(list)
            for batch_id in ids:
                ts = state.partials[batch_id][1]
                key = (self.policy.start("fine", ts), self.policy.start("coarse", ts))
                groups[key].append(batch_id)
            planner = WindowPlanner(self.policy)
            for (fine, coarse), members in groups.items():
                delta = algebra.merge_all(state.partials.pop(i)[0] for i in members)
                for target in planner.targets(fine, coarse, state.windows):
                    if target.record is not None:  # a new window: no debris of a past one
                        state.states.pop(target.state, None)
                    fields = state.states.setdefault(target.state, {})
                    part = target.fields_of(delta, algebra)
                    names = list(part)
                    current = [fields.get(n) for n in names]
                    merged = target.merge(algebra, names, current, list(part.values()), fine)
                    _store(fields, names, merged)
                    if target.record is not None:
                        state.windows[target.record[0]] = target.record[1]
                state.index["fine"].add(fine)
                state.index["coarse"].add(coarse)
            return CompactionResult(
                partials=len(ids), buckets=len(groups), seconds=time.perf_counter() - started
            )

    def maintain(self, model: str, algebra: FieldAlgebra, now: float) -> MaintenanceResult:
        started = time.perf_counter()
        subtracted = rebuilt = dropped = 0
        with self._lock:
            state = self._models[model]
            planner = WindowPlanner(self.policy)
            if planner.mode_changed(state.windows):  # buckets of the other mode: start again
                dropped += self._drop_buckets(state, float("inf"))
            starts = {level: sorted(state.index[level]) for level in LEVELS}
            steps = planner.plan(state.windows, starts, now, lambda s: s in state.states)
            for step in steps:
                if step.prune_tau is not None:
                    fields = state.states.get(step.target, {})
                    items = list(fields.items())
                    gone = algebra.expired(
                        items, step.at, step.prune_tau, self.policy.decay_min_weight
                    )
                    for name in gone:
                        fields.pop(name, None)
                    state.windows[step.label] = step.state
                    continue
                if step.rebuild:
                    state.states.pop(step.target, None)
                    rebuilt += 1
                target = state.states.setdefault(step.target, {})
                for source, sign in step.sources:
                    _apply(target, state.states.get(source, {}), algebra, sign)
                    subtracted += sign < 0
                state.windows[step.label] = step.state
            for label in planner.unconfigured(state.windows):
                state.states.pop(f"window:{label}", None)
                del state.windows[label]
            dropped += self._drop_buckets(state, now)
            state.seen = {k: v for k, v in state.seen.items() if v > now}
            self.decay_frequencies(model, now)
        return MaintenanceResult(subtracted, rebuilt, dropped, time.perf_counter() - started)

    def _drop_buckets(self, state: _ModelState, now: float) -> int:
        """Delete the buckets past retention (all of them when `now` is infinite)."""
        dropped = 0
        for level in LEVELS:
            horizon = self.policy.expired_before(level, now)
            for start in [s for s in state.index[level] if s < horizon]:
                state.index[level].discard(start)
                state.states.pop(bucket_state(level, start), None)
                dropped += 1
        return dropped

    @contextmanager
    def locked(self, model: str) -> Iterator[None]:
        with self._lock:
            yield

    def state_field(self, model: str, state: str, field: bytes) -> bytes | None:
        with self._lock:
            return self._models[model].states.get(state, {}).get(field)

    def state_size(self, model: str, state: str) -> int:
        with self._lock:
            return len(self._models[model].states.get(state, {}))

    def scan_state(self, model: str, state: str, *, max_bytes: int = 32 * 2**20) -> Iterator[Chunk]:
        with self._lock:
            fields = sorted(self._models[model].states.get(state, {}).items())
        chunk: Chunk = []
        size = 0
        for item in fields:
            chunk.append(item)
            size += len(item[1])
            if size >= max_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def write_state(self, model: str, state: str, chunks: Iterable[Fields]) -> None:
        fields: dict[bytes, bytes] = {}
        for chunk in chunks:
            fields.update(chunk)
        with self._lock:
            if fields:
                self._models[model].states[state] = fields
            else:
                self._models[model].states.pop(state, None)

    def windows(self, model: str) -> dict[str, WindowState]:
        with self._lock:
            return dict(self._models[model].windows)

    def bucket_starts(self, model: str, level: str) -> list[int]:
        with self._lock:
            return sorted(self._models[model].index[level])

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
        with self._lock:
            baselines = self._models[model].baselines
            if name in baselines and not replace:
                raise BaselineExists(f"baseline {name!r} of model {model!r} is pinned already")
            self.write_state(model, baseline_state(name), chunks)
            baselines[name] = Baseline(name, dict(meta), calibration)

    def baseline(self, model: str, name: str) -> Baseline | None:
        with self._lock:
            state = self._models[model]
            if baseline_state(name) not in state.states:
                return None
            return state.baselines.get(name)

    def baselines(self, model: str) -> dict[str, dict[str, object]]:
        with self._lock:
            return {n: dict(b.meta) for n, b in self._models[model].baselines.items()}

    def unpin_baseline(self, model: str, name: str) -> bool:
        with self._lock:
            state = self._models[model]
            state.states.pop(baseline_state(name), None)
            return state.baselines.pop(name, None) is not None

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
        """Bytes of field names and values held for the model (no allocator overhead)."""
        with self._lock:
            state = self._models[model]
            total = sum(_size(f) for f, _ in state.partials.values())
            total += sum(len(str(c)) + 8 for c in state.frequencies)  # member text + score
            return total + sum(_size(fields) for fields in state.states.values())

    def meta_setdefault(self, model: str, field: str, value: str) -> str:
        with self._lock:
            return self._models[model].meta.setdefault(field, value)

    def meta(self, model: str) -> dict[str, str]:
        with self._lock:
            return dict(self._models[model].meta)

    def claim(self, model: str, name: str, ttl: float) -> bool:
        with self._lock:
            claims = self._models[model].claims
            now = self._now()
            if claims.get(name, 0.0) > now:
                return False
            claims[name] = now + ttl
            return True


def _apply(target: dict[bytes, bytes], delta: Fields, algebra: FieldAlgebra, sign: int) -> None:
    names = list(delta)
    if names:
        current = [target.get(n) for n in names]
        _store(target, names, algebra.combine(names, current, [delta[n] for n in names], sign))


def _store(target: dict[bytes, bytes], names: list[bytes], merged: list[bytes | None]) -> None:
    for name, value in zip(names, merged, strict=True):
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def _size(fields: Fields) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())
