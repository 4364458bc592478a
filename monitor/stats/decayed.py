"""Exponentially decayed windows (`window_mode = "decayed"`): their stored format and their merge
(docs/architecture.md, "Decayed windows"; reading one is monitor/stats/decayed_read.py).

A decayed window of S seconds weighs the data of the fine bucket starting at b by
exp(-(t - b) / tau) at time t, tau = S / 2. It needs no buckets with class rows (nothing is ever
subtracted), so memory is that of the window itself. Every stored field carries its own anchor
time and holds its sums *as of* that time, so values never grow, a merge rescales only the fields
it touches, and a crash between two fields leaves each of them self-consistent:

- a class row: anchor a, W = sum w, V = sum w^2, Q = sum w ||h||^2, S = sum w h (32 + 8 d bytes);
- `g`: the same for the globals (W, V, unit, NC4 and RFF sums, `sum w^2 ||phi||^2`);
- `m:<i>`: an 8-byte anchor, then a block of `sum w h h^T`.

A read keeps the classes whose weight is at least `min_weight` and presents each with its Kish
effective size n = W^2 / V (rounded) and sums n S / W, n Q / W: class means and within-class
variances are exactly the weighted ones, and every n/(n-1) and s^2/n correction of the metrics
uses the effective size. Maintenance deletes the rows below `min_weight`, so a class that returns
after that starts afresh, without its old weight (less than `min_weight`). Numpy only at
import: compaction and `status` run without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from monitor.errors import IncompatibleStats
from monitor.stats.fields import (
    BLOCK_PREFIX,
    GLOBAL_FIELD,
    Globals,
    block_rows,
    is_row,
    metadata_of,
    row_dtype,
)
from monitor.stats.rff_config import RFFConfig

DECAYED_FORMAT = "collapse-stats-decayed"
DECAYED_VERSION = 1
_WEIGHTS = ("sample", "sample_sq", "unit", "nc4_hits", "nc4_total")


def time_constant(seconds: float) -> float:
    """tau of a decayed window of `seconds`: at steady traffic its effective sample count and
    the mean age of its data equal those of the exact window of `seconds`."""
    return float(seconds) / 2.0


def decayed_row_dtype(dim: int) -> np.dtype[np.void]:
    return np.dtype([("a", "<f8"), ("w", "<f8"), ("v", "<f8"), ("q", "<f8"), ("s", "<f8", (dim,))])


def is_decayed(g_blob: bytes) -> bool:
    """Whether a `g` field is that of a decayed state (else an ordinary one)."""
    try:
        return "decayed" in metadata_of(g_blob)
    except (ValueError, KeyError, TypeError):
        return False


def _factors(anchor: np.ndarray | float, at: float, tau: float) -> tuple[np.ndarray, ...]:
    """New anchor and the factors of old content and of new data (weight 1 at `at`)."""
    a = np.asarray(anchor, dtype=np.float64)
    new = np.maximum(a, at)
    return new, np.exp(-(new - a) / tau), np.exp(-(new - at) / tau)


@dataclass(frozen=True)
class DecayedGlobals:
    """The `g` field of a decayed state, all sums as of `anchor`."""

    num_classes: int
    dim: int
    second_moment: bool
    rff: RFFConfig | None
    tau: float
    anchor: float
    weights: dict[str, float]
    rff_sq: float  # sum w^2 ||phi(h)||^2
    unit_sum: np.ndarray
    rff_sum: np.ndarray | None

    def signature(self) -> tuple[int, int, bool, RFFConfig | None]:
        return (self.num_classes, self.dim, self.second_moment, self.rff)

    def non_row_fields(self) -> int:
        return 1 + (math.ceil(self.dim / block_rows(self.dim)) if self.second_moment else 0)

    def effective_samples(self) -> int:
        """Kish's effective sample count W^2 / V of all samples (what `status` shows)."""
        w, v = self.weights["sample"], self.weights["sample_sq"]
        return 0 if v <= 0 else round(w * w / v)

    def encode(self) -> bytes:
        header = {
            "format": DECAYED_FORMAT,
            "version": DECAYED_VERSION,
            "num_classes": self.num_classes,
            "dim": self.dim,
            "second_moment": self.second_moment,
            "rff": None if self.rff is None else self.rff.to_json(),
            "tau": self.tau,
            "anchor": self.anchor,
            "rff_sq": self.rff_sq,
            "weights": self.weights,
        }
        arrays = {"unit_sum": np.ascontiguousarray(self.unit_sum, dtype="<f8")}
        if self.rff_sum is not None:
            arrays["rff_sum"] = np.ascontiguousarray(self.rff_sum, dtype="<f8")
        meta = {"decayed": json.dumps(header, sort_keys=True)}
        return bytes(np_save(arrays, metadata=meta))

    @classmethod
    def decode(cls, blob: bytes) -> DecayedGlobals:
        try:
            header = json.loads(metadata_of(blob)["decayed"])
            if header.get("format") != DECAYED_FORMAT:
                raise IncompatibleStats("not a decayed-statistics globals field")
            if header.get("version") != DECAYED_VERSION:
                raise IncompatibleStats(
                    f"decayed statistics format {header.get('version')!r} is not supported"
                )
            arrays = np_load(bytes(blob))
            rff = None if header.get("rff") is None else RFFConfig.from_json(header["rff"])
            out = cls(
                int(header["num_classes"]),
                int(header["dim"]),
                bool(header["second_moment"]),
                rff,
                float(header["tau"]),
                float(header["anchor"]),
                {k: float(header["weights"][k]) for k in _WEIGHTS},
                float(header["rff_sq"]),
                arrays["unit_sum"].astype(np.float64),
                None if "rff_sum" not in arrays else arrays["rff_sum"].astype(np.float64),
            )
        except (KeyError, TypeError, ValueError, SafetensorError) as exc:
            if isinstance(exc, IncompatibleStats):
                raise
            raise IncompatibleStats(f"corrupt decayed statistics globals: {exc}") from exc
        values = [out.tau, out.anchor, out.rff_sq, *out.weights.values()]
        finite = all(math.isfinite(x) for x in values) and bool(np.isfinite(out.unit_sum).all())
        if not finite or out.tau <= 0 or min(out.weights.values()) < 0:
            raise IncompatibleStats("corrupt decayed statistics globals: values")
        if out.unit_sum.shape != (out.dim,) or (out.rff is None) != (out.rff_sum is None):
            raise IncompatibleStats("corrupt decayed statistics globals: shape")
        return out

    def merged(self, add: Globals, at: float) -> DecayedGlobals:
        """This state plus ordinary statistics `add` of data at time `at` (weight 1 then)."""
        if self.signature() != add.signature():
            raise IncompatibleStats(
                "cannot merge statistics of (num_classes, dim, second_moment, rff) "
                f"{add.signature()} into {self.signature()}"
            )
        anchor, f_old, f_new = (float(x) for x in _factors(self.anchor, at, self.tau))
        c = add.counters
        new = {
            "sample": c["sample_count"],
            "sample_sq": c["sample_count"],
            "unit": c["unit_count"],
            "nc4_hits": c["nc4_hits"],
            "nc4_total": c["nc4_total"],
        }
        weights = {}
        for key in _WEIGHTS:
            sq = key == "sample_sq"
            weights[key] = self.weights[key] * (f_old**2 if sq else f_old) + new[key] * (
                f_new**2 if sq else f_new
            )
        rff_sum = None
        if self.rff_sum is not None and add.rff_sum is not None:
            rff_sum = self.rff_sum * f_old + add.rff_sum * f_new
        return DecayedGlobals(
            *self.signature(),
            self.tau,
            anchor,
            weights,
            self.rff_sq * f_old**2 + add.rff_sq * f_new**2,
            self.unit_sum * f_old + add.unit_sum * f_new,
            rff_sum,
        )

    @classmethod
    def empty(cls, like: Globals, tau: float, at: float) -> DecayedGlobals:
        return cls(
            *like.signature(),
            tau,
            at,
            dict.fromkeys(_WEIGHTS, 0.0),
            0.0,
            np.zeros(like.dim),
            None if like.rff_sum is None else np.zeros_like(like.rff_sum),
        )

    def presented(self, samples: int) -> Globals:
        """Ordinary globals of the presented window of `samples` (effective) samples."""
        w, v = self.weights["sample"], self.weights["sample_sq"]
        scale = samples / w if w > 0 else 0.0
        unit = self.weights["unit"]
        unit_count = round(unit * scale)
        unit_sum = self.unit_sum * (unit_count / unit) if unit > 0 else np.zeros(self.dim)
        total = round(self.weights["nc4_total"] * scale)
        hits = min(round(self.weights["nc4_hits"] * scale), total)
        # rff scaled so the unbiased MMD of the presented sums equals the weighted estimate
        # (||sum w phi||^2 - sum w^2 ||phi||^2) / (W^2 - V).
        if samples >= 2 and w * w > v:
            a = math.sqrt(samples * (samples - 1) / (w * w - v))
        else:
            a = scale
        counters = {
            "sample_count": samples,
            "unit_count": unit_count,
            "nc4_hits": hits,
            "nc4_total": total,
        }
        rff_sum = None if self.rff_sum is None else self.rff_sum * a
        return Globals(*self.signature(), counters, self.rff_sq * a * a, unit_sum, rff_sum)


