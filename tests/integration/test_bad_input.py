"""The bad-input catalogue through the real ingest path (RedisStore on a real redis-server).

Each refusal: an `InvalidInput` with a clear message and the documented reason, the samples
counted as `rejected:<reason>` (under `_unknown` when the payload names no declared model), and
every stored blob (partials, pending, buckets, baselines, meta) byte-identical before and after.
The HTTP side of the catalogue is in tests/unit/test_api.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import RedisServer, service_env, start_worker, wait_for
from test_pipeline_redis import DIM, VOCAB, batches

from monitor.config import Settings
from monitor.errors import IncompatibleStats, InvalidInput
from monitor.pipeline.baselines import load_baseline, pin_stats
from monitor.pipeline.ingest import UNKNOWN_MODEL
from monitor.pipeline.payload import FEATURE_DTYPES, FeatureBatch, decode_batch, encode_batch
from monitor.pipeline.queues import TASK_INGEST
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model
from monitor.worker.app import create_app

MAX_SAMPLES = 64
MAX_BYTES = 4096
MODELS = [{"name": "m", "vocab_size": VOCAB, "dim": DIM, "second_moment": True}]

Payload = dict[str, Any]


def settings_for(url: str, models: list[dict[str, Any]] = MODELS) -> Settings:
    return Settings(
        redis_url=url,
        models=models,  # type: ignore[arg-type]
        max_batch_samples=MAX_SAMPLES,
        max_payload_bytes=MAX_BYTES,
    )


def stored_state(server: RedisServer) -> dict[bytes, bytes]:
    """DUMP of every key except the counter hashes (the one thing a refusal may change)."""
    client = server.client()
    state: dict[bytes, bytes] = {}
    for key in client.scan_iter(match="cm:*", count=1000):
        if not key.endswith(b":counters"):
            dumped = client.dump(key)
            assert isinstance(dumped, bytes)
            state[key] = dumped
    return state


def all_counters(runtime: Runtime) -> dict[str, dict[str, int]]:
    return {owner: runtime.store.counters(owner) for owner in ("m", UNKNOWN_MODEL)}


@pytest.fixture
def runtime(redis_server: RedisServer) -> Iterator[Runtime]:
    """A store holding a compacted bucket, a pending partial, a baseline and meta."""
    runtime = Runtime(settings_for(redis_server.url))
    data = batches(3, 40, seed=5)
    now = time.time()
    for i, (x, y) in enumerate(data[:2]):
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=f"good-{i}", ts=now))
    compact_model(runtime.store, "m")
    x, y = data[2]
    runtime.ingestor.ingest(encode_batch("m", x, y, batch_id="pending-0", ts=now))
    stats = runtime.registry.new_stats("m", runtime.store, torch.from_numpy(x))
    stats.update(x, y)
    pin_stats(runtime.store, runtime.registry, "m", "base", stats, source="test")
    assert runtime.store.pending_count("m") == 1
    return runtime


def _good(rows: int = 10, *, binary: bool = True) -> Payload:
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, DIM)).astype(np.float32)
    return encode_batch("m", x, np.arange(rows) % VOCAB, batch_id="bad-1", binary=binary)


def _with_features(x: np.ndarray, y: np.ndarray) -> Payload:
    return encode_batch("m", x, y, batch_id="bad-1")


def _nan() -> Payload:
    x = np.ones((10, DIM), np.float32)
    x[3, 2] = np.nan
    return _with_features(x, np.arange(10))


def _inf() -> Payload:
    x = np.ones((12, DIM), np.float32)
    x[0, 0] = np.inf
    x[7, 1] = -np.inf
    return _with_features(x, np.arange(12))


def _edit(edit: Callable[[Payload], None], rows: int = 10, binary: bool = True) -> Payload:
    payload = _good(rows, binary=binary)
    edit(payload)
    return payload


def _set(path: tuple[str, ...], value: object) -> Callable[[Payload], None]:
    def edit(payload: Payload) -> None:
        target = payload
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


def _drop(key: str) -> Callable[[Payload], None]:
    return lambda payload: payload.pop(key)


# (payload, reason, counter owner, samples counted, message fragment)
CATALOGUE: dict[str, tuple[Callable[[], object], str, str, int, str]] = {
    "nan_features": (_nan, "non_finite", "m", 10, "NaN or Inf in 1 row"),
    "inf_features": (_inf, "non_finite", "m", 12, "NaN or Inf in 2 row"),
    "wrong_dimension": (
        lambda: _with_features(np.ones((5, DIM + 1), np.float32), np.arange(5)),
        "wrong_dimension",
        "m",
        5,
        f"dimension {DIM + 1}, model 'm' has {DIM}",
    ),
    "wrong_feature_dtype": (
        lambda: _edit(_set(("features", "dtype"), "int32")),
        "wrong_dtype",
        "m",
        10,
        "features dtype 'int32' is not one of",
    ),
    "wrong_label_dtype": (
        lambda: _edit(_set(("labels", "dtype"), "float32")),
        "wrong_dtype",
        "m",
        10,
        "labels dtype 'float32' is not one of",
    ),
    "label_outside_vocabulary": (
        lambda: _with_features(np.ones((6, DIM), np.float32), np.array([0, 1, 2, 3, 4, VOCAB])),
        "label_out_of_range",
        "m",
        6,
        f"label {VOCAB} is outside the vocabulary [0, {VOCAB})",
    ),
    "negative_label": (
        lambda: _with_features(np.ones((4, DIM), np.float32), np.array([0, -1, 2, 3])),
        "label_out_of_range",
        "m",
        4,
        "label -1 is outside the vocabulary",
    ),
    "mismatched_lengths": (
        lambda: _with_features(np.ones((10, DIM), np.float32), np.arange(9)),
        "length_mismatch",
        "m",
        9,  # the labels' claim is what gets counted
        "10 feature rows but 9 labels",
    ),
    "data_shorter_than_shape": (
        lambda: _edit(_set(("features", "shape"), [11, DIM])),
        "length_mismatch",
        "m",
        10,
        "bytes do not match shape",
    ),
    "empty_batch": (
        lambda: _with_features(np.ones((0, DIM), np.float32), np.arange(0)),
        "empty_batch",
        "m",
        1,  # a refused batch counts at least one sample, so an empty one is visible
        "empty batch",
    ),
    "oversized_payload": (
        lambda: _with_features(np.ones((40, DIM), np.float64), np.arange(40)),  # 5,120 bytes
        "oversized_payload",
        "m",
        40,
        f"features exceed {MAX_BYTES} bytes",
    ),
    "oversized_base64_payload": (
        lambda: _edit(_set(("features", "data"), "A" * (MAX_BYTES * 2)), binary=False),
        "oversized_payload",
        "m",
        10,
        f"features exceed {MAX_BYTES} bytes",
    ),
    "oversized_batch": (
        lambda: _with_features(np.ones((100, DIM), np.float16), np.arange(100)),  # 3,200 bytes
        "oversized_batch",
        "m",
        100,  # the rows it really carried
        f"batch of 100 samples exceeds the limit of {MAX_SAMPLES}",
    ),
    "declared_rows_beyond_the_bytes": (
        lambda: _edit(_set(("labels", "shape"), [2**63 - 1])),
        "wrong_shape",
        "m",
        10,  # what its 80 label bytes hold, never the 9e18 it declared
        "has a size over",
    ),
    "float64_beyond_float32": (
        lambda: _with_features(np.full((7, DIM), 1e39), np.arange(7)),
        "value_out_of_range",
        "m",
        7,
        "exceed the float32 range (|value| <= 3.403e+38) in 7 row(s)",
    ),
    "float64_huge": (
        lambda: _with_features(np.where(np.eye(5, DIM) > 0, -1e300, 1.0), np.arange(5)),
        "value_out_of_range",
        "m",
        5,
        "in 5 row(s)",
    ),
    "ts_in_the_future": (
        lambda: _edit(_set(("ts",), time.time() + 3600)),
        "future_timestamp",
        "m",
        10,
        "at most 300 s (max_clock_skew_seconds) is accepted",
    ),
    "ts_1e300": (lambda: _edit(_set(("ts",), 1e300)), "future_timestamp", "m", 10, "ahead"),
    "ts_older_than_every_window": (
        lambda: _edit(_set(("ts",), time.time() - 2 * 86400)),
        "stale_timestamp",
        "m",
        10,
        "no window holds samples older than",
    ),
    "ts_zero": (lambda: _edit(_set(("ts",), 0)), "stale_timestamp", "m", 10, "s old"),
    "ts_nan": (
        lambda: _edit(_set(("ts",), float("nan"))),
        "malformed_payload",
        "m",
        10,
        "'ts' must be a finite number",
    ),
    "nc4_total_above_rows": (
        lambda: _edit(_set(("nc4",), {"hits": 0, "total": 11})),
        "malformed_payload",
        "m",
        10,
        "0 <= hits <= total <= 10 (the batch's rows)",
    ),
    "nc4_total_2_64": (
        lambda: _edit(_set(("nc4",), {"hits": 0, "total": 2**64})),
        "malformed_payload",
        "m",
        10,
        "0 <= hits <= total <= 10",
    ),
    "nc4_bool": (
        lambda: _edit(_set(("nc4",), {"hits": True, "total": 1})),
        "malformed_payload",
        "m",
        10,
        "'nc4' needs integers",
    ),
    "not_a_map": (lambda: [1, 2, 3], "malformed_payload", UNKNOWN_MODEL, 1, "must be a map"),
    "missing_features": (
        lambda: _edit(_drop("features")),
        "malformed_payload",
        "m",
        10,
        "'features' must be a map",
    ),
    "missing_batch_id": (
        lambda: _edit(_drop("batch_id")),
        "malformed_payload",
        "m",
        10,
        "string 'model' and 'batch_id'",
    ),
    "labels_wrong_type": (
        lambda: _edit(_set(("labels",), "0,1,2")),
        "malformed_payload",
        "m",
        1,
        "'labels' must be a map",
    ),
    "data_wrong_type": (
        lambda: _edit(_set(("features", "data"), 12345)),
        "malformed_payload",
        "m",
        10,
        "features data must be bytes or base64",
    ),
    "bad_base64": (
        lambda: _edit(_set(("features", "data"), "not base64 at all!"), binary=False),
        "malformed_payload",
        "m",
        10,
        "features data is not valid base64",
    ),
    "shape_wrong_type": (
        lambda: _edit(_set(("features", "shape"), "10x16")),
        "wrong_shape",
        "m",
        10,
        "features shape must be 2 non-negative integers",
    ),
    "absurd_shape": (
        lambda: _edit(_set(("features", "shape"), [0, 2**70])),
        "wrong_shape",
        "m",
        10,
        f"has a size over {MAX_BYTES}",
    ),
    "ts_not_a_number": (
        lambda: _edit(_set(("ts",), "yesterday")),
        "malformed_payload",
        "m",
        10,
        "'ts' must be a finite number",
    ),
    "ts_overflows": (
        lambda: _edit(_set(("ts",), 2**1100)),
        "malformed_payload",
        "m",
        10,
        "'ts' must be a finite number",
    ),
    "bad_nc4": (
        lambda: _edit(_set(("nc4",), {"hits": 5, "total": 2})),
        "malformed_payload",
        "m",
        10,
        "'nc4' needs integers 0 <= hits <= total <= 10",
    ),
    "unsupported_version": (
        lambda: _edit(_set(("v",), 2)),
        "unsupported_version",
        "m",
        10,
        "schema version 2 is not supported",
    ),
    "missing_version": (
        lambda: _edit(_drop("v")),
        "unsupported_version",
        "m",
        10,
        "schema version None is not supported",
    ),
    "unknown_model": (
        lambda: _edit(_set(("model",), "not-declared")),
        "unknown_model",
        UNKNOWN_MODEL,
        10,
        "model 'not-declared' is not declared",
    ),
    "invalid_model_name": (
        lambda: _edit(_set(("model",), "m}:x {evil")),
        "invalid_model_name",
        UNKNOWN_MODEL,
        10,
        "model names are 1-64 characters",
    ),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_is_refused_counted_and_changes_nothing(
    case: str, runtime: Runtime, redis_server: RedisServer
) -> None:
    make, reason, owner, samples, message = CATALOGUE[case]
    payload = make()
    before, counters = stored_state(redis_server), all_counters(runtime)
    with pytest.raises(InvalidInput, match=_escape(message)) as refused:
        runtime.ingestor.ingest(payload)
    assert refused.value.reason == reason
    assert stored_state(redis_server) == before
    expected = copy.deepcopy(counters)
    key = f"rejected:{reason}"
    expected[owner][key] = expected[owner].get(key, 0) + samples
    assert all_counters(runtime) == expected
    assert runtime.store.models() == ["m"]  # a refusal creates no model


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_refused_first_batch_does_not_fix_the_rff_bandwidth(redis_server: RedisServer) -> None:
    """On an empty store, a refused batch must not propose the model's kernel bandwidth."""
    runtime = Runtime(settings_for(redis_server.url))
    for payload in (_nan(), _with_features(np.ones((3, DIM), np.float32), np.array([0, 1, -1]))):
        with pytest.raises(InvalidInput):
            runtime.ingestor.ingest(payload)
    assert stored_state(redis_server) == {}
    x, y = batches(1, 30, seed=9)[0]
    runtime.ingestor.ingest(encode_batch("m", x, y, batch_id="first-good"))
    assert float(runtime.store.meta("m")["rff_bandwidth"]) > 0


