"""The HTTP ingest API: good batches land as partials, every bad input is refused and counted.

Embedded mode (in-memory store, in-process ingestion) for the data path; a non-embedded app
whose broker is an unreachable loopback port for auth, 503s and readiness. No network, no
Redis server: each test runs in well under a second except the deliberate timeouts (1 s).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import typer
from cli_main import group_app
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from typer.testing import CliRunner

from monitor.api import ApiConfigError, create_api
from monitor.api.server import is_loopback, serve
from monitor.cli.api import register
from monitor.config import Settings
from monitor.pipeline.payload import decode_batch
from monitor.pipeline.queues import TASK_EMBED, TASK_INGEST
from monitor.pipeline.runtime import Runtime, set_runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats
from monitor.store.memory import MemoryStore

URL = "/v1/models/m/samples"
TOKEN = "s3cret-api-token-0123456789abcdef"
UNREACHABLE = "redis://127.0.0.1:1/0"
MODELS: list[dict[str, Any]] = [
    {"name": "m", "vocab_size": 50, "dim": 8},
    {"name": "t", "checkpoint": "/nonexistent/tiny", "vocab_size": 50, "dim": 8},
]
LIMIT = 16384
RNG = np.random.default_rng(0)
JSON = {"content-type": "application/json"}


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": None,
        "models": MODELS,
        "max_payload_bytes": LIMIT,
        "max_batch_samples": 64,
        "api_client_rate": 0,  # the rate bound has its own tests; the fuzzers send many
        "api_max_text_tokens": 4096,  # under the body limit, so the bound itself is reached
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = Runtime(make_settings())
    set_runtime(rt)  # eager tasks and the API share one store
    yield rt
    set_runtime(None)


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return TestClient(create_api(runtime.settings, runtime))


def arrays(n: int = 6, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return RNG.standard_normal((n, dim)).astype(np.float32), RNG.integers(0, 50, n).astype(np.int32)


def array_map(a: np.ndarray, *, binary: bool = False, dtype: str | None = None) -> dict[str, Any]:
    raw = a.tobytes()
    return {
        "dtype": dtype or a.dtype.name,
        "shape": list(a.shape),
        "data": raw if binary else base64.b64encode(raw).decode(),
    }


def body(x: np.ndarray, y: np.ndarray, *, binary: bool = False, **extra: Any) -> dict[str, Any]:
    return {"features": array_map(x, binary=binary), "labels": array_map(y, binary=binary), **extra}


def error_of(response: Any) -> str:
    document = response.json()
    assert set(document) == {"error"}
    assert set(document["error"]) == {"reason", "message"}
    assert document["error"]["message"]
    return str(document["error"]["reason"])


def stored_stats(runtime: Runtime) -> CollapseStats:
    compact_model(runtime.store, "m")
    stats = window_stats(runtime.store, "m", "1h", 3600).stats
    assert stats is not None
    return stats


def assert_same_stats(a: CollapseStats, b: CollapseStats) -> None:
    ca, cb = a.classes(), b.classes()
    assert a.sample_count == b.sample_count
    assert ca.class_ids.tolist() == cb.class_ids.tolist()
    assert ca.counts.tolist() == cb.counts.tolist()
    np.testing.assert_allclose(ca.sums.numpy(), cb.sums.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ca.sq_norms.numpy(), cb.sq_norms.numpy(), rtol=1e-12)


# ------------------------------------------------------------------------ accepted
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_good_batch_lands_as_one_partial_with_exact_stats(
    client: TestClient, runtime: Runtime, encoding: str
) -> None:
    x, y = arrays()
    if encoding == "json":
        response = client.post(URL, json=body(x, y, batch_id="b-1"))
    else:
        packed = msgpack.packb(body(x, y, binary=True, batch_id="b-1"))
        response = client.post(URL, content=packed, headers={"content-type": "application/msgpack"})
    assert response.status_code == 202, response.text
    assert response.json() == {"batch_id": "b-1", "samples": 6, "queued": True}
    assert response.headers["x-batch-id"] == "b-1"
    assert runtime.store.pending_count("m") == 1
    expected = CollapseStats(50, 8)
    expected.update(x, y)
    assert_same_stats(stored_stats(runtime), expected)


def test_float16_features_and_nc4_counts_pass_through(client: TestClient, runtime: Runtime) -> None:
    x, y = arrays()
    document = body(x.astype(np.float16), y.astype(np.int64), nc4={"hits": 2, "total": 5})
    response = client.post(URL, json=document)
    assert response.status_code == 202, response.text
    stats = stored_stats(runtime)
    assert (stats.nc4_hits, stats.nc4_total) == (2, 5)
    expected = CollapseStats(50, 8)
    expected.update(x.astype(np.float16), y)
    assert_same_stats(stats, expected)


def test_repeated_batch_id_is_counted_once(client: TestClient, runtime: Runtime) -> None:
    x, y = arrays()
    for _ in range(2):
        assert client.post(URL, json=body(x, y, batch_id="same")).status_code == 202
    assert runtime.store.pending_count("m") == 1
    assert runtime.store.counters("m")["batches_duplicate"] == 1


def test_generated_batch_ids_differ(client: TestClient) -> None:
    x, y = arrays()
    responses = [client.post(URL, json=body(x, y)) for _ in range(2)]
    ids = {r.json()["batch_id"] for r in responses}
    assert len(ids) == 2
    assert {r.headers["x-batch-id"] for r in responses} == ids


# ------------------------------------------------------------------------ refused
def _nan() -> dict[str, Any]:
    x, y = arrays()
    x[2, 3] = np.nan
    return body(x, y)


def _with(**changes: Any) -> dict[str, Any]:
    x, y = arrays()
    document = body(x, y)
    for key, value in changes.items():
        document[key] = {**document[key], **value} if isinstance(value, dict) else value
    return document


_X, _Y = arrays()
BAD_JSON: list[tuple[str, Any, int, str, int]] = [
    # name, body, status, reason, samples counted
    ("nan", _nan(), 400, "non_finite", 6),
    ("wrong_dim", body(*arrays(dim=7)), 400, "wrong_dimension", 6),
    ("label_high", body(_X, np.full(6, 50, np.int32)), 400, "label_out_of_range", 6),
    ("label_negative", body(_X, np.full(6, -1, np.int32)), 400, "label_out_of_range", 6),
    ("rows_vs_labels", body(_X, _Y[:5]), 400, "length_mismatch", 5),
    ("bytes_vs_shape", _with(features={"shape": [5, 8]}), 400, "length_mismatch", 6),
    ("huge_shape", _with(features={"shape": [2**32, 2**32]}), 400, "length_mismatch", 6),
    ("overflow_shape", _with(features={"shape": [2**70, 1]}), 400, "length_mismatch", 6),
    ("negative_shape", _with(features={"shape": [-6, -8]}), 400, "wrong_shape", 6),
    ("empty", body(np.zeros((0, 8), np.float32), np.zeros(0, np.int32)), 400, "empty_batch", 1),
    ("int_features", _with(features={"dtype": "int32"}), 400, "wrong_dtype", 6),
    ("float_labels", _with(labels={"dtype": "float32"}), 400, "wrong_dtype", 6),
    ("bad_base64", _with(features={"data": "***"}), 400, "malformed_payload", 6),
    ("not_a_map", [1, 2], 400, "malformed_payload", 1),
    ("two_kinds", _with(texts=["a"]), 400, "malformed_payload", 6),
    ("no_kind", {"batch_id": "x"}, 400, "malformed_payload", 1),
    ("infinite_ts", _with(ts=math.inf), 400, "malformed_payload", 6),
    ("bad_batch_id", _with(batch_id="a b"), 400, "invalid_batch_id", 6),
    ("other_model", _with(model="t"), 400, "model_mismatch", 1),
    ("too_many", body(*arrays(n=65)), 413, "oversized_batch", 64),
    ("texts_features_only", {"texts": ["hello"]}, 400, "no_checkpoint", 1),
    ("empty_texts", {"texts": []}, 400, "empty_batch", 1),
    ("lone_surrogate", {"texts": ["ok", "\ud800"]}, 400, "invalid_text", 2),
    ("surrogate_batch_id", _with(batch_id="\udfff"), 400, "invalid_batch_id", 6),
    ("too_many_texts", {"texts": ["a"] * 257}, 413, "too_many_texts", 64),
    ("too_many_text_bytes", {"texts": ["\u00e9" * 2049]}, 413, "too_many_tokens", 1),
    ("too_many_token_ids", {"token_ids": [[1] * 2100] * 2}, 413, "too_many_tokens", 2),
]


@pytest.mark.parametrize(
    ("document", "status", "reason", "samples"),
    [case[1:] for case in BAD_JSON],
    ids=[case[0] for case in BAD_JSON],
)
def test_bad_json_is_refused_counted_and_changes_nothing(
    client: TestClient, runtime: Runtime, document: Any, status: int, reason: str, samples: int
) -> None:
    response = client.post(URL, content=json.dumps(document), headers=JSON)
    assert response.status_code == status, response.text
    assert error_of(response) == reason
    assert runtime.store.pending_count("m") == 0
    counters = runtime.store.counters("m")
    assert counters[f"rejected:{reason}"] == samples  # counted once, not by API and ingestor
    assert "samples_ingested" not in counters


RAW: list[tuple[str, bytes, str, int, str]] = [
    ("json", b'{"features": ', "application/json", 400, "malformed_json"),
    ("json_deep", b"[" * 5_000 + b"]" * 5_000, "application/json", 400, "malformed_json"),
    ("json_not_utf8", b'{"texts": ["\xff"]}', "application/json", 400, "malformed_json"),
    ("msgpack", b"\xc1\x00", "application/msgpack", 400, "malformed_msgpack"),
    ("msgpack_cut", msgpack.packb({"features": {"data": b"x" * 40}})[:20], "application/msgpack",
     400, "malformed_msgpack"),
    ("msgpack_int_keys", msgpack.packb({1: 2}), "application/msgpack", 400, "malformed_msgpack"),
    ("form", b"a=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("no_type", b"{}", "", 415, "unsupported_media_type"),
    ("too_big", b" " * (LIMIT + 1), "application/json", 413, "oversized_payload"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "ctype", "status", "reason"),
    [case[1:] for case in RAW],
    ids=[case[0] for case in RAW],
)
def test_bad_bytes_are_refused_and_counted(
    client: TestClient, runtime: Runtime, content: bytes, ctype: str, status: int, reason: str
) -> None:
    response = client.post(URL, content=content, headers={"content-type": ctype})
    assert response.status_code == status, response.text
    assert error_of(response) == reason
    assert runtime.store.pending_count("m") == 0
    assert runtime.store.counters("m")[f"rejected:{reason}"] == 1


def test_streamed_body_is_capped_without_content_length(
    client: TestClient, runtime: Runtime
) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check
        for _ in range(64):
            yield b" " * 1024

    response = client.post(URL, content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert error_of(response) == "oversized_payload"
    assert runtime.store.counters("m")["rejected:oversized_payload"] == 1


def test_unknown_model_is_404_and_counted_without_a_model_key(
    client: TestClient, runtime: Runtime
) -> None:
    x, y = arrays()
    response = client.post("/v1/models/nope/samples", json=body(x, y))
    assert response.status_code == 404
    assert error_of(response) == "unknown_model"
    assert runtime.store.counters("_unknown")["rejected:unknown_model"] == 1
    assert "nope" not in runtime.store.models()


def test_framework_errors_use_the_error_body(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing")) == "not_found"
    response = client.get(URL)
    assert response.status_code == 405
    assert error_of(response) == "method_not_allowed"


# ---------------------------------------------------------------------- queue mode
@pytest.fixture
def remote() -> tuple[FastAPI, Runtime]:
    """Not embedded: broker at an unreachable port, but the store an in-memory one."""
    settings = make_settings(redis_url=UNREACHABLE, api_token=TOKEN)
    rt = Runtime(settings)
    rt.__dict__["store"] = MemoryStore()  # cached_property: inject before first use
    return create_api(settings, rt, io_timeout=1.0), rt


AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not_bearer"],
)
def test_missing_or_wrong_token_is_401(
    remote: tuple[FastAPI, Runtime], headers: dict[str, str]
) -> None:
    api, rt = remote
    x, y = arrays()
    response = TestClient(api).post(URL, json=body(x, y), headers=headers)
    assert response.status_code == 401
    assert error_of(response) == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    # Counted, but under no model: a client without the token cannot move a model's series.
    assert rt.store.counters("_unknown")["rejected:unauthorized"] == 1
    assert rt.store.counters("m") == {}


def test_unreachable_broker_answers_503_quickly(remote: tuple[FastAPI, Runtime]) -> None:
    api, rt = remote
    x, y = arrays()
    started = time.monotonic()
    response = TestClient(api).post(URL, json=body(x, y), headers=AUTH)
    assert time.monotonic() - started < 5.0
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    document = response.json()
    assert document["error"]["reason"] == "broker_unavailable"
    # The id the API fixed before sending: the send may still land, the retry must reuse it.
    assert document["batch_id"] == response.headers["x-batch-id"]
    assert len(document["batch_id"]) == 32
    assert rt.store.counters("m")["rejected:broker_unavailable"] == 1
    given = TestClient(api).post(URL, json=body(x, y, batch_id="mine-1"), headers=AUTH)
    assert (given.status_code, given.json()["batch_id"]) == (503, "mine-1")


def test_queue_mode_enqueues_binary_payloads(remote: tuple[FastAPI, Runtime]) -> None:
    api, rt = remote
    sent: list[tuple[str, dict[str, Any]]] = []
    api.state.ingress.celery.send_task = lambda name, args, **_: sent.append((name, args[0]))
    client = TestClient(api)
    x, y = arrays()
    ts = round(time.time()) - 10.0  # the API checks times as the worker does: a recent one
    ok = client.post(URL, json=body(x, y, batch_id="q1", ts=ts), headers=AUTH)
    assert ok.status_code == 202
    ids = client.post("/v1/models/t/samples", json={"token_ids": [[1, 2, 3]]}, headers=AUTH)
    assert ids.status_code == 202
    assert ids.json()["samples"] == 1
    high = client.post("/v1/models/t/samples", json={"token_ids": [[1, 50]]}, headers=AUTH)
    assert high.status_code == 400
    assert error_of(high) == "token_out_of_range"
    (task, payload), (embed_task, embed) = sent
    assert task == TASK_INGEST
    # Binary, not base64 (msgpack packs a memoryview as bin, as it packs bytes).
    assert isinstance(payload["features"]["data"], bytes | memoryview)
    assert msgpack.unpackb(msgpack.packb(payload))["features"]["data"] == x.tobytes()
    batch = decode_batch(payload, max_samples=64, max_bytes=LIMIT)
    assert (batch.batch_id, batch.ts) == ("q1", ts)
    np.testing.assert_array_equal(batch.features, x)
    np.testing.assert_array_equal(batch.labels, y)
    assert embed_task == TASK_EMBED
    assert embed["token_ids"] == [[1, 2, 3]]
    assert rt.store.pending_count("m") == 0  # the worker, not the API, writes partials


def test_readyz_with_unreachable_store_is_503_quickly() -> None:
    settings = make_settings(redis_url=UNREACHABLE, api_token=TOKEN)
    client = TestClient(create_api(settings, Runtime(settings), io_timeout=1.0))
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 5.0
    assert response.status_code == 503
    assert error_of(response) == "store_unavailable"
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ok_in_embedded_mode(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"ready": True}


def test_refuses_to_start_open_outside_embedded_mode() -> None:
    with pytest.raises(ApiConfigError, match="COLLAPSE_API_TOKEN"):
        create_api(make_settings(redis_url=UNREACHABLE))
    with pytest.raises(ApiConfigError, match="empty"):
        create_api(make_settings(api_token="  "))
    with pytest.raises(ApiConfigError, match=r"127\.0\.0\.1"):
        serve(make_settings(), host="0.0.0.0")
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")


def test_token_is_enforced_in_embedded_mode_when_set(runtime: Runtime) -> None:
    client = TestClient(create_api(make_settings(api_token=TOKEN), runtime))
    x, y = arrays()
    assert client.post(URL, json=body(x, y)).status_code == 401
    assert client.post(URL, json=body(x, y), headers=AUTH).status_code == 202


def test_token_never_logged_or_echoed(
    remote: tuple[FastAPI, Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    api, _ = remote
    caplog.set_level(logging.DEBUG)
    x, y = arrays()
    wrong = "Bearer wrong-token-that-must-not-be-logged"
    with TestClient(api) as client:  # runs the lifespan (first readiness ping) too
        responses = [
            client.post(URL, json=body(x, y), headers=AUTH),
            client.post(URL, json=body(x, y), headers={"authorization": wrong}),
            client.post(URL, content=b"{", headers={**AUTH, "content-type": "application/json"}),
            client.get("/readyz"),
            client.get("/openapi.json"),
        ]
    seen = caplog.text + "".join(r.text + str(dict(r.headers)) for r in responses)
    assert TOKEN not in seen
    assert "must-not-be-logged" not in seen


# ------------------------------------------------------------------------ document
def test_openapi_documents_the_endpoint_and_its_schemas(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    post = document["paths"]["/v1/models/{model}/samples"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/msgpack"}
    assert {"202", "400", "401", "404", "413", "415", "503"} <= set(post["responses"])
    schemas = document["components"]["schemas"]
    for name in ("FeatureSamples", "TextSamples", "TokenSamples", "Accepted", "ErrorBody"):
        assert name in schemas
    assert "HTTPBearer" in document["components"]["securitySchemes"]
    assert "422" not in json.dumps(document["paths"])
    assert {"/healthz", "/readyz"} <= set(document["paths"])


# ------------------------------------------------------------------------ property
FUZZ = hsettings(  # bounded: ~0.5 s per test
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KEYS = st.sampled_from(
    ["features", "labels", "texts", "token_ids", "batch_id", "ts", "nc4", "v", "model",
     "dtype", "shape", "data", "hits", "total"]
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(document=JSON_VALUES)
def test_random_json_bodies_never_give_5xx(client: TestClient, document: Any) -> None:
    response = client.post(URL, content=json.dumps(document), headers=JSON)
    assert response.status_code < 500
    if response.status_code >= 400:
        error_of(response)


@FUZZ
@given(content=st.binary(max_size=256))
def test_random_msgpack_bodies_never_give_5xx(client: TestClient, content: bytes) -> None:
    headers = {"content-type": "application/msgpack"}
    assert client.post(URL, content=content, headers=headers).status_code < 500


DIMS = st.integers(-2, 10) | st.sampled_from([2**31, 2**32, 2**63, 2**70])
ARRAY_SPECS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float16", "float32", "float64", "int32", "int64", "int8", ""]),
        "shape": st.lists(DIMS, max_size=3),
        "data": st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode()) | st.text(),
    }
)


@FUZZ
@given(
    features=ARRAY_SPECS,
    labels=ARRAY_SPECS,
    nc4=st.none()
    | st.fixed_dictionaries({"hits": st.integers(-1, 3), "total": st.integers(-1, 3)}),
)
def test_random_feature_payloads_never_give_5xx(
    client: TestClient, runtime: Runtime, features: Any, labels: Any, nc4: Any
) -> None:
    document = {"features": features, "labels": labels, **({"nc4": nc4} if nc4 else {})}
    before = runtime.store.pending_count("m")
    response = client.post(URL, content=json.dumps(document), headers=JSON)
    assert response.status_code in (202, 400, 413), response.text
    if response.status_code != 202:
        error_of(response)
        assert runtime.store.pending_count("m") == before


# ------------------------------------------------------------------------ command
def _cli() -> typer.Typer:
    return group_app(register)


def test_cli_api_refuses_bad_setups_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    assert runner.invoke(_cli(), ["api", "--help"]).exit_code == 0
    monkeypatch.setenv("COLLAPSE_REDIS_URL", UNREACHABLE)
    monkeypatch.delenv("COLLAPSE_API_TOKEN", raising=False)
    result = runner.invoke(_cli(), ["api"])
    assert result.exit_code == 2
    assert "COLLAPSE_API_TOKEN" in result.output
    monkeypatch.setenv("COLLAPSE_MAX_PAYLOAD_BYTES", "lots")
    result = runner.invoke(_cli(), ["api"])
    assert result.exit_code == 2
    assert "max_payload_bytes" in result.output


# ------------------------------------------------------------- values, times and counts
# Issue 16: one validation of every value. Finite float64 beyond float32 once poisoned the
# random-feature sums, nc4.total = 2**64 answered 500, a declared shape of 2**63 added 9e18 to
# a counter (which then overflowed), and times were not bounded. Embedded mode runs the
# workers' own ingestor behind the API, so these are the answers of the whole path.
VALUES: list[tuple[str, Any, str]] = [
    ("beyond_float32", body(np.full((6, 8), 1e39), _Y), "value_out_of_range"),
    ("beyond_float32_negative", body(np.full((6, 8), -1e300), _Y), "value_out_of_range"),
    ("nc4_total_2_64", body(_X, _Y, nc4={"hits": 0, "total": 2**64}), "malformed_payload"),
    ("nc4_total_over_rows", body(_X, _Y, nc4={"hits": 0, "total": 7}), "malformed_payload"),
    ("ts_far_ahead", _with(ts=1e300), "future_timestamp"),
    ("ts_an_hour_ahead", _with(ts=time.time() + 3600), "future_timestamp"),
    ("ts_before_every_window", _with(ts=time.time() - 2 * 86400), "stale_timestamp"),
    ("ts_zero", _with(ts=0.0), "stale_timestamp"),
    ("declared_rows_2_63", _with(labels={"shape": [2**63 - 1]}), "length_mismatch"),
    ("declared_rows_unknown_key", {**_with(labels={"shape": [2**63 - 1]}), "x": 1},
     "malformed_payload"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("document", "reason"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES]
)
def test_values_times_and_counts_are_refused_with_the_real_rows(
    client: TestClient, runtime: Runtime, document: Any, reason: str
) -> None:
    for attempt in (1, 2):  # a counter that overflowed would refuse the second increment
        response = client.post(URL, content=json.dumps(document), headers=JSON)
        assert response.status_code == 400, response.text
        assert error_of(response) == reason
        assert runtime.store.counters("m") == {f"rejected:{reason}": 6 * attempt}
    assert runtime.store.pending_count("m") == 0
    assert runtime.store.meta("m") == {}  # no bandwidth proposed from a refused batch


def test_times_inside_the_bounds_are_accepted(client: TestClient, runtime: Runtime) -> None:
    now = time.time()
    for i, ts in enumerate((now + 200, now - 20 * 3600)):  # within skew; inside the 24h window
        response = client.post(URL, json=_with(ts=ts, batch_id=f"t-{i}"))
        assert response.status_code == 202, response.text
    assert runtime.store.pending_count("m") == 2


def test_claimed_samples_are_the_rows_the_bytes_hold() -> None:
    from monitor.api.schemas import claimed_samples

    labels = np.arange(4, dtype=np.int32)
    declared = {**array_map(labels), "shape": [2**63 - 1]}
    assert claimed_samples({"labels": declared}) == 4
    assert claimed_samples({"labels": {**array_map(labels, binary=True), "shape": [2**63]}}) == 4
    assert claimed_samples({"labels": {**array_map(labels), "shape": [3]}}) == 3
    assert claimed_samples({"labels": {**array_map(labels), "dtype": "int64"}}) == 2
    assert claimed_samples({"labels": {"shape": [10**9]}}) == 1  # no bytes: nothing to count
    assert claimed_samples({"labels": {**array_map(labels), "shape": [0]}}) == 1


def test_openapi_states_the_value_and_time_bounds(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    ts = schemas["FeatureSamples"]["properties"]["ts"]
    described = json.dumps(ts)
    assert "future_timestamp" in described
    assert "stale_timestamp" in described
    assert "at most the batch's rows" in json.dumps(schemas["Nc4Counts"])
