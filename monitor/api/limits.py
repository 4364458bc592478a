"""Resource bounds of the ingest API: body deadline, bytes in flight, per-client rate, counting.

Why each exists (each was a measured attack against a running API):
- a body read deadline: uvicorn waits for a body forever, so a client that sends its headers and
  then a byte now and then held a connection and a task open indefinitely;
- a cap on bytes of bodies in flight: four concurrent 43 MB bodies added ~400 MB to the
  process (the body, its parsed form and the decoded arrays live together while a request runs);
  the cap counts the bytes a request has *received*, so a slow client holds only what it sent;
- a token bucket per client address: one token holder could keep the workers busy at any rate;
- a refusal tally: every refusal is counted in Redis, but a flood of refusals must cost one
  write per owner and reason per flush, not one per request, and never hold a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from concurrent.futures import Executor, Future
from typing import Any

from fastapi import Request

from monitor.api.schemas import Refused, read_body
from monitor.pipeline.ingest import count_rejection
from monitor.store.base import Store

log = logging.getLogger(__name__)

# Statuses of the refusals this module adds; every other reason keeps schemas.STATUS's.
LIMIT_STATUS = {
    "body_timeout": 408,
    "too_many_texts": 413,
    "too_many_tokens": 413,
    "rate_limited": 429,
    "server_busy": 503,
}
CLOSE = {"Connection": "close"}  # the rest of an unread body must not be parsed as a request


class Limited(Refused):
    """A refusal whose status comes from `LIMIT_STATUS` (schemas.STATUS knows the others)."""

    @property
    def status(self) -> int:
        return LIMIT_STATUS.get(self.reason, super().status)


class BodyBudget:
    """Bytes of request bodies held at once; a request takes them as they arrive."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def fits(self, size: int) -> bool:
        with self._lock:
            return self.held + size <= self.limit

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


class Hold:
    """One request's share of the budget, returned whole when the request ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.size = budget, 0

    def take(self, size: int) -> None:
        if not self.budget.take(size):
            raise busy(self.budget)
        self.size += size

    def release(self) -> None:
        self.budget.give(self.size)
        self.size = 0


def busy(budget: BodyBudget) -> Limited:
    return Limited(
        "server_busy",
        f"the API holds {budget.limit} bytes of request bodies already; retry shortly",
        headers={"Retry-After": "1", **CLOSE},
    )


async def read_bounded(request: Request, limit: int, hold: Hold, timeout: float) -> bytes:
    """The body within `timeout` seconds, each chunk taken from the budget as it arrives."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else 0
    if size <= limit and not hold.budget.fits(size):  # refuse now, not after the upload
        raise busy(hold.budget)
    inner = request.receive

    async def receive() -> MutableMapping[str, Any]:
        message = await inner()
        if message.get("type") == "http.request":
            hold.take(len(message.get("body", b"")))
        return message

    counted = Request(request.scope, receive)
    try:
        return await asyncio.wait_for(read_body(counted, limit), timeout)
    except TimeoutError as exc:
        raise Limited(
            "body_timeout", f"the body did not arrive within {timeout:g} s", headers=CLOSE
        ) from exc


class RateLimiter:
    """A token bucket per client key: `burst` requests at once, then `rate` per second.

    Memory is bounded: buckets that have refilled are forgotten, and past `max_clients` keys
    the fullest buckets go first (a forgotten bucket is a full one, so nobody gains by it).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_clients, self.clock = rate, float(burst), max_clients, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()
        self._pruned = clock()

    def admit(self, key: str) -> float:
        """0 when admitted, else the seconds until the next request would be."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if now - self._pruned > self.burst / self.rate or len(self._buckets) > self.max_clients:
                self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        def level(item: tuple[str, tuple[float, float]]) -> float:
            tokens, at = item[1]
            return min(self.burst, tokens + (now - at) * self.rate)

        kept = [item for item in self._buckets.items() if level(item) < self.burst]
        kept.sort(key=level)
        self._buckets = dict(kept[: self.max_clients])
        self._pruned = now


def rate_limited(wait: float) -> Limited:
    return Limited(
        "rate_limited",
        "too many requests from this client; slow down",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


class RefusalTally:
    """Refusals counted in the store by batches: one write per owner and reason per flush.

    `add` returns a future that completes when a flush including this refusal ends, so a caller
    may wait for it (within a deadline) without holding a thread; at most one flush waits in
    `pool` at a time, whatever the flood. Counts a flush could not write are kept for the next.
    """

    def __init__(self, store: Store, pool: Executor, warn: Callable[[BaseException], None]) -> None:
        self.store, self.pool, self.warn = store, pool, warn
        self._pending: Counter[tuple[str | None, str]] = Counter()
        self._next: Future[None] | None = None
        self._lock = threading.Lock()

    def add(self, owner: str | None, reason: str, samples: int) -> Future[None]:
        with self._lock:
            self._pending[(owner, reason)] += max(samples, 1)
            if self._next is None:
                self._next = self.pool.submit(self._flush)
            return self._next

    async def count(self, owner: str | None, reason: str, samples: int, wait: float) -> None:
        """Count, and wait up to `wait` seconds for the write (tests and operators see it)."""
        future = asyncio.wrap_future(self.add(owner, reason, samples))
        await asyncio.wait([future], timeout=wait)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending, self._next = self._pending, Counter(), None
        done: list[tuple[str | None, str]] = []
        try:
            for (owner, reason), samples in batch.items():
                count_rejection(self.store, owner, reason, samples)
                done.append((owner, reason))
        except Exception as exc:
            self.warn(exc)
            with self._lock:
                for key in done:
                    del batch[key]
                self._pending.update(batch)

    def flush(self, timeout: float) -> None:
        """Write what is pending now (at shutdown), within `timeout`."""
        with contextlib.suppress(Exception):
            self.pool.submit(self._flush).result(timeout=timeout)
