"""Security against real servers: no pickle, secrets kept out of logs and /metrics, Redis AUTH
and TLS (this Debian redis-server build has TLS). See docs/security.md."""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from kombu import Connection, Producer  # type: ignore[attr-defined]
from pydantic import SecretStr
from servers import (
    RedisServer,
    free_port,
    service_env,
    start_worker,
    stop_process,
    wait_for,
    worker_ready,
)
from test_pipeline_redis import MODELS, batches

from monitor.config import Settings
from monitor.exporter.server import create_exporter_app
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.queues import TASK_INGEST
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.worker.app import create_app

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "rp-7Qx9-distinctive-redis-secret"
WRONG_PASSWORD = "wp-3Kd8-distinctive-wrong-secret"
API_TOKEN = "tok-5Zm2-distinctive-api-token-value"
SECRETS = (REDIS_PASSWORD, WRONG_PASSWORD, API_TOKEN)


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} contains a secret"


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(url: str, password: str | None, **extra: object) -> Settings:
    return Settings(
        redis_url=url,
        redis_password=SecretStr(password) if password is not None else None,
        models=MODELS,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )


def _ingest_and_compact(runtime: Runtime, batch_id: str) -> None:
    x, y = batches(1, 30, seed=21)[0]
    result = runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=batch_id))
    assert result.stored
    assert result.samples == 30
    assert compact_model(runtime.store, "m").partials == 1
    window = window_stats(runtime.store, "m", "1h", 3600).stats
    assert window is not None
    assert window.sample_count == 30


# ------------------------------------------------------------------------------ no pickle


def test_celery_configuration_refuses_pickle() -> None:
    conf = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).conf
    assert "pickle" not in conf.accept_content
    assert "application/x-python-serialize" not in conf.accept_content
    assert set(conf.accept_content) == {"msgpack", "json"}
    assert "pickle" not in conf.result_accept_content
    assert conf.task_serializer == "msgpack"
    assert conf.event_serializer == "json"
    assert conf.result_backend is None


