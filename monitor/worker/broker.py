"""The worker's side of the broker: poison messages are dead-lettered, never fatal.

Why: kombu's Redis transport decodes each message inside the worker's event loop, so a message
that is not JSON, not a map, lacks its properties or has a body that does not decode raised out
of the loop and ended the worker ("Unrecoverable error"). A message Celery had already put in
its unacked hash (a body that is a bare string) was restored when the worker stopped, so the
next worker died on it too: a crash loop. Celery itself logs and drops the messages it does
recognise as bad (unknown task, undecodable body, pickle), counted nowhere.

Two hooks, one outcome (dead-lettered once, counted, the worker goes on to the next message):
- `GuardedRedisTransport` / `GuardedSentinelTransport` (Celery's `broker_transport`): their
  channel catches whatever a delivered message raises while it becomes a task, except the
  broker's own errors (those still reconnect), dead-letters the raw message and takes it out
  of the unacked hash so no restore brings it back.
- `GuardedConsumer` (Celery's `worker_consumer`): dead-letters the messages Celery refuses
  itself (`on_unknown_message`, `on_unknown_task`, `on_invalid_task`, `on_decode_error`)
  before Celery acknowledges or rejects them.

The consumer loop runs in the worker's main process; it records with a runtime of its own
(never the one pool processes inherit) and never lets a failed record end the loop.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.transport.redis import Channel, SentinelChannel, SentinelTransport, Transport

from monitor.config import Settings
from monitor.lazy import ProcessLocal
from monitor.pipeline.deadletter import DeadLetter, DeadLetterSink
from monitor.pipeline.ingest import UNKNOWN_MODEL
from monitor.pipeline.runtime import Runtime

log = logging.getLogger(__name__)

_lock = threading.RLock()
# Messages read from the broker that it then failed to file as unacked (see `_put_back`).
_orphans: deque[tuple[bytes, bytes]] = deque()


def _new_recorder() -> tuple[DeadLetterSink, Runtime]:
    settings = Settings()
    return DeadLetterSink(settings), Runtime(settings)


_recorder: ProcessLocal[tuple[DeadLetterSink, Runtime]] = ProcessLocal(_new_recorder)


def _main_recorder() -> tuple[DeadLetterSink, Runtime]:
    """The consumer loop's sink and runtime, built on first use from the environment."""
    return _recorder.get()


def dead_letter_message(reason: str, raw: bytes, queue: str | None, error: str) -> None:
    """Record a message refused in the consumer loop; a failure to record is logged, never
    raised, because raising here is what used to end the worker."""
    envelope = _envelope(raw)
    found = envelope.get("headers")
    headers: dict[str, Any] = found if isinstance(found, dict) else {}
    properties = envelope.get("properties")
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    letter_id = _text(headers.get("id")) or _text(tag) or uuid.uuid4().hex
    letter = DeadLetter(
        id=letter_id,
        reason=reason,
        message=raw,
        queue=queue,
        task=_text(headers.get("task")),
        error=error,
    )
    try:
        sink, runtime = _main_recorder()
        sink.record(letter, runtime.store, UNKNOWN_MODEL, undo_if_uncounted=False)
    except Exception:
        log.exception(
            "could not dead-letter a %d-byte message from %s (%s); it is dropped", len(raw),
            queue, reason,
        )  # fmt: skip


def _envelope(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _kombu_message(raw: bytes) -> bool:
    """Whether `raw` is a well-formed kombu envelope (JSON map, properties with a delivery
    tag, a body in its declared encoding): then what failed is the task message inside."""
    envelope = _envelope(raw)
    properties = envelope.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return False
    body = envelope.get("body")
    if properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body if isinstance(body, str) else "", validate=True)
        except ValueError:
            return False
    return True


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


class _RecordingRedis(redis.Redis):
    """The channel's client, remembering the last BRPOP reply: the raw message is gone from the
    queue once read, so a message that fails to decode must be taken from here."""

    last_brpop: Any = None

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        response = super().parse_response(connection, command_name, **options)  # type: ignore[no-untyped-call]
        if command_name == "BRPOP":
            self.last_brpop = response
        return response


