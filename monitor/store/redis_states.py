"""Primitives on split states in Redis: chunked reads, chunked add/subtract, staged writes and
the per-model state lock. `RedisStore` composes them; nothing here knows the field format.

Why a lock and not one transaction: a window of 128k classes at d = 4,096 is 4.2 GB, far too
much for one MULTI. Long operations (reading a window, sliding or rebuilding it) hold a
per-model lock that compaction checks inside its WATCH, so compaction defers while they run
and never sees half a slide. The lock expires if its holder dies; a slide or rebuild marks its
window dirty first, so a holder that died midway leaves a window that is rebuilt, not wrong.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, cast

from monitor.store.base import Chunk, FieldAlgebra, Fields, StoreBusy
from monitor.store.keys import ModelKeys

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_FIRST_CHUNK_FIELDS = 16


class StateLock:
    """The per-model state lock: SET NX PX with a token, refreshed while work goes on."""

    def __init__(self, client: Any, seconds: float, wait: float = 120.0) -> None:
        self.client = client
        self.ms = max(int(seconds * 1000), 1000)
        self.wait = wait
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self.held: dict[str, str] = {}  # lock key -> token, for the locks this process holds

    def acquire(self, key: str) -> str:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait
        delay = 0.01
        while not self.client.set(key, token, nx=True, px=self.ms):
            if time.monotonic() > deadline:
                raise StoreBusy(f"the state lock {key} stayed held for {self.wait:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.held[key] = token
        return token

    def refresh(self, key: str) -> None:
        token = self.held.get(key)
        if token is not None and not self._refresh(keys=[key], args=[token, self.ms]):
            raise StoreBusy(f"the state lock {key} expired while held; the work is abandoned")

    def release(self, key: str) -> None:
        token = self.held.pop(key, None)
        if token is not None:
            self._release(keys=[key], args=[token])


class StateOps:
    """Chunked operations on the states of one store (all keys of one model share a slot)."""

    def __init__(self, client: Any, lock: StateLock) -> None:
        self.client = client
        self.lock = lock

    def scan(self, k: ModelKeys, key: str, max_bytes: int) -> Iterator[Chunk]:
        """Fields of hash `key` in chunks of about `max_bytes`: HKEYS, then HMGET by chunk."""
        names = sorted(cast(list[bytes], self.client.hkeys(key)))
        step, i = _FIRST_CHUNK_FIELDS, 0
        while i < len(names):
            part = names[i : i + step]
            values = cast(list[bytes | None], self.client.hmget(key, part))
            chunk = [(n, v) for n, v in zip(part, values, strict=True) if v is not None]
            i += len(part)
            self.lock.refresh(k.state_lock)
            if chunk:
                yield chunk
                average = sum(len(v) for _, v in chunk) / len(chunk)
                step = max(1, int(max_bytes // max(average, 1.0)))

    def apply(
        self, k: ModelKeys, source: str, target: str, algebra: FieldAlgebra, sign: int
    ) -> None:
        """target += sign * source, chunk by chunk (under the state lock)."""
        for chunk in self.scan(k, source, 32 * 2**20):
            names = [n for n, _ in chunk]
            current = cast(list[bytes | None], self.client.hmget(target, names))
            merged = algebra.combine(names, current, [v for _, v in chunk], sign)
            self.write(self.client, target, names, merged)

    @staticmethod
    def write(client: Any, key: str, names: list[bytes], values: list[bytes | None]) -> None:
        """HSET the fields that have values and HDEL the ones that became empty."""
        sets = {n: v for n, v in zip(names, values, strict=True) if v is not None}
        gone = [n for n, v in zip(names, values, strict=True) if v is None]
        if sets:
            client.hset(key, mapping=sets)
        if gone:
            client.hdel(key, *gone)

    def stage(self, k: ModelKeys, state: str, chunks: Iterable[Fields]) -> str | None:
        """Write `chunks` to a staging key; returns it (None for no fields) for a RENAME."""
        staging = k.staging(state, uuid.uuid4().hex)
        wrote = False
        try:
            for chunk in chunks:
                if chunk:
                    self.client.hset(staging, mapping=dict(chunk))
                    self.client.expire(staging, 3600)  # a writer that dies leaves no debris
                    wrote = True
        except BaseException:
            self.client.delete(staging)
            raise
        return staging if wrote else None
