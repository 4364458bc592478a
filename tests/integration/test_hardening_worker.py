"""Hardening of the worker against real processes (issue 16): poison broker messages, a Redis
at maxmemory, a failure that never goes away, and one model's maintenance failing.

Every test runs a real redis-server (a second one where the broker is apart) and a real
`collapse-monitor worker` on loopback. Poison messages are forged the way kombu's Redis
transport lays a message out (a JSON envelope LPUSHed on the queue's list, the body base64 in
it) and pushed with redis-py, so nothing in the worker is bypassed.
"""

from __future__ import annotations

import base64
import collections
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from servers import RedisServer, service_env, start_worker, stop_process, wait_for, worker_ready
from test_pipeline_redis import MODELS, assert_same_stats, batches, reference

from monitor.config import Settings
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.deadletter import read_dead_letters
from monitor.pipeline.queues import TASK_COMPACT, TASK_EVALUATE, TASK_INGEST
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.worker.app import create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FILLERS = 256  # 64 KiB each: 16 MiB
OVER_LIMIT = 8 << 20  # how far past maxmemory the tests put Redis
FAST_RETRIES = {
    "COLLAPSE_TASK_MAX_RETRIES": "2",
    "COLLAPSE_TASK_RETRY_BACKOFF": "0.1",
    "COLLAPSE_TASK_RETRY_BACKOFF_MAX": "0.4",
}


# --------------------------------------------------------------------------------- helpers
def _log_text(log: Path) -> str:
    return log.read_text(errors="replace")


def _assert_never_crashed(worker: subprocess.Popen[bytes], log: Path) -> None:
    text = _log_text(log)
    assert worker.poll() is None, "the worker exited"
    assert "Unrecoverable error" not in text, text[-3000:]
    assert "is dropped" not in text, text[-3000:]


def _ingested(runtime: Runtime, model: str = "m") -> int:
    return runtime.store.counters(model).get("batches_ingested", 0)


def envelope(
    body: bytes,
    *,
    task: str = TASK_INGEST,
    content_type: str = "application/x-msgpack",
    encoding: str = "binary",
    headers: object = None,
    queue: str = "ingest",
) -> bytes:
    """A message as kombu's Redis transport stores it: a JSON envelope, the body in base64."""
    task_id = str(uuid.uuid4())
    if headers is None:
        headers = {
            "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "",
            "kwargsrepr": "", "origin": "forged",
        }  # fmt: skip
    doc = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": None,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(doc).encode()


def task_body(*args: object) -> bytes:
    """A Celery protocol-2 body: (args, kwargs, embed), msgpack as the service sends it."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return bytes(msgpack.packb([list(args), {}, embed]))


def poison_messages() -> list[tuple[str, bytes, str]]:
    """(what, raw message, expected dead-letter reason)."""
    bad_encoding = json.loads(envelope(task_body({})))
    bad_encoding["body"] = "a raw string, not base64!"
    no_properties = {"body": base64.b64encode(b"x").decode(), "headers": {}}
    return [
        ("not JSON", b"\x00\xff{not json", "undecodable_message"),
        ("a JSON string", json.dumps("hello").encode(), "undecodable_message"),
        ("a JSON list", b"[1, 2, 3]", "undecodable_message"),
        ("no properties", json.dumps(no_properties).encode(), "undecodable_message"),
        ("body not in its encoding", json.dumps(bad_encoding).encode(), "undecodable_message"),
        ("headers not a map", envelope(task_body({}), headers="oops"), "malformed_task_message"),
        ("body a raw JSON string",
         envelope(b'"hello"', content_type="application/json", encoding="utf-8"),
         "malformed_task_message"),
        ("body a raw msgpack string", envelope(bytes(msgpack.packb("hello"))),
         "malformed_task_message"),
        ("body not msgpack", envelope(b"\xc1\xc1\xc1"), "undecodable_body"),
        ("unknown task", envelope(task_body({}), task="collapse.nope"), "unknown_task"),
        ("no arguments", envelope(task_body()), "malformed_task_message"),
        ("pickle", envelope(b"\x80\x04K\x01.", content_type="application/x-python-serialize"),
         "disallowed_content"),
    ]  # fmt: skip


@pytest.fixture
def broker_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A second redis-server: the broker apart from the store."""
    (tmp_path / "broker").mkdir()
    server = RedisServer(tmp_path / "broker")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _fillers(client: redis.Redis) -> int:
    """Write 16 MiB of filler keys in small pipelines; returns Redis's used memory after.

    Small pipelines, and a pause before measuring, so no large query or AOF buffer is counted
    in the measure and freed later, which would bring Redis back under its limit by itself.
    """
    for start in range(0, FILLERS, 8):
        pipe = client.pipeline(transaction=False)
        for i in range(start, start + 8):
            pipe.set(f"filler:{i}", b"x" * (64 << 10))
        pipe.execute()
    time.sleep(0.5)
    return int(client.info("memory")["used_memory"])