def test_baseline_of_another_dimension_or_settings_is_refused(
    runtime: Runtime, redis_server: RedisServer
) -> None:
    before = stored_state(redis_server)
    wider = Runtime(settings_for(redis_server.url, [{**MODELS[0], "dim": DIM * 2}]))
    with pytest.raises(IncompatibleStats, match=f"pinned for dim={DIM}, but 'm' now has dim"):
        load_baseline(wider.store, wider.registry, "m", "base")
    bigger = Runtime(settings_for(redis_server.url, [{**MODELS[0], "vocab_size": VOCAB + 1}]))
    with pytest.raises(IncompatibleStats, match="pinned for vocab_size=300"):
        load_baseline(bigger.store, bigger.registry, "m", "base")
    no_second = Runtime(settings_for(redis_server.url, [{**MODELS[0], "second_moment": False}]))
    with pytest.raises(IncompatibleStats, match="other statistics settings"):
        load_baseline(no_second.store, no_second.registry, "m", "base")
    # Pinning statistics of another width for `m` is refused before anything is written.
    wide = torch.randn(2, DIM * 2, dtype=torch.float64)
    other = wider.registry.new_stats("m", wider.store, wide)
    other.update(wide, torch.tensor([0, 1]))
    with pytest.raises(IncompatibleStats, match=f"do not fit model 'm' \\({VOCAB} x {DIM}\\)"):
        pin_stats(runtime.store, runtime.registry, "m", "wide", other, source="test")
    assert stored_state(redis_server) == before
    stats, meta = load_baseline(runtime.store, runtime.registry, "m", "base")
    assert (stats.dim, meta["model"]) == (DIM, "m")


