"""The wire format of a feature batch: a versioned map of little-endian arrays.

Celery carries it as msgpack (arrays as raw bytes); HTTP and producers in other languages may
send the same map as JSON with base64 strings in place of bytes. Decoding checks everything
(version, sizes, dtypes, lengths) before numpy sees a byte, and never unpickles anything.

    {"v": 1, "model": "gpt2-prod", "batch_id": "req-42", "ts": 1764140000.0,
     "features": {"dtype": "float16", "shape": [N, d], "data": <bytes | base64>},
     "labels":   {"dtype": "int32",   "shape": [N],    "data": <bytes | base64>},
     "nc4": {"hits": 3, "total": 10}}            # optional, counted by the producer
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput
from monitor.store.keys import check_batch_id, check_model_name

SCHEMA_VERSION = 1
FEATURE_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
LABEL_DTYPES = {"int32": "<i4", "int64": "<i8"}


@dataclass(frozen=True)
class FeatureBatch:
    model: str
    batch_id: str
    ts: float
    features: np.ndarray  # (N, d) float
    labels: np.ndarray  # (N,) int
    nc4_hits: int = 0
    nc4_total: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_batch(
    model: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_id: str | None = None,
    ts: float | None = None,
    nc4: tuple[int, int] | None = None,
    binary: bool = True,
) -> dict[str, Any]:
    """The payload map; `binary=False` gives base64 strings for JSON transports."""
    x = np.ascontiguousarray(features)
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float32)
    y = np.ascontiguousarray(labels).astype(np.int64 if labels.dtype == np.int64 else np.int32)
    payload: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "model": model,
        "batch_id": batch_id or uuid.uuid4().hex,
        "ts": float(ts if ts is not None else time.time()),
        "features": _array_map(x.astype(x.dtype.newbyteorder("<")), binary),
        "labels": _array_map(y.astype(y.dtype.newbyteorder("<")), binary),
    }
    if nc4 is not None:
        payload["nc4"] = {"hits": int(nc4[0]), "total": int(nc4[1])}
    return payload


def _array_map(array: np.ndarray, binary: bool) -> dict[str, Any]:
    raw = array.tobytes()
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": raw if binary else base64.b64encode(raw).decode("ascii"),
    }


def decode_batch(payload: object, *, max_samples: int, max_bytes: int) -> FeatureBatch:
    """Validate and decode a payload map; raises `InvalidInput` naming the problem."""
    if not isinstance(payload, dict):
        raise InvalidInput("malformed_payload", "payload must be a map")
    version = payload.get("v")
    if version != SCHEMA_VERSION:
        raise InvalidInput(
            "unsupported_version",
            f"payload schema version {version!r} is not supported (expected {SCHEMA_VERSION})",
        )
    model = payload.get("model")
    batch_id = payload.get("batch_id")
    if not isinstance(model, str) or not isinstance(batch_id, str):
        raise InvalidInput("malformed_payload", "payload needs string 'model' and 'batch_id'")
    check_model_name(model)
    check_batch_id(batch_id)
    ts = payload.get("ts", time.time())
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not _finite(ts):
        raise InvalidInput("malformed_payload", "'ts' must be a finite number of seconds")
    features = _array(payload.get("features"), "features", FEATURE_DTYPES, 2, max_bytes)
    labels = _array(payload.get("labels"), "labels", LABEL_DTYPES, 1, max_bytes)
    n = int(labels.shape[0])
    if features.shape[0] != n:
        raise InvalidInput("length_mismatch", f"{features.shape[0]} feature rows but {n} labels")
    if n == 0:
        raise InvalidInput("empty_batch", "empty batch: no samples")
    if n > max_samples:
        raise InvalidInput(
            "oversized_batch", f"batch of {n} samples exceeds the limit of {max_samples}"
        )
    hits, total = _nc4(payload.get("nc4"))
    return FeatureBatch(model, batch_id, float(ts), features, labels, hits, total)


def _array(
    spec: object, what: str, dtypes: dict[str, str], ndim: int, max_bytes: int
) -> np.ndarray:
    if not isinstance(spec, dict):
        raise InvalidInput("malformed_payload", f"'{what}' must be a map of dtype, shape, data")
    dtype, shape, data = spec.get("dtype"), spec.get("shape"), spec.get("data")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise InvalidInput("wrong_dtype", f"{what} dtype {dtype!r} is not one of {sorted(dtypes)}")
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise InvalidInput("wrong_shape", f"{what} shape must be {ndim} non-negative integers")
    if any(s > max_bytes for s in shape):  # numpy refuses absurd sizes even when one is 0
        raise InvalidInput("wrong_shape", f"{what} shape {shape} has a size over {max_bytes}")
    if isinstance(data, str):
        if len(data) > max_bytes * 4 // 3 + 4:
            raise InvalidInput("oversized_payload", f"{what} exceed {max_bytes} bytes")
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput("malformed_payload", f"{what} data is not valid base64") from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput("malformed_payload", f"{what} data must be bytes or base64")
    if len(data) > max_bytes:
        raise InvalidInput("oversized_payload", f"{what} exceed {max_bytes} bytes")
    np_dtype = np.dtype(dtypes[str(dtype)])
    # Python integers: a hostile shape cannot overflow into a small or negative size.
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            "length_mismatch", f"{what}: {len(data)} bytes do not match shape {shape} of {dtype}"
        )
    return np.frombuffer(bytes(data), dtype=np_dtype).reshape(shape)


def _finite(value: int | float) -> bool:
    """A finite float (a huge Python integer overflows instead of passing as inf)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _nc4(spec: object) -> tuple[int, int]:
    if spec is None:
        return 0, 0
    if not isinstance(spec, dict):
        raise InvalidInput("malformed_payload", "'nc4' must be a map of hits and total")
    hits, total = spec.get("hits"), spec.get("total")
    if not (isinstance(hits, int) and isinstance(total, int) and 0 <= hits <= total):
        raise InvalidInput("malformed_payload", "'nc4' needs integers 0 <= hits <= total")
    return hits, total
