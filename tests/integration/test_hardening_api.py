"""Attacks on the ingest API with a valid token, against a real `collapse-monitor api` process,
a real redis-server and (where batches must land) a real worker.

Each test is an attack first reproduced against the API as it was (comments say what it did),
then the bound that now stops it: a slow body (408), concurrent large bodies (503 past the
bytes-in-flight budget), a burst from one client (429), a request of 20,000 texts (413), a lone
surrogate (400, was a 500), a flood without a token (counted under `_unknown`, no model's
series moves), and a broker that goes silent mid-send (the 503 carries the batch id; the retry
with it is counted once, where a retry without it doubled the batch).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from api_server import ApiProcess, PausableProxy, closed_by_peer, head, read_answer
from fastapi.testclient import TestClient
from servers import RedisServer, service_env, start_worker, stop_process, wait_for
from test_pipeline_redis import DIM, VOCAB, batches

from monitor.config import Settings
from monitor.exporter.server import create_exporter_app
from monitor.pipeline.client import MonitorClient, SubmitError

pytestmark = pytest.mark.slow

MODELS: list[dict[str, Any]] = [
    {"name": "m", "vocab_size": VOCAB, "dim": DIM},
    {"name": "t", "checkpoint": "/nonexistent/tiny", "vocab_size": VOCAB, "dim": DIM},
]
URL = "/v1/models/m/samples"
StartApi = Callable[..., ApiProcess]


def features(rows: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    x, y = batches(1, rows, seed=seed)[0]

    def spec(dtype: str, a: np.ndarray) -> dict[str, Any]:
        return {
            "dtype": dtype,
            "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode(),
        }

    return {"features": spec("float32", x), "labels": spec("int64", y.astype(np.int64)), **extra}


def counters(server: RedisServer, owner: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = server.client().hgetall(f"cm:{{{owner}}}:counters")  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def start_api(redis_server: RedisServer, tmp_path: Path) -> Iterator[StartApi]:
    """Start API processes with extra COLLAPSE_* settings; all stopped at the end."""
    started: list[ApiProcess] = []

    def start(**env: str) -> ApiProcess:
        base = service_env(redis_server.url, json.dumps(MODELS), **env)
        api = ApiProcess(base, tmp_path / f"api-{len(started)}.log")
        started.append(api)
        return api.start()

    try:
        yield start
    finally:
        for api in started:
            api.stop()


# --------------------------------------------------------------------------- slow bodies
def test_slow_body_gets_408_its_connection_closed_and_is_counted(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: headers and one byte of a 1000-byte body held the request open indefinitely."""
    api = start_api(COLLAPSE_API_BODY_TIMEOUT="2")
    silent, drip = api.connect(), api.connect()
    started = time.monotonic()
    silent.sendall(head("POST", URL, 1000) + b"{")
    drip.sendall(head("POST", URL, 1000))
    sent = 0
    with contextlib.suppress(OSError):  # the server closes it at its deadline
        while time.monotonic() - started < 6.0:  # a byte every 0.25 s: never idle, never done
            drip.sendall(b" ")
            sent += 1
            time.sleep(0.25)
    assert 4 <= sent < 20
    for sock in (silent, drip):
        answer = read_answer(sock)
        assert answer.status == 408
        assert answer.json()["error"]["reason"] == "body_timeout"
        assert closed_by_peer(sock, 5.0)
        sock.close()
    assert time.monotonic() - started < 10.0
    gone = api.connect()
    gone.sendall(head("POST", URL, 1000) + b'{"features": ')
    gone.close()  # a client that leaves mid-body: counted, no internal error
    wait_for(lambda: counters(redis_server, "m").get("rejected:client_disconnect") == 1, 10, "")
    assert counters(redis_server, "m")["rejected:body_timeout"] == 2
    assert api.post(features(20)).status == 202
    assert "internal error" not in api.log.read_text()


def test_slow_or_missing_request_head_is_closed_at_the_deadline(start_api: StartApi) -> None:
    """Was: a connection that sent nothing, or a header line now and then, was held forever
    (uvicorn has no deadline on a request head; the app never ran, so nothing else could)."""
    api = start_api(COLLAPSE_API_BODY_TIMEOUT="2")
    idle, slow = api.connect(), api.connect()
    started = time.monotonic()
    with contextlib.suppress(OSError):
        slow.sendall(b"POST /v1/models/m/samples HTTP/1.1\r\nHost: x\r\n")
        for i in range(3):
            time.sleep(0.5)
            slow.sendall(f"X-Filler-{i}: y\r\n".encode())
    assert closed_by_peer(idle, 6.0)
    assert closed_by_peer(slow, 6.0)
    assert time.monotonic() - started < 8.0
    keep = api.connect()  # a connection that sends its request in time is served
    keep.sendall(head("POST", URL, 0))
    assert read_answer(keep).status == 400
    keep.close()