# ---------------------------------------------------------------------------- merge
def merge_fields(
    fields: Sequence[bytes],
    current: Sequence[bytes | None],
    delta: Sequence[bytes],
    at: float,
    tau: float,
) -> list[bytes]:
    """`current` (decayed fields, None where absent) plus ordinary `delta` fields of data at
    time `at`, each field rescaled to its own anchor (the module docstring)."""
    out: list[bytes] = [b""] * len(fields)
    rows = [i for i, f in enumerate(fields) if is_row(f)]
    for i, field in enumerate(fields):
        if field == GLOBAL_FIELD:
            add = Globals.decode(delta[i])
            blob = current[i]
            base = DecayedGlobals.empty(add, tau, at) if blob is None else _check_tau(blob, tau)
            out[i] = base.merged(add, at).encode()
        elif field.startswith(BLOCK_PREFIX):
            out[i] = _merge_block(current[i], delta[i], at, tau)
        elif not is_row(field):
            raise IncompatibleStats(f"unknown statistics field {field[:40]!r}")
    if rows:
        merged = _merge_rows([current[i] for i in rows], [delta[i] for i in rows], at, tau)
        for i, value in zip(rows, merged, strict=True):
            out[i] = value
    return out


def _check_tau(blob: bytes, tau: float) -> DecayedGlobals:
    g = DecayedGlobals.decode(blob)
    if not math.isclose(g.tau, tau, rel_tol=1e-12):
        raise IncompatibleStats(f"a decayed state of time constant {g.tau:g} s, not {tau:g} s")
    return g