def _fill_past_maxmemory(client: redis.Redis, over: int = OVER_LIMIT) -> None:
    """Put Redis `over` bytes past its maxmemory with noeviction: every write is refused."""
    used = _fillers(client)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used - over))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", b"1")


def _lift_maxmemory(client: redis.Redis) -> None:
    client.config_set("maxmemory", "0")
    client.delete(*[f"filler:{i}" for i in range(FILLERS)])


# --------------------------------------------------------------------------- poison messages
def test_poison_messages_are_dead_lettered_once_and_the_worker_keeps_working(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = service_env(redis_server.url, json.dumps(MODELS))
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    settings = Settings(redis_url=redis_server.url, models=MODELS)  # type: ignore[arg-type]
    runtime, client, broker = Runtime(settings), MonitorClient(settings), redis_server.client()

    poisons = poison_messages()
    good = batches(len(poisons) + 1, 20, seed=3)
    for i, (what, raw, _) in enumerate(poisons):
        broker.lpush("ingest", raw)  # the poison first, then a good batch behind it
        client.submit_features("m", *good[i], batch_id=f"good-{i}")
        wait_for(lambda i=i: _ingested(runtime) == i + 1, 30, f"the good batch after {what}")  # type: ignore[misc]
        _assert_never_crashed(worker, log)

    letters = read_dead_letters(broker, settings, 100)
    expected = collections.Counter(reason for _, _, reason in poisons)
    assert collections.Counter(e["reason"] for e in letters) == expected
    raws = {base64.b64decode(e["message"]) for e in letters if e["reason"] == "undecodable_message"}
    assert {raw for _, raw, reason in poisons if reason == "undecodable_message"} <= raws
    counted = {
        k.removeprefix("dead_letters:"): v
        for k, v in runtime.store.counters("_unknown").items()
        if k.startswith("dead_letters:")
    }
    assert counted == dict(expected)
    assert broker.llen("ingest") == 0
    assert broker.hlen("unacked") == 0, "a poison message left in unacked would come back"
    assert "Refusing to deserialize" in _log_text(log)  # the pickle was refused, not loaded

    # A restart restores nothing: no poison comes back, nothing is recorded or counted twice.
    stop_process(worker)
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log, times=2), 60, "restarted worker")
    client.submit_features("m", *good[-1], batch_id="after-restart")
    wait_for(lambda: _ingested(runtime) == len(poisons) + 1, 30, "a batch after the restart")
    time.sleep(1.0)
    assert len(read_dead_letters(broker, settings, 100)) == len(poisons)
    assert (
        runtime.store.counters("_unknown").get("dead_letters:undecodable_message")
        == (expected["undecodable_message"])
    )
    _assert_never_crashed(worker, log)
    compact_model(runtime.store, "m")
    window = window_stats(runtime.store, "m", "1h", 3600).stats
    assert window is not None
    assert_same_stats(window, reference(good))  # the poison touched no statistics