class _Poison:
    """Unpickling this creates `path`: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path.touch, (str(self.path),))  # type: ignore[return-value]


def test_worker_rejects_a_pickled_message(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "worker.log"
    worker = start_worker(service_env(redis_server.url, json.dumps(MODELS)), log)
    processes.append(worker)
    wait_for(lambda: worker_ready(log), 60, "celery worker")
    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": TASK_INGEST,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "argsrepr": "(...)",
        "kwargsrepr": "{}",
        "origin": "attacker",
        "retries": 0,
        "eta": None,
        "expires": None,
    }
    body = ((_Poison(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None})
    assert pickle.loads(pickle.dumps(_Poison(tmp_path / "self-check"))) is None
    assert (tmp_path / "self-check").exists()  # the poison works when something unpickles it
    with Connection(redis_server.url) as connection:
        producer = Producer(connection)
        producer.publish(
            body,
            exchange="",
            routing_key="ingest",
            serializer="pickle",
            headers=headers,
            properties={"correlation_id": task_id},
        )
    refused = ("Refusing to deserialize", "ContentDisallowed")
    wait_for(
        lambda: any(r in log.read_text(errors="replace") for r in refused), 30, "refusal logged"
    )
    # The worker is still alive and still works after the refusal.
    runtime = Runtime(Settings(redis_url=redis_server.url, models=MODELS))  # type: ignore[arg-type]
    x, y = batches(1, 10, seed=2)[0]
    create_app(runtime.settings).send_task(
        TASK_INGEST, args=[encode_batch("m", x, y, batch_id="after")]
    )
    wait_for(lambda: runtime.store.pending_count("m") == 1, 60, "good batch after the pickle")
    assert not marker.exists(), "the pickled payload was loaded"
    assert worker.poll() is None
    assert runtime.store.counters("m")["batches_ingested"] == 1
    assert redis_server.client().llen("ingest") == 0  # refused, not requeued forever


# ------------------------------------------------------------------ secrets out of logs


def test_secrets_never_in_worker_logs_or_metrics(
    auth_redis: RedisServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {"COLLAPSE_REDIS_PASSWORD": REDIS_PASSWORD, "COLLAPSE_API_TOKEN": API_TOKEN}
    good_log, bad_log = tmp_path / "worker.log", tmp_path / "worker-wrong.log"
    processes.append(
        start_worker(service_env(auth_redis.url, json.dumps(MODELS), **secrets), good_log)
    )
    wrong = {**secrets, "COLLAPSE_REDIS_PASSWORD": WRONG_PASSWORD}
    processes.append(
        start_worker(service_env(auth_redis.url, json.dumps(MODELS), **wrong), bad_log)
    )
    wait_for(lambda: worker_ready(good_log), 60, "celery worker")

    settings = _settings(auth_redis.url, REDIS_PASSWORD, api_token=SecretStr(API_TOKEN))
    client = MonitorClient(settings)
    x, y = batches(1, 20, seed=3)[0]
    client.submit_features("m", x, y, batch_id="ok")
    client.submit_features("ghost", x, y, batch_id="refused")  # a rejection is logged too
    runtime = Runtime(settings)
    wait_for(lambda: runtime.store.pending_count("m") == 1, 60, "batch ingested")
    wait_for(lambda: "rejected batch" in good_log.read_text(errors="replace"), 30, "rejection")
    compact_model(runtime.store, "m")

    with TestClient(create_exporter_app(settings)) as http:
        page = http.get("/metrics").text
    assert "collapse_store_up 1.0" in page
    _assert_no_secret(page, "/metrics")
    wrong_settings = _settings(auth_redis.url, WRONG_PASSWORD, api_token=SecretStr(API_TOKEN))
    with TestClient(create_exporter_app(wrong_settings)) as http:
        page = http.get("/metrics").text
        ready = http.get("/readyz")
    assert "collapse_store_up 0.0" in page
    assert ready.status_code == 503
    _assert_no_secret(page + ready.text, "/metrics or /readyz with a wrong password")
    for settings_ in (settings, wrong_settings):
        _assert_no_secret(repr(settings_) + str(settings_), "Settings repr")

    refusal = "Cannot connect to redis://:**@127.0.0.1"
    wait_for(lambda: refusal in bad_log.read_text(errors="replace"), 30, "wrong password logged")
    assert "invalid username-password pair" in bad_log.read_text(errors="replace")
    for proc in processes:
        stop_process(proc)
    good_text = good_log.read_text(errors="replace")
    bad_text = bad_log.read_text(errors="replace")
    assert f"redis://:**@127.0.0.1:{auth_redis.port}/0" in good_text  # the banner masks it
    _assert_no_secret(good_text, "worker log")
    _assert_no_secret(bad_text, "wrong-password worker log")
    _assert_no_secret(caplog.text, "in-process log records")


# --------------------------------------------------------------------------- Redis AUTH


def test_redis_auth_right_password_works(auth_redis: RedisServer) -> None:
    _ingest_and_compact(Runtime(_settings(auth_redis.url, REDIS_PASSWORD)), "auth-ok")


@pytest.mark.parametrize("password", [WRONG_PASSWORD, None], ids=["wrong", "missing"])
def test_redis_auth_wrong_or_missing_password_fails_fast(
    auth_redis: RedisServer, password: str | None
) -> None:
    runtime = Runtime(_settings(auth_redis.url, password))
    x, y = batches(1, 10, seed=1)[0]
    started = time.monotonic()
    with pytest.raises(redis.AuthenticationError) as failed:
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id="denied"))
    # AuthenticationError is a ConnectionError; redis_client's retry policy must not retry it
    # (it did, and a missing password took 45 s to surface).
    assert time.monotonic() - started < 5, "an AUTH failure must not look like a hang"
    assert "password" in str(failed.value).lower() or "auth" in str(failed.value).lower()
    _assert_no_secret(str(failed.value), "the error")
    assert auth_redis.client().dbsize() == 0


# ---------------------------------------------------------------------------------- TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    paths = {n: folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=collapse-test-ca", "-keyout", str(paths["ca.key"]),
             "-out", str(paths["ca.crt"]))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(paths["server.key"]), "-out", str(paths["server.csr"]))  # fmt: skip
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(paths["server.csr"]), "-CA", str(paths["ca.crt"]),
             "-CAkey", str(paths["ca.key"]), "-CAcreateserial", "-days", "1",
             "-extfile", str(ext), "-out", str(paths["server.crt"]))  # fmt: skip
    return paths


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    binary = shutil.which("redis-server")
    assert binary is not None
    certs = _certificates(tmp_path)
    port = free_port()
    log = open(tmp_path / "redis-tls.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
         "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "no",
         "--requirepass", REDIS_PASSWORD, "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            ssl=True,
            ssl_ca_certs=str(certs["ca.crt"]),
            password=REDIS_PASSWORD,
        )
        wait_for(lambda: bool(client.ping()), 15, "redis-server with TLS")
        client.close()
        yield port, certs["ca.crt"]
    finally:
        stop_process(proc)
        log.close()


def test_tls_with_the_ca_works_and_without_it_fails(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    runtime = Runtime(_settings(url, REDIS_PASSWORD, redis_tls_ca_file=str(ca)))
    _ingest_and_compact(runtime, "tls-ok")

    untrusted = Runtime(_settings(url, REDIS_PASSWORD))  # the system CAs do not know ours
    x, y = batches(1, 10, seed=1)[0]
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed|ssl"):
        untrusted.ingestor.ingest(encode_batch("m", x, y, batch_id="untrusted"))
    assert time.monotonic() - started < 30
    plain = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, password=REDIS_PASSWORD)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # a plaintext client gets nothing from the TLS port
    plain.close()