def _merge_block(current: bytes | None, delta: bytes, at: float, tau: float) -> bytes:
    add = np.frombuffer(delta, dtype="<f8")
    if current is None:
        return np.float64(at).tobytes() + bytes(delta)
    anchor = float(np.frombuffer(current[:8], dtype="<f8")[0])
    base = np.frombuffer(current[8:], dtype="<f8")
    if base.shape != add.shape:
        raise IncompatibleStats("second-moment blocks of different sizes")
    new, f_old, f_new = (float(x) for x in _factors(anchor, at, tau))
    return np.float64(new).tobytes() + (base * f_old + add * f_new).tobytes()


def _merge_rows(
    current: list[bytes | None], delta: list[bytes], at: float, tau: float
) -> list[bytes]:
    size = len(delta[0])
    if (size - 16) % 8 or any(len(d) != size for d in delta):
        raise IncompatibleStats("class rows of different widths")
    dim = (size - 16) // 8
    add = np.frombuffer(b"".join(delta), dtype=row_dtype(dim))
    dtype = decayed_row_dtype(dim)
    base = np.zeros(len(delta), dtype=dtype)
    base["a"] = at
    have = [i for i, c in enumerate(current) if c is not None]
    if have:
        if any(len(current[i] or b"") != dtype.itemsize for i in have):
            raise IncompatibleStats("decayed class rows of different widths")
        base[have] = np.frombuffer(b"".join(current[i] or b"" for i in have), dtype=dtype)
    anchor, f_old, f_new = _factors(base["a"], at, tau)
    n = add["n"].astype(np.float64)
    out = np.empty_like(base)
    out["a"] = anchor
    out["w"] = base["w"] * f_old + n * f_new
    out["v"] = base["v"] * f_old**2 + n * f_new**2
    out["q"] = base["q"] * f_old + add["q"] * f_new
    out["s"] = base["s"] * f_old[:, None] + add["s"] * f_new[:, None]
    return [row.tobytes() for row in out]


# ------------------------------------------------------------------------ reading
def expired_fields(
    chunk: Iterable[tuple[bytes, bytes]], now: float, tau: float, min_weight: float
) -> list[bytes]:
    """Class rows among `chunk` (fields of one decayed state) whose weight at `now` is below
    `min_weight`: maintenance deletes them (reads leave them out anyway)."""
    out = []
    for field, value in chunk:
        if is_row(field):
            a, w = np.frombuffer(value[:16], dtype="<f8")
            if float(w) * math.exp(-(now - float(a)) / tau) < min_weight:
                out.append(field)
    return out