# ------------------------------------------------------------------------- Redis at maxmemory
def test_store_out_of_memory_is_retried_until_redis_takes_writes_again(
    redis_server: RedisServer,
    broker_server: RedisServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = service_env(
        redis_server.url, json.dumps(MODELS), COLLAPSE_BROKER_URL=broker_server.url, **FAST_RETRIES
    )
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    settings = Settings(redis_url=redis_server.url, broker_url=broker_server.url, models=MODELS)  # type: ignore[arg-type]
    runtime, client = Runtime(settings), MonitorClient(settings)
    data = batches(6, 40, seed=11)
    client.submit_features("m", *data[0], batch_id="before")
    wait_for(lambda: _ingested(runtime) == 1, 30, "the first batch")

    store = redis_server.client()
    _fill_past_maxmemory(store)
    for i, (x, y) in enumerate(data[1:], start=1):
        client.submit_features("m", x, y, batch_id=f"oom-{i}")  # accepted by the broker
    wait_for(
        lambda: _log_text(log).count("cannot be dead-lettered yet") >= 3,
        60,
        "retries exhausted while Redis stays full: kept, not dead-lettered, not dropped",
    )
    assert _ingested(runtime) == 1
    assert "OutOfMemoryError" in _log_text(log)
    _assert_never_crashed(worker, log)

    _lift_maxmemory(store)
    wait_for(lambda: _ingested(runtime) == len(data), 60, "every batch once Redis takes writes")
    time.sleep(2.0)  # a late duplicate, if any, would show up now
    counters = runtime.store.counters("m")
    assert counters["batches_ingested"] == len(data)
    assert counters.get("batches_duplicate", 0) == 0
    assert counters.get("ingest_failures:oom", 0) >= len(data) - 1  # counted after the fact
    assert not [k for k in counters if k.startswith("dead_letters:")]
    assert read_dead_letters(broker_server.client(), settings) == []
    compact_model(runtime.store, "m")
    window = window_stats(runtime.store, "m", "1h", 3600).stats
    assert window is not None
    assert_same_stats(window, reference(data))
    _assert_never_crashed(worker, log)


def test_broker_out_of_memory_neither_crashes_the_worker_nor_loses_a_message(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """One Redis as store and broker, full: the worker used to exit ("Unrecoverable error"),
    and a message it had popped but could not file as unacked was gone."""
    env = service_env(redis_server.url, json.dumps(MODELS), **FAST_RETRIES)
    settings = Settings(redis_url=redis_server.url, models=MODELS)  # type: ignore[arg-type]
    runtime, client, r = Runtime(settings), MonitorClient(settings), redis_server.client()
    data = batches(4, 40, seed=12)
    client.submit_features("m", *data[1], batch_id="popped-when-full")
    raw = r.rpop("ingest")  # the message exactly as Celery queued it, kept for later
    assert raw is not None
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    client.submit_features("m", *data[0], batch_id="warm")
    wait_for(lambda: _ingested(runtime) == 1, 30, "the first batch")

    # Redis fills up in the transaction that queues the batch: the waiting worker pops it and
    # then cannot file it as unacked (at maxmemory, Redis refuses every command of a MULTI).
    used = _fillers(r)
    pipe = r.pipeline(transaction=True)
    pipe.lpush("ingest", raw)
    pipe.config_set("maxmemory-policy", "noeviction")
    pipe.config_set("maxmemory", str(used - OVER_LIMIT))
    pipe.execute()
    wait_for(lambda: "wait to go back to their queue" in _log_text(log), 30, "the message held")
    assert r.llen("ingest") == 0
    assert _ingested(runtime) == 1
    time.sleep(3.0)  # the consumer keeps reconnecting; the worker stays up
    assert worker.poll() is None, "the worker exited on a full broker"
    assert "Unrecoverable error" not in _log_text(log)

    _lift_maxmemory(r)
    for i, (x, y) in enumerate(data[2:], start=2):
        client.submit_features("m", x, y, batch_id=f"after-{i}")
    wait_for(lambda: _ingested(runtime) == len(data), 90, "every batch once Redis has room")
    assert "is back on ingest" in _log_text(log)
    counters = runtime.store.counters("m")
    assert counters["batches_ingested"] == len(data)
    compact_model(runtime.store, "m")
    window = window_stats(runtime.store, "m", "1h", 3600).stats
    assert window is not None
    assert_same_stats(window, reference(data))
    _assert_never_crashed(worker, log)


# ------------------------------------------------------------------ a failure that persists
TWO_MODELS = [*MODELS, {"name": "free", "vocab_size": 300, "dim": 16}]


def test_a_failure_that_persists_is_dead_lettered_once_and_counted(
    redis_server: RedisServer,
    broker_server: RedisServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """The worker's ACL user may not write model m's partials (a misconfigured ACL): every
    try fails the same way, so after task_max_retries the batch is dead-lettered, once."""
    store = redis_server.client()
    store.execute_command(
        "ACL", "SETUSER", "worker", "on", ">worker-pw", "resetkeys", "~cm:models",
        "~cm:{free}:*", "~cm:{_unknown}:*", "~cm:{m}:seen:*", "~cm:{m}:pending",
        "~cm:{m}:counters", "~cm:{m}:meta", "~cm:{m}:lock:*", "+@all",
    )  # fmt: skip
    url = f"redis://worker@127.0.0.1:{redis_server.port}/0"
    env = service_env(
        url,
        json.dumps(TWO_MODELS),
        COLLAPSE_REDIS_PASSWORD="worker-pw",
        COLLAPSE_BROKER_URL=broker_server.url,
        **FAST_RETRIES,
    )
    settings = Settings(redis_url=redis_server.url, broker_url=broker_server.url, models=TWO_MODELS)  # type: ignore[arg-type]
    runtime, client, broker = Runtime(settings), MonitorClient(settings), broker_server.client()
    data = batches(3, 30, seed=13)
    client.submit_features("m", *data[0], batch_id="denied-0")
    raw = broker.rpop("ingest")
    assert raw is not None
    broker.lpush("ingest", raw, raw)  # the same message twice, as after a lost acknowledgement
    client.submit_features("m", *data[1], batch_id="denied-1")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")

    wait_for(lambda: len(read_dead_letters(broker, settings)) == 2, 60, "two dead letters")
    time.sleep(2.0)  # the second copy of denied-0 finishes its retries too
    letters = read_dead_letters(broker, settings)
    assert len(letters) == 2, "the duplicate delivery was dead-lettered twice"
    assert sorted(e["batch_id"] for e in letters) == ["denied-0", "denied-1"]
    for letter in letters:
        assert letter["reason"] == "retries_exhausted"
        assert (letter["model"], letter["queue"], letter["retries"]) == ("m", "ingest", 2)
        assert "NoPermissionError" in letter["error"]
        kept = msgpack.unpackb(base64.b64decode(letter["message"]))
        assert kept["args"][0]["batch_id"] == letter["batch_id"]  # enough to replay it
    counters = runtime.store.counters("m")
    assert counters.get("dead_letters:retries_exhausted") == 2
    assert counters.get("ingest_failures:no_permission", 0) >= 2 * 3  # 3 tries per batch
    assert counters.get("batches_ingested", 0) == 0

    client.submit_features("free", *data[2], batch_id="allowed")
    wait_for(lambda: _ingested(runtime, "free") == 1, 30, "the next good batch")
    stop_process(worker)  # a restart brings none of them back
    worker = start_worker(env, log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log, times=2), 60, "restarted worker")
    time.sleep(2.0)
    assert len(read_dead_letters(broker, settings)) == 2
    assert runtime.store.counters("m").get("dead_letters:retries_exhausted") == 2
    assert broker.llen("ingest") == 0
    assert broker.hlen("unacked") == 0
    _assert_never_crashed(worker, log)


# --------------------------------------------------------------- isolation between models
ISOLATED = [
    {"name": "a-bad", "vocab_size": 300, "dim": 16, "second_moment": True},
    {"name": "b-good", "vocab_size": 300, "dim": 16, "second_moment": True},
]


def test_one_models_failing_maintenance_never_blocks_another(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Model a-bad's window table is corrupted (a string where a hash belongs), so its
    compaction and evaluation raise; b-good, after it in both loops, is compacted and
    evaluated all the same, and a-bad's failures are counted."""
    env = service_env(redis_server.url, json.dumps(ISOLATED))
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, queues="ingest,maintenance")
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    settings = Settings(redis_url=redis_server.url, models=ISOLATED)  # type: ignore[arg-type]
    runtime, client = Runtime(settings), MonitorClient(settings)
    data = batches(4, 50, seed=14)
    for i, (x, y) in enumerate(data):
        client.submit_features("a-bad" if i % 2 else "b-good", x, y, batch_id=f"iso-{i}")
    wait_for(
        lambda: _ingested(runtime, "a-bad") == 2 and _ingested(runtime, "b-good") == 2,
        30,
        "both models ingested",
    )
    redis_server.client().set(runtime.store.keys("a-bad").windows, "corrupted")

    app = create_app(settings)
    app.send_task(TASK_COMPACT)
    wait_for(lambda: runtime.store.pending_count("b-good") == 0, 30, "b-good compacted")
    good = window_stats(runtime.store, "b-good", "1h", 3600).stats
    assert good is not None
    assert_same_stats(good, reference(data[0::2]))
    wait_for(
        lambda: runtime.store.counters("a-bad").get("compaction_failures", 0) >= 1,
        10,
        "a-bad's compaction failure counted",
    )
    assert runtime.store.pending_count("a-bad") == 2  # its partials wait, nothing lost

    app.send_task(TASK_EVALUATE)
    wait_for(lambda: runtime.store.snapshot("b-good", "1h") is not None, 60, "b-good evaluated")
    wait_for(
        lambda: runtime.store.counters("a-bad").get("evaluation_failures", 0) >= 1,
        10,
        "a-bad's evaluation failure counted",
    )
    assert runtime.store.snapshot("a-bad", "1h") is None
    text = _log_text(log)
    assert "compaction of a-bad failed; the other models go on" in text
    assert "evaluation of a-bad failed" in text
    _assert_never_crashed(worker, log)


def test_infrastructure_failures_are_told_from_bugs() -> None:
    """What is retried (infrastructure) and what is dead-lettered at once (anything else)."""
    from monitor.errors import InvalidInput
    from monitor.pipeline.deadletter import FAILURE_REASONS, failure_reason
    from monitor.store.base import StoreBusy

    e = redis.exceptions
    cases = {
        e.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"): "oom",
        e.BusyLoadingError("loading"): "loading",
        e.ReadOnlyError("READONLY"): "readonly",
        e.NoPermissionError("NOPERM"): "no_permission",
        e.TimeoutError("timed out"): "timeout",
        e.ConnectionError("refused"): "connection",
        e.AuthenticationError("WRONGPASS"): "connection",
        ConnectionResetError(): "connection",
        StoreBusy("lock held"): "busy",
        e.ResponseError("BUSY Redis is busy running a script"): "busy",
        e.ResponseError("WRONGTYPE Operation against a key"): "redis_error",
    }
    for exc, reason in cases.items():
        assert failure_reason(exc) == reason, exc
        assert reason in FAILURE_REASONS
    for exc in (ValueError("bug"), TypeError("bug"), KeyError("x"), InvalidInput("x", "bad")):
        assert failure_reason(exc) is None