def test_baseline_of_another_model_is_refused(runtime: Runtime, redis_server: RedisServer) -> None:
    """A baseline blob copied under another model's keys keeps its stamp and is refused."""
    two = [*MODELS, {**MODELS[0], "name": "m2"}]
    both = Runtime(settings_for(redis_server.url, two))
    found = runtime.store.baseline("m", "base")
    assert found is not None
    with runtime.store.locked("m"):
        chunks = [dict(c) for c in runtime.store.scan_state("m", found.state)]
    both.store.pin_baseline("m2", "copied", chunks, found.meta, replace=False)
    with pytest.raises(IncompatibleStats, match="pinned for model='m', but 'm2' now has"):
        load_baseline(both.store, both.registry, "m2", "copied")


# ------------------------------------------------------------- through a real worker


def test_worker_counts_and_acknowledges_bad_tasks(
    redis_server: RedisServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = settings_for(redis_server.url)
    env = service_env(
        redis_server.url,
        json.dumps(MODELS),
        COLLAPSE_MAX_BATCH_SAMPLES=str(MAX_SAMPLES),
        COLLAPSE_MAX_PAYLOAD_BYTES=str(MAX_BYTES),
    )
    log = tmp_path / "worker.log"
    processes.append(start_worker(env, log))
    wait_for(lambda: "ready." in log.read_text(errors="replace"), 60, "celery worker")
    runtime = Runtime(settings)
    app = create_app(settings)
    bad: list[object] = [
        "not a map",
        _edit(_set(("model",), "ghost")),
        _edit(_set(("v",), 7)),
        _with_features(np.ones((100, DIM), np.float16), np.arange(100)),
        _edit(_set(("features", "data"), "%%%"), binary=False),  # JSON-style map over msgpack
    ]
    for payload in bad:
        app.send_task(TASK_INGEST, args=[payload])
    x, y = batches(1, 20, seed=4)[0]
    app.send_task(TASK_INGEST, args=[encode_batch("m", x, y, batch_id="after-bad")])
    wait_for(lambda: runtime.store.pending_count("m") == 1, 60, "good batch after the bad ones")
    broker = redis_server.client()
    wait_for(lambda: broker.hlen("unacked") == 0, 10, "every task acknowledged")
    assert broker.llen("ingest") == 0
    assert runtime.store.counters(UNKNOWN_MODEL) == {
        "rejected:malformed_payload": 1,
        "rejected:unknown_model": 10,
    }
    counters = runtime.store.counters("m")
    assert counters["rejected:unsupported_version"] == 10
    assert counters["rejected:oversized_batch"] == 100
    assert counters["rejected:malformed_payload"] == 10
    assert counters["samples_ingested"] == 20
    text = log.read_text(errors="replace")
    assert "rejected batch (unknown_model): model 'ghost' is not declared" in text
    assert "Traceback" not in text
    assert processes[0].poll() is None


# ------------------------------------------------------------------- fuzzing the decoder

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=64)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
KEYS = st.sampled_from(["v", "model", "batch_id", "ts", "features", "labels", "nc4"])
ARRAY_MAPS = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["float16", "float32", "float64", "int32", "int64", "<f4"])
        | VALUES,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | VALUES,
        "data": st.binary(max_size=256) | st.text(max_size=64) | VALUES,
    },
)
MAPS = st.dictionaries(KEYS | st.text(max_size=8), VALUES | ARRAY_MAPS, max_size=8)