class _GuardedChannelMixin:
    """What the Redis and Sentinel channels share: a delivery that raises is dead-lettered."""

    def _get_client(self) -> Any:
        if getattr(self, "global_keyprefix", None):
            return super()._get_client()  # type: ignore[misc]
        return _RecordingRedis

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _orphans:
            self._flush_orphans()

    def _brpop_read(self, **options: Any) -> bool:
        if _orphans:
            self._flush_orphans()
        client = self.client  # type: ignore[attr-defined]
        if isinstance(client, _RecordingRedis):
            client.last_brpop = None
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[misc]
        except Exception as exc:
            reply = getattr(client, "last_brpop", None)
            if not reply or self._is_broker_error(exc):
                if reply:
                    self._put_back(reply)
                raise
            key, raw = reply
            queue = _decode(key).rsplit(self.sep, 1)[0]  # type: ignore[attr-defined]
            reason = "malformed_task_message" if _kombu_message(raw) else "undecodable_message"
            dead_letter_message(reason, raw, queue, f"{type(exc).__name__}: {exc}")
            self._forget(raw)  # after the record: a crash in between redelivers, deduplicated
            return True

    def _is_broker_error(self, exc: BaseException) -> bool:
        errors = (*self.connection_errors, redis.RedisError)  # type: ignore[attr-defined]
        return isinstance(exc, errors) and not isinstance(exc, KeyError)

    def _put_back(self, reply: tuple[bytes, bytes]) -> None:
        """The broker failed after handing out a message (a full Redis refuses the MULTI that
        files it as unacked): push it back as the next one to read. A full Redis refuses that
        too, so the message waits in this process and goes back as soon as the broker takes
        writes again (every new channel and every read tries)."""
        with _lock:
            _orphans.append(reply)
        self._flush_orphans()

    def _flush_orphans(self) -> None:
        with _lock:
            while _orphans:
                key, raw = _orphans[0]
                try:
                    with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                        client.rpush(key, raw)
                except Exception as exc:
                    log.warning(
                        "%d message(s) read from the broker wait to go back to their queue "
                        "(%s: %s)", len(_orphans), type(exc).__name__, exc,
                    )  # fmt: skip
                    return
                _orphans.popleft()
                log.warning("a message the broker failed to hand over is back on %s", _decode(key))

    def _forget(self, raw: bytes) -> None:
        """Take the message out of the unacked hash, or a restore would deliver it again."""
        properties = _envelope(raw).get("properties")
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        qos = self.qos  # type: ignore[attr-defined]
        if isinstance(tag, str) and tag in qos._delivered:
            try:
                qos.ack(tag)
            except Exception:
                log.exception("could not remove poison message %s from the unacked hash", tag)


def _decode(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GuardedChannel(_GuardedChannelMixin, Channel):
    pass


class GuardedSentinelChannel(_GuardedChannelMixin, SentinelChannel):
    pass


class GuardedRedisTransport(Transport):
    Channel = GuardedChannel


class GuardedSentinelTransport(SentinelTransport):
    Channel = GuardedSentinelChannel


def _raw_message(message: Any) -> bytes:
    raw = getattr(message, "_raw", None)
    try:
        return json.dumps(raw).encode() if raw is not None else bytes(message.body or b"")
    except (TypeError, ValueError):
        return repr(raw).encode()


def _routing_key(message: Any) -> str | None:
    info = getattr(message, "delivery_info", None)
    return _text(info.get("routing_key")) if isinstance(info, dict) else None


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering what Celery refuses before it acks or rejects it.

    It also paces reconnections after the broker answered with an error: Celery retries a
    channel error at once (about five times a second), which for a Redis that stays full
    would flood the log for as long as it stays full. The waits double from 0.5 s to 10 s
    while errors keep coming, and start over after a quiet minute.
    """

    _error_delay = 0.0
    _error_at = -1e9

    def on_connection_error_before_connected(self, exc: BaseException) -> None:
        super().on_connection_error_before_connected(exc)
        self._pace(exc)

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        super().on_connection_error_after_connected(exc)
        self._pace(exc)

    def _pace(self, exc: BaseException) -> None:
        if not isinstance(exc, redis.ResponseError):
            return  # a lost connection: Celery's own reconnect intervals apply
        now = time.monotonic()
        recent = now - self._error_at < 60.0
        self._error_delay = min(10.0, 2 * self._error_delay) if recent else 0.5
        self._error_at = now
        log.warning(
            "the broker refused a command (%s); reconnecting in %.1f s", exc, self._error_delay
        )
        time.sleep(self._error_delay)

    def _dead_letter(self, reason: str, message: Any, exc: BaseException | None) -> None:
        error = "" if exc is None else f"{type(exc).__name__}: {exc}"
        dead_letter_message(reason, _raw_message(message), _routing_key(message), error)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter("malformed_task_message", message, None)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter("unknown_task", message, exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        disallowed = isinstance(exc, ContentDisallowed)
        self._dead_letter("disallowed_content" if disallowed else "malformed_task_message",
                          message, exc)  # fmt: skip
        super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter("undecodable_body", message, exc)
        super().on_decode_error(message, exc)
