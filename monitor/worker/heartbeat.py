"""Heartbeat files behind the liveness probes of `worker` and `beat` (`--heartbeat-file`).

`celery inspect ping` as a probe starts an interpreter that imports the whole app (seconds of
CPU with torch), goes through the broker (so a Redis outage restarts every worker, which cannot
fix Redis) and waits behind a busy solo pool. Here the process's own loop touches a file and the
chart's exec probe only compares the file's age with `date` and `stat`:

- worker: a bootstep puts `touch` on the worker's timer, which the consumer's event loop fires,
  so the file stays fresh exactly while that loop turns. The solo pool runs a task inside the
  loop; while one runs, a thread keeps the file fresh for at most `max_task_seconds` (the
  visibility timeout: past it the broker hands the task to another worker anyway).
- beat: the scheduler touches the file on every tick and ticks at least every `interval`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from celery import bootsteps
from celery.beat import Scheduler
from celery.signals import task_postrun, task_prerun

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0  # seconds between touches; the chart's probes allow 120 s by default


@dataclass
class Heartbeat:
    """The heartbeat file of one process, and the inline task that may keep it fresh."""

    path: Path
    interval: float = HEARTBEAT_INTERVAL
    max_task_seconds: float = 3600.0
    pid: int = field(default_factory=os.getpid)
    _task_started: float | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def reset(self) -> None:
        """Drop a file left by an earlier process in this pod: freshness must come from us."""
        self.path.unlink(missing_ok=True)

    def touch(self) -> None:
        """The process's loop is turning now: set the file's mtime (creating it)."""
        self.path.touch()

    def task_started(self, now: float | None = None) -> None:
        if os.getpid() == self.pid:  # a prefork child's tasks never vouch for the parent
            self._task_started = time.monotonic() if now is None else now

    def task_finished(self) -> None:
        if os.getpid() == self.pid:
            self._task_started = None

    def task_keeps_alive(self, now: float) -> bool:
        """A task runs inline in the loop, started less than max_task_seconds ago."""
        started = self._task_started
        return started is not None and now - started < self.max_task_seconds

    def start_keepalive(self) -> None:
        """Touch the file from a thread while an inline task blocks the loop (solo pool)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name="heartbeat", daemon=True)
        self._thread.start()

    def stop_keepalive(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)
            self._thread = None

    def _keepalive(self) -> None:
        while not self._stop.wait(self.interval):
            if self.task_keeps_alive(time.monotonic()):
                try:
                    self.touch()
                except OSError as exc:  # a full /tmp: the probe will say so, log it once a turn
                    log.warning("heartbeat %s: %s", self.path, exc)


def worker_step(heartbeat: Heartbeat, *, inline_tasks: bool) -> type[Any]:
    """A worker bootstep that touches `heartbeat` from the worker's timer (the event loop).

    `inline_tasks`: the pool runs tasks in the loop's own thread (solo), so a running task
    keeps the file fresh through `task_prerun`/`task_postrun` and a thread.
    """

    def started(**_: object) -> None:
        heartbeat.task_started()

    def finished(**_: object) -> None:
        heartbeat.task_finished()

    if inline_tasks:
        task_prerun.connect(started, weak=False)
        task_postrun.connect(finished, weak=False)

    class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
        requires: ClassVar[tuple[str, ...]] = ("celery.worker.components:Timer",)
        receivers: ClassVar[tuple[Any, ...]] = (started, finished)  # to disconnect them

        def start(self, worker: Any) -> None:
            # Both fire from the event loop: the first as soon as it turns, then every interval.
            worker.timer.call_after(0.0, heartbeat.touch)
            self.tref = worker.timer.call_repeatedly(heartbeat.interval, heartbeat.touch)
            if inline_tasks:
                heartbeat.start_keepalive()

        def stop(self, worker: Any) -> None:
            tref = getattr(self, "tref", None)
            if tref is not None:
                tref.cancel()
            heartbeat.stop_keepalive()

    return HeartbeatStep


class HeartbeatScheduler(Scheduler):  # type: ignore[misc]
    """Celery's in-memory scheduler that touches `heartbeat` on every tick (nothing on disk:
    the default PersistentScheduler keeps a shelve file, which is pickle)."""

    heartbeat: ClassVar[Heartbeat | None] = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay = float(super().tick(*args, **kwargs))
        if self.heartbeat is None:
            return delay
        self.heartbeat.touch()
        return min(delay, self.heartbeat.interval)  # wake up often enough to stay fresh