def _check_decode(payload: object) -> None:
    try:
        batch = decode_batch(payload, max_samples=MAX_SAMPLES, max_bytes=MAX_BYTES)
    except InvalidInput as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.reason
        assert str(refused)
        return
    assert isinstance(payload, dict)
    assert isinstance(batch, FeatureBatch)
    assert batch.features.shape == tuple(payload["features"]["shape"])
    assert batch.labels.shape == tuple(payload["labels"]["shape"])
    assert batch.features.dtype == np.dtype(FEATURE_DTYPES[payload["features"]["dtype"]])
    assert batch.features.shape[0] == batch.labels.shape[0] == len(batch)
    assert 0 < len(batch) <= MAX_SAMPLES


FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ
@given(MAPS)
def test_fuzz_decode_random_maps(payload: dict[str, Any]) -> None:
    _check_decode(payload)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_decode_random_msgpack_bytes(raw: bytes) -> None:
    try:
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # not msgpack at all: the transport refuses it before the decoder
        return
    _check_decode(payload)


@FUZZ
@given(
    st.integers(1, 8),
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("v",),
                    ("model",),
                    ("batch_id",),
                    ("ts",),
                    ("nc4",),
                    ("features",),
                    ("labels",),
                    ("features", "dtype"),
                    ("features", "shape"),
                    ("features", "data"),
                    ("labels", "dtype"),
                    ("labels", "shape"),
                    ("labels", "data"),
                ]
            ),
            VALUES | st.lists(st.integers(-2, 2**66), max_size=3),
        ),
        max_size=3,
    ),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_fuzz_decode_mutated_valid_payloads(
    rows: int,
    binary: bool,
    edits: list[tuple[tuple[str, ...], object]],
    flips: list[tuple[int, int]],
) -> None:
    payload = _good(rows, binary=binary)
    for path, value in edits:
        target: Any = payload
        for part in path[:-1]:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[path[-1]] = value
    spec = payload.get("features")
    if flips and isinstance(spec, dict) and isinstance(spec.get("data"), bytes):
        raw = bytearray(spec["data"])
        for position, byte in flips:
            if raw:
                raw[position % len(raw)] = byte
        spec["data"] = bytes(raw)
    _check_decode(payload)
    try:  # the same map after the msgpack transport (which refuses ints over 64 bits)
        packed = msgpack.packb(payload)
    except (OverflowError, TypeError, ValueError):
        return
    _check_decode(msgpack.unpackb(packed, raw=False, strict_map_key=False))
