"""The bounded buffer between the request path and the sink, and the thread that empties it.

The request path only *offers* chunks: an O(1) check under a lock that is never held while a
sink runs. When the buffer is full the chunk is dropped and counted; nothing ever waits for the
monitor. A background thread turns chunks into `CaptureBatch`es: it waits for the chunk's
device-to-host copy (a CUDA event), keeps the valid rows, counts NC4 hits and calls the sink.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from monitor.capture.sinks import CaptureBatch, NC4Reference, Sink

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Rows copied off the request path; `valid` marks rows whose label turned out to exist.

    Tensors may still be in flight from the accelerator: read them after `ready()`.
    """

    features: torch.Tensor  # (R, d), model dtype, CPU (maybe pinned, maybe still being written)
    labels: torch.Tensor  # (R,) int64
    valid: torch.Tensor  # (R,) bool
    event: torch.cuda.Event | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def ready(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass
class CaptureCounters:
    """What happened to sampled positions; every sampled row ends in exactly one bucket."""

    sampled: int = 0  # positions chosen by the sampler, padding included (sorted out later)
    shipped: int = 0  # rows handed to the sink
    invalid: int = 0  # sampled rows without a label (padding, after EOS)
    unresolved: int = 0  # last positions whose next token never arrived
    pending: int = 0  # last positions still waiting for their next token
    dropped_full: int = 0  # rows dropped because the buffer was full
    dropped_sink_error: int = 0  # rows lost because the sink raised
    batches: int = 0  # batches handed to the sink
    errors: dict[str, int] = field(default_factory=dict)  # failures inside hooks, by reason
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, value: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + int(value))

    def error(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            out = {
                k: int(getattr(self, k))
                for k in (
                    "sampled",
                    "shipped",
                    "invalid",
                    "unresolved",
                    "pending",
                    "dropped_full",
                    "dropped_sink_error",
                    "batches",
                )
            }
            out.update({f"error_{k}": v for k, v in self.errors.items()})
            return out


def assemble_batch(
    chunks: list[Chunk], reference: NC4Reference | None, source: str
) -> tuple[CaptureBatch, int]:
    """Join chunks into one batch of valid rows; returns (batch, number of invalid rows)."""
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    invalid = 0
    for chunk in chunks:
        chunk.ready()
        keep = chunk.valid
        n_keep = int(keep.sum())
        invalid += chunk.rows - n_keep
        if n_keep == chunk.rows:
            feats.append(chunk.features)
            labels.append(chunk.labels)
        elif n_keep:
            feats.append(chunk.features[keep])
            labels.append(chunk.labels[keep])
    if feats:
        x = torch.cat(feats).to(torch.float32)
        y = torch.cat(labels).to(torch.int64)
    else:
        dim = chunks[0].features.shape[1] if chunks else 0
        x = torch.empty(0, dim, dtype=torch.float32)
        y = torch.empty(0, dtype=torch.int64)
    hits = total = 0
    if reference is not None and y.numel():
        hits, total = reference.hits(x), int(y.numel())
    return CaptureBatch(x, y, nc4_hits=hits, nc4_total=total, source=source), invalid


class ChunkTarget(Protocol):
    """Where the probe puts copied rows: the `Shipper`, or the mirror's synchronous list."""

    def offer(self, chunk: Chunk) -> bool: ...

    def has_room(self, rows: int) -> bool: ...


class Shipper:
    """Bounded buffer (`capacity_rows`) plus one daemon thread that feeds `sink`.

    Batches go out when `batch_rows` rows are waiting or `flush_interval` seconds after the
    oldest waiting chunk, whichever comes first. Memory is bounded by `capacity_rows` in the
    buffer plus at most one batch in the sink's hands.
    """

    def __init__(
        self,
        sink: Sink,
        counters: CaptureCounters,
        reference: Callable[[], NC4Reference | None],
        *,
        capacity_rows: int = 16384,
        batch_rows: int = 2048,
        flush_interval: float = 1.0,
        source: str = "probe",
    ) -> None:
        if capacity_rows < 1 or batch_rows < 1 or flush_interval <= 0:
            raise ValueError("capacity_rows, batch_rows and flush_interval must be positive")
        self.sink = sink
        self.counters = counters
        self._reference = reference
        self.capacity_rows = int(capacity_rows)
        self.batch_rows = int(batch_rows)
        self.flush_interval = float(flush_interval)
        self.source = source
        self._queue: deque[Chunk] = deque()
        self._rows = 0
        self._oldest = 0.0
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="collapse-shipper", daemon=True)
        self._thread.start()

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def offer(self, chunk: Chunk) -> bool:
        """Queue `chunk` if it fits; otherwise drop it and count its rows. Never waits."""
        with self._cond:
            if self._closing or self._rows + chunk.rows > self.capacity_rows:
                dropped = True
            else:
                dropped = False
                first = not self._queue
                if first:
                    self._oldest = time.monotonic()
                self._queue.append(chunk)
                self._rows += chunk.rows
                if first or self._rows >= self.batch_rows:
                    self._cond.notify()  # wakes the thread to (re)arm its flush timer
        if dropped:
            self.counters.add("dropped_full", chunk.rows)
        return not dropped

    def has_room(self, rows: int) -> bool:
        """Cheap pre-check so the request path skips copying rows that would be dropped."""
        return self._rows + rows <= self.capacity_rows

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far reached the sink (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._oldest = 0.0  # makes waiting chunks due now
            self._cond.notify()
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
                self._oldest = 0.0
                self._cond.notify()
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Ship what is queued (up to `timeout`), stop the thread, close the sink."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        close = getattr(self.sink, "close", None)
        try:
            if callable(close):
                close()
        except Exception:  # a broken sink must not break detach()
            log.exception("collapse-monitor: sink.close() failed")

    def _take(self) -> list[Chunk] | None:
        """Wait for a due batch; None when closing with nothing left."""
        with self._cond:
            while True:
                due = self._oldest + self.flush_interval
                if self._queue and (
                    self._rows >= self.batch_rows or time.monotonic() >= due or self._closing
                ):
                    break
                if self._closing and not self._queue:
                    return None
                timeout = max(due - time.monotonic(), 0.001) if self._queue else None
                self._cond.wait(timeout)
            out: list[Chunk] = []
            rows = 0
            while self._queue and (rows < self.batch_rows or not out):
                chunk = self._queue.popleft()
                out.append(chunk)
                rows += chunk.rows
            self._rows -= rows
            if self._queue:
                self._oldest = time.monotonic()
            self._busy = True
            return out

    def _run(self) -> None:
        while True:
            chunks = self._take()
            if chunks is None:
                return
            try:
                self._ship(chunks)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _ship(self, chunks: list[Chunk]) -> None:
        try:
            batch, invalid = assemble_batch(chunks, self._reference(), self.source)
        except Exception:
            log.exception("collapse-monitor: could not assemble a capture batch")
            self.counters.error("assemble")
            self.counters.add("dropped_sink_error", sum(c.rows for c in chunks))
            return
        self.counters.add("invalid", invalid)
        if not len(batch):
            return
        try:
            self.sink.send(batch)
        except Exception:
            log.exception("collapse-monitor: sink.send() failed; %d rows lost", len(batch))
            self.counters.add("dropped_sink_error", len(batch))
            return
        self.counters.add("shipped", len(batch))
        self.counters.add("batches", 1)
