"""The wire format of a feature batch: a versioned map of little-endian arrays.

Celery carries it as msgpack (arrays as raw bytes); HTTP and producers in other languages may
send the same map as JSON with base64 strings in place of bytes. Decoding checks everything
(version, sizes, dtypes, lengths) before numpy sees a byte, and never unpickles anything.

    {"v": 1, "model": "gpt2-prod", "batch_id": "req-42", "ts": 1764140000.0,
     "features": {"dtype": "float16", "shape": [N, d], "data": <bytes | base64>},
     "labels":   {"dtype": "int32",   "shape": [N],    "data": <bytes | base64>},
     "nc4": {"hits": 3, "total": 10}}            # optional, counted by the producer over the N rows

`ts` is checked against `TimeBounds` (the text payloads of the embed queue use the same
`check_timestamp`): a sample stamped ahead of the clock would sit in every window until its
time came, and one older than any window would be counted as ingested and then dropped.
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
from monitor.store.base import BucketPolicy
from monitor.store.keys import check_batch_id, check_model_name

SCHEMA_VERSION = 1
FEATURE_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
LABEL_DTYPES = {"int32": "<i4", "int64": "<i8"}


@dataclass(frozen=True)
class TimeBounds:
    """Which sample times can still be stored: from the oldest window's first bucket to now
    plus the allowed clock skew (`max_clock_skew_seconds`)."""

    max_skew: float
    policy: BucketPolicy

    def oldest(self, now: float) -> float:
        """The first bucket start any configured window holds at `now` (older data lands
        nowhere: compaction would add it to a bucket no window reads, then drop it)."""
        starts = [self.policy.window_since(seconds, now) for _, seconds in self.policy.windows]
        return min(starts, default=self.policy.start("coarse", now - self.policy.coarse_retention))


def check_timestamp(value: object, bounds: TimeBounds | None, now: float) -> float:
    """`value` as seconds, refused unless finite and, with `bounds`, within them.

    Not a number / NaN / Inf: `malformed_payload` (as the HTTP schema says); ahead of `now` by
    more than the skew: `future_timestamp`; older than every window: `stale_timestamp`.
    """
    if not isinstance(value, int | float) or isinstance(value, bool) or not _finite(value):
        raise InvalidInput("malformed_payload", "'ts' must be a finite number of seconds")
    ts = float(value)
    if bounds is None:
        return ts
    if ts > now + bounds.max_skew:
        raise InvalidInput(
            "future_timestamp",
            f"'ts' is {ts - now:.0f} s ahead of the clock; at most {bounds.max_skew:g} s "
            "(max_clock_skew_seconds) is accepted",
        )
    oldest = bounds.oldest(now)
    if ts < oldest:
        raise InvalidInput(
            "stale_timestamp",
            f"'ts' is {now - ts:.0f} s old; no window holds samples older than "
            f"{now - oldest:.0f} s",
        )
    return ts


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
    """The payload map; `binary=False` gives base64 strings for JSON transports.

    Conversions never change a value: other numeric features become float64 (the decoder then
    judges their range, as for any float64); labels keep int64, else become int32 when every
    one fits, else int64; a label no wire type holds is refused here rather than wrapped.
    """
    x = np.ascontiguousarray(features)
    if x.dtype not in (np.float16, np.float32, np.float64):
        if x.dtype.kind not in "biuf":
            raise InvalidInput("wrong_dtype", f"features must be numbers, got {x.dtype}")
        x = x.astype(np.float64)
    y = _wire_labels(np.ascontiguousarray(labels))
    payload: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "model": model,
        "batch_id": batch_id or uuid.uuid4().hex,
        "ts": float(ts if ts is not None else time.time()),
        "features": _array_map(x, binary),
        "labels": _array_map(y, binary),
    }
    if nc4 is not None:
        payload["nc4"] = {"hits": int(nc4[0]), "total": int(nc4[1])}
    return payload


def _wire_labels(y: np.ndarray) -> np.ndarray:
    """Labels as int64 if given so, else int32 when every one fits (half the bytes), else int64;
    refusing what a cast would silently change."""
    if y.dtype.kind not in "iu":
        raise InvalidInput("wrong_dtype", f"labels must be integers, got {y.dtype}")
    if y.dtype == np.int64:
        return y
    if y.size == 0:
        return y.astype(np.int32)
    lo, hi = int(y.min()), int(y.max())
    for wire in (np.int32, np.int64):
        info = np.iinfo(wire)
        if info.min <= lo and hi <= info.max:
            return y.astype(wire)
    raise InvalidInput("label_out_of_range", f"label {hi} does not fit a 64-bit integer")


def _array_map(array: np.ndarray, binary: bool) -> dict[str, Any]:
    """dtype, shape and the little-endian bytes: a view of `array` where it already is such
    (an array the API just decoded goes out as it came, not copied twice more)."""
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    raw = wire.data.cast("B") if wire.size else b""
    return {
        "dtype": wire.dtype.name,
        "shape": list(wire.shape),
        "data": raw if binary else base64.b64encode(raw).decode("ascii"),
    }


def decode_batch(
    payload: object,
    *,
    max_samples: int,
    max_bytes: int,
    times: TimeBounds | None = None,
    now: float | None = None,
) -> FeatureBatch:
    """Validate and decode a payload map; raises `InvalidInput` naming the problem.

    `times` bounds `ts` (see `TimeBounds`); without it only finiteness is checked, and the
    ingestor that stores the batch checks the bounds.
    """
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
    now = time.time() if now is None else now
    ts = check_timestamp(payload.get("ts", now), times, now)
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
    hits, total = _nc4(payload.get("nc4"), n)
    return FeatureBatch(model, batch_id, ts, features, labels, hits, total)


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


def _nc4(spec: object, rows: int) -> tuple[int, int]:
    """NC4 counts are over the batch's own rows, so `total <= rows` bounds them (a total of
    2**64 once overflowed msgpack and int64 fields after validation)."""
    if spec is None:
        return 0, 0
    if not isinstance(spec, dict):
        raise InvalidInput("malformed_payload", "'nc4' must be a map of hits and total")
    hits, total = spec.get("hits"), spec.get("total")
    if (
        not isinstance(hits, int)
        or not isinstance(total, int)
        or isinstance(hits, bool)
        or isinstance(total, bool)
        or not 0 <= hits <= total <= rows
    ):
        raise InvalidInput(
            "malformed_payload",
            f"'nc4' needs integers 0 <= hits <= total <= {rows} (the batch's rows)",
        )
    return hits, total


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def claimed_rows(payload: object) -> int:
    """Rows a refused payload really carried, for the rejection counter: its labels' declared
    length, but never more than their bytes can hold (a declared shape of 2**63 once added
    9e18 to a counter, which then overflowed), and at least 1 so a refusal is visible."""
    labels = payload.get("labels") if isinstance(payload, dict) else None
    if not isinstance(labels, dict):
        return 1
    shape, data = labels.get("shape"), labels.get("data")
    if isinstance(data, str):
        size = len(data) * 3 // 4  # base64
    elif isinstance(data, bytes | bytearray | memoryview):
        size = len(data)
    else:
        return 1
    # An unknown dtype is read as int32, the smallest label type: the most rows bytes can hold.
    held = size // np.dtype(LABEL_DTYPES.get(str(labels.get("dtype")), "<i4")).itemsize
    declared = shape[0] if isinstance(shape, list) and shape and _integer(shape[0]) else held
    return max(1, min(int(declared), held))