# ---------------------------------------------------------------------- bytes in flight
def test_concurrent_large_bodies_beyond_the_budget_get_503(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: every concurrent body was read and parsed at once (4 x 43 MB added ~400 MB)."""
    limit = 8 * 1024 * 1024
    api = start_api(
        COLLAPSE_MAX_PAYLOAD_BYTES=str(limit),
        COLLAPSE_API_MAX_INFLIGHT_BYTES=str(13 * 1024 * 1024),
        COLLAPSE_API_BODY_TIMEOUT="60",
    )
    body = json.dumps(features(65536, seed=1)).encode()  # 5.9 MB: two fit in 13 MiB, not three
    assert 6.5 * 1024 * 1024 < 2 * len(body) < 13 * 1024 * 1024 < 3 * len(body)
    held = [api.connect(), api.connect()]
    for sock in held:  # all but the last byte: the server holds them, waiting for the rest
        sock.sendall(head("POST", URL, len(body)) + body[:-1])
    time.sleep(1.0)
    third = api.connect()
    started = time.monotonic()
    third.sendall(head("POST", URL, len(body)))  # refused before a byte of its body is sent
    busy = read_answer(third)
    assert time.monotonic() - started < 2.0
    assert busy.status == 503
    assert busy.json()["error"]["reason"] == "server_busy"
    assert "batch_id" not in busy.json()  # nothing was sent: a retry is a first try
    assert busy.headers["retry-after"] == "1"
    assert busy.headers["connection"] == "close"
    third.close()
    for sock in held:
        sock.sendall(body[-1:])
        answer = read_answer(sock)
        assert answer.status == 202, answer.body
        sock.close()
    assert api.post(json.loads(body)).status == 202  # the budget was given back
    assert counters(redis_server, "m")["rejected:server_busy"] == 1
    assert redis_server.client().llen("ingest") == 3


# --------------------------------------------------------------------------- rate bound
def test_one_client_over_its_rate_gets_429_and_others_are_not_slowed(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: one token holder could send at any rate; nothing bounded it."""
    api = start_api(COLLAPSE_API_CLIENT_RATE="1", COLLAPSE_API_CLIENT_BURST="3")
    answers = [api.post(features(10, seed=i)) for i in range(5)]
    assert [a.status for a in answers] == [202, 202, 202, 429, 429]
    assert answers[3].json()["error"]["reason"] == "rate_limited"
    assert int(answers[3].headers["retry-after"]) >= 1
    other = api.post(features(10, seed=9), source="127.0.0.2")  # another client address
    assert other.status == 202
    assert counters(redis_server, "m")["rejected:rate_limited"] == 2
    assert redis_server.client().llen("ingest") == 4


# ----------------------------------------------------------------- per-request work bound
def test_twenty_thousand_texts_are_refused_before_any_work(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: one request of 20,000 texts was queued whole (22 s of embed worker CPU)."""
    api = start_api(COLLAPSE_API_CLIENT_RATE="0")
    texts = [f"Once upon a time there was fox number {i}." for i in range(20_000)]
    started = time.monotonic()
    many = api.post({"texts": texts}, model="t")
    assert time.monotonic() - started < 5.0
    assert many.status == 413
    assert many.json()["error"]["reason"] == "too_many_texts"
    long = api.post({"texts": ["x" * 70_000]}, model="t")
    assert (long.status, long.json()["error"]["reason"]) == (413, "too_many_tokens")
    ids = api.post({"token_ids": [[1] * 70_000]}, model="t")
    assert (ids.status, ids.json()["error"]["reason"]) == (413, "too_many_tokens")
    assert redis_server.client().llen("embed") == 0  # nothing reached a worker
    within = api.post({"texts": texts[:256]}, model="t")  # at the bound: accepted
    assert within.status == 202, within.body
    assert redis_server.client().llen("embed") == 1
    rejected = counters(redis_server, "t")
    assert rejected["rejected:too_many_texts"] == 20_000
    assert rejected["rejected:too_many_tokens"] == 2


def test_lone_surrogate_is_a_counted_400_not_a_500(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: {"texts": ["\\ud800"]} crashed the handler (500, a traceback in the log)."""
    api = start_api()
    answer = api.request("POST", "/v1/models/t/samples", b'{"texts": ["fine", "\\ud800"]}')
    assert answer.status == 400
    assert answer.json()["error"]["reason"] == "invalid_text"
    assert counters(redis_server, "t")["rejected:invalid_text"] == 2
    assert redis_server.client().llen("embed") == 0
    assert "internal error" not in api.log.read_text()


# ---------------------------------------------------------------- unauthenticated traffic
def test_requests_without_the_token_move_no_model_series(
    start_api: StartApi, redis_server: RedisServer
) -> None:
    """Was: each 401 was counted as rejected:unauthorized under the model the path named, so
    a client without the token could fire CollapseRejectionRateHigh for any model."""
    api = start_api()
    for i in range(100):
        token = None if i % 2 else "not-the-token-" + "x" * 20
        assert api.post(features(5), token=token).status == 401
    wait_for(
        lambda: counters(redis_server, "_unknown").get("rejected:unauthorized") == 100, 10, "count"
    )
    assert counters(redis_server, "m") == {}
    settings = Settings(redis_url=redis_server.url, models=MODELS)
    with TestClient(create_exporter_app(settings)) as http:
        page = http.get("/metrics").text
    rejected = [line for line in page.splitlines() if line.startswith("collapse_samples_rejected")]
    assert rejected == [
        'collapse_samples_rejected_total{model="_unknown",reason="unauthorized"} 100.0'
    ]


# ----------------------------------------------------------- a 503 after a send that lands
@pytest.fixture
def worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "worker.log"
    proc = start_worker(service_env(redis_server.url, json.dumps(MODELS)), log)
    try:
        wait_for(lambda: "ready." in log.read_text(errors="replace"), 60, "celery worker")
        yield log
    finally:
        stop_process(proc)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[PausableProxy]:
    """The broker's connection through a proxy a test can pause (the store's is direct)."""
    forwarder = PausableProxy(redis_server.port)
    try:
        yield forwarder
    finally:
        forwarder.close()


def _ingested(server: RedisServer, batches_: int) -> Callable[[], bool]:
    def done() -> bool:
        seen = counters(server, "m")
        return seen.get("batches_ingested", 0) + seen.get("batches_duplicate", 0) >= batches_

    return done


def test_503_from_a_silent_broker_carries_the_id_and_the_retry_counts_once(
    start_api: StartApi, redis_server: RedisServer, proxy: PausableProxy, worker: Path
) -> None:
    """Was: the broker answered after the API's deadline, the message landed anyway, and the
    503 named no batch id: the client's retry (a fresh id) stored the batch twice."""
    api = start_api(COLLAPSE_BROKER_URL=proxy.url)
    assert api.post(features(10, seed=0, batch_id="warm")).status == 202  # connection is up
    proxy.pause()
    started = time.monotonic()
    first = api.post(features(40, seed=1))  # no batch id: the API picks one
    assert 2.5 < time.monotonic() - started < 8.0  # the enqueue deadline (3 s), not a hang
    assert first.status == 503, first.body
    assert first.json()["error"]["reason"] == "broker_unavailable"
    batch_id = first.json()["batch_id"]
    assert first.headers["x-batch-id"] == batch_id
    proxy.resume()  # the held LPUSH reaches Redis: the "failed" send lands after all
    retry = api.post(features(40, seed=1, batch_id=batch_id))
    assert (retry.status, retry.json()["batch_id"]) == (202, batch_id)
    wait_for(_ingested(redis_server, 3), 60, "the warm-up, the late send and the retry")
    seen = counters(redis_server, "m")
    assert seen["batches_duplicate"] == 1  # the 503's send did land: the retry was the copy
    assert seen["batches_ingested"] == 2
    assert seen["samples_ingested"] == 10 + 40  # not 10 + 80


def test_client_send_failure_names_the_id_and_its_retry_counts_once(
    redis_server: RedisServer, proxy: PausableProxy, worker: Path
) -> None:
    """MonitorClient: a silent broker failed the send with no id to retry with (and without a
    socket timeout it hung); now SubmitError carries the id and the retry is counted once."""
    settings = Settings(
        redis_url=redis_server.url,
        broker_url=proxy.url,
        models=MODELS,
    )
    client = MonitorClient(settings, send_timeout=1.0)
    x, y = batches(1, 30, seed=4)[0]
    client.submit_features("m", x[:5], y[:5], batch_id="warm")
    proxy.pause()
    started = time.monotonic()
    with pytest.raises(SubmitError) as failed:
        client.submit_features("m", x, y)
    assert time.monotonic() - started < 20.0
    assert failed.value.batch_ids == [failed.value.batch_id]
    proxy.resume()
    assert client.submit_features("m", x, y, batch_id=failed.value.batch_id) == [
        failed.value.batch_id
    ]
    wait_for(lambda: counters(redis_server, "m").get("samples_ingested") == 35, 60, "ingested")
    time.sleep(2.0)  # any late copy of the failed sends would be ingested by now
    seen = counters(redis_server, "m")
    assert seen["samples_ingested"] == 35  # once, however many copies reached the queue
    assert seen["batches_ingested"] == 2
    assert redis.Redis(port=redis_server.port).llen("ingest") == 0
