"""Dead letters: messages the pipeline cannot process, kept for an operator and counted.

Why: a message that can never become a stored batch must not vanish. Before, a broker message
that was not JSON crashed the worker (and a restored one crash-looped it), a task that failed on
Redis was acknowledged and dropped, and neither was counted anywhere. Now every such message
ends in exactly one place an operator can read, and in a counter an alert watches.

Where:
- On the broker, list `<redis_key_prefix>:dead_letters`, newest first, trimmed to
  `dead_letter_limit` entries: one JSON object per message with `id`, `reason`, `time`, `queue`,
  `task`, `model`, `batch_id`, `error`, `retries`, `message_bytes` and `message` (base64 of the
  broker message or task arguments, cut at `dead_letter_body_bytes`; `truncated` says so).
  Plain JSON, never pickle: reading a dead letter runs nothing.
- A marker `<redis_key_prefix>:dead_letter:<id>` (7 days) makes recording idempotent: one Lua
  script sets it and pushes the entry, so a message redelivered after it was dead-lettered is
  neither stored nor counted again.
- The count: `dead_letters:<reason>` in the store's counters of the message's model (`_unknown`
  when it names no declared model), exported as `collapse_dead_letters_total{model, reason}`.

The broker, not the store, keeps the entries because dead letters are often born of a store
that refuses writes (out of memory), and the broker is where the message came from.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.exceptions import RedisClusterException

from monitor.config import Settings
from monitor.pipeline.runtime import broker_client
from monitor.store.base import Store, StoreBusy

log = logging.getLogger(__name__)

# Why a message was dead-lettered; a fixed catalogue, so the exporter can show every reason at 0
# before the first one happens (Prometheus's increase() misses a series born at 1).
DEAD_LETTER_REASONS = (
    "undecodable_message",  # the broker envelope is not JSON, not a map, or lacks its fields
    "malformed_task_message",  # headers or body not a task message, or arguments that do not fit
    "unknown_task",  # a task name no worker implements
    "disallowed_content",  # a serializer other than msgpack or JSON (pickle)
    "undecodable_body",  # the body does not decode with its own content type
    "retries_exhausted",  # infrastructure failures past task_max_retries
    "task_error",  # an unexpected exception in the task: a bug, never retried
)
# Infrastructure failures of one ingest or embed attempt (`ingest_failures:<reason>`).
FAILURE_REASONS = (
    "oom",  # Redis at maxmemory refuses writes
    "connection",  # connection lost or refused
    "timeout",
    "loading",  # Redis is loading its dataset after a restart
    "readonly",  # a replica, or a master demoted by a failover
    "no_permission",  # an ACL refuses a command or key
    "busy",  # a script or the state lock holds the model
    "redis_error",  # any other error Redis answered
    "device_oom",  # the GPU ran out of memory
)
MARKER_TTL_SECONDS = 7 * 86400

_RECORD = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
  return 1
end
return 0
"""
_UNDO = """
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


def failure_reason(exc: BaseException) -> str | None:
    """The infrastructure failure `exc` is (a `FAILURE_REASONS` slug), None for anything else.

    Order matters: redis-py's OOM and ACL errors are ResponseErrors, its LOADING error a
    ConnectionError, so the specific classes are tested first.
    """
    checks: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        (redis.exceptions.OutOfMemoryError, "oom"),
        (redis.exceptions.BusyLoadingError, "loading"),
        (redis.exceptions.ReadOnlyError, "readonly"),
        (redis.exceptions.NoPermissionError, "no_permission"),
        (redis.exceptions.TimeoutError, "timeout"),
        ((redis.exceptions.ConnectionError, OSError, RedisClusterException), "connection"),
        (StoreBusy, "busy"),
    )
    for kind, reason in checks:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("BUSY"):
        return "busy"
    if isinstance(exc, redis.RedisError):
        return "redis_error"
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return "device_oom"
    return None


def list_key(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}:dead_letters"


def marker_key(settings: Settings, letter_id: str) -> str:
    return f"{settings.redis_key_prefix}:dead_letter:{letter_id}"


@dataclass(frozen=True)
class DeadLetter:
    """One message that will not be processed, and why."""

    id: str  # the task id, else the broker delivery tag, else a fresh uuid
    reason: str
    message: bytes
    queue: str | None = None
    task: str | None = None
    model: str | None = None
    batch_id: str | None = None
    error: str = ""
    retries: int = 0
    at: float = field(default_factory=time.time)

    def entry(self, body_limit: int) -> str:
        kept = self.message[:body_limit]
        return json.dumps(
            {
                "id": self.id,
                "reason": self.reason,
                "time": self.at,
                "queue": self.queue,
                "task": self.task,
                "model": self.model,
                "batch_id": self.batch_id,
                "error": self.error[:500],
                "retries": self.retries,
                "message_bytes": len(self.message),
                "truncated": len(kept) < len(self.message),
                "message": base64.b64encode(kept).decode("ascii"),
            },
            sort_keys=True,
        )


class DeadLetterSink:
    """Records dead letters on the broker and counts them in the store, once per message id.

    `broker` defaults to a client of the broker with 5 s timeouts and no retries: the callers
    (a task, or the worker's consumer loop) have their own fallback when it fails.
    """

    def __init__(self, settings: Settings, broker: redis.Redis | None = None) -> None:
        self.settings = settings
        self._broker = broker

    @property
    def broker(self) -> redis.Redis:
        if self._broker is None:
            client = broker_client(self.settings, io_timeout=5.0)
            if client is None:
                raise RuntimeError("embedded mode has no broker to keep dead letters on")
            self._broker = client
        return self._broker

    def record(
        self, letter: DeadLetter, store: Store, owner: str, *, undo_if_uncounted: bool
    ) -> bool:
        """Keep `letter` and count it under `owner`; False when it was recorded before.

        If the count cannot be written and `undo_if_uncounted`, the entry is taken back and the
        error raised, so the caller keeps the message and tries again later (entry and count
        go together). Otherwise the entry stays, uncounted, and the error is logged.
        """
        entry = letter.entry(self.settings.dead_letter_body_bytes)
        keys = [list_key(self.settings), marker_key(self.settings, letter.id)]
        new = self.broker.eval(
            _RECORD, 2, *keys, entry, self.settings.dead_letter_limit, MARKER_TTL_SECONDS
        )
        if not new:
            log.info("dead letter %s (%s) was recorded before", letter.id, letter.reason)
            return False
        try:
            store.add_counters(owner, {f"dead_letters:{letter.reason}": 1})
        except Exception:
            if undo_if_uncounted:
                self.broker.eval(_UNDO, 2, *keys, entry)
                raise
            log.exception("dead letter %s kept but not counted: the store refused", letter.id)
        log.error(
            "dead-lettered %s (%s) from queue %s, task %s, model %s: %s",
            letter.id,
            letter.reason,
            letter.queue,
            letter.task,
            letter.model,
            letter.error[:200],
        )
        return True


def read_dead_letters(
    client: redis.Redis, settings: Settings, count: int = 100
) -> list[dict[str, Any]]:
    """The newest `count` dead letters (newest first), as recorded."""
    raw = cast(list[bytes], client.lrange(list_key(settings), 0, max(count, 1) - 1))
    return [json.loads(item) for item in raw]
