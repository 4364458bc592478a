"""Statistics split by class: the store format (version 2) of `CollapseStats`.

A statistics object becomes a mapping of small fields, so a Redis hash can hold any
vocabulary and width with no value above 64 MB, and a merge touches only the classes the new
data touches:

- `g`: the globals (format, shape, options, counters, `sum h/||h||`, RFF sums): O(d + D);
- one field per touched class, named by its decimal id: count (int64), `sum ||h||^2` and
  `sum h` (float64), 16 + 8 d bytes (64 KiB at d = 8,192);
- `m:<i>`: row block i of the optional d x d second moment, at most `BLOCK_BYTES` each.

Fields add (and subtract, for sliding windows) exactly as the statistics do; a class whose
count returns to 0 loses its field, so rounding never lingers in classes that left a window.
Nothing here executes code on load and every value is checked before it is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from monitor.errors import IncompatibleStats
from monitor.stats.rff_config import RFFConfig

# The byte level (globals, the field algebra) is numpy only: compaction, window maintenance and
# `status` run without torch (a core install); building tensors imports it when called.
if TYPE_CHECKING:
    import torch

    from monitor.stats.collapse_stats import CollapseStats

FORMAT = "collapse-stats-fields"
VERSION = 2
GLOBAL_FIELD = b"g"
BLOCK_PREFIX = b"m:"
BLOCK_BYTES = 32 * 2**20  # second-moment blocks; rows are far smaller at any real width
MAX_VALUE_BYTES = 64 * 2**20  # the design's limit for one stored value
_COUNTERS = ("sample_count", "unit_count", "nc4_hits", "nc4_total")

Fields = dict[bytes, bytes]


def block_rows(dim: int) -> int:
    """Rows of the second moment per `m:<i>` field, so a block stays under `BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (8 * dim))


def is_row(field: bytes) -> bool:
    return field[:1].isdigit()


@dataclass(frozen=True)
class Globals:
    """The `g` field, decoded: everything about statistics that is not per class."""

    num_classes: int
    dim: int
    second_moment: bool
    rff: RFFConfig | None
    counters: dict[str, int]
    rff_sq: float
    unit_sum: np.ndarray
    rff_sum: np.ndarray | None

    @property
    def sample_count(self) -> int:
        return self.counters["sample_count"]

    def signature(self) -> tuple[int, int, bool, RFFConfig | None]:
        return (self.num_classes, self.dim, self.second_moment, self.rff)

    def non_row_fields(self) -> int:
        """Fields of a state that are not class rows: `g` and the second-moment blocks."""
        if not self.second_moment:
            return 1
        return 1 + math.ceil(self.dim / block_rows(self.dim))

    def encode(self) -> bytes:
        header = {
            "format": FORMAT,
            "version": VERSION,
            "num_classes": self.num_classes,
            "dim": self.dim,
            "second_moment": self.second_moment,
            "rff": None if self.rff is None else self.rff.to_json(),
            "rff_sq": self.rff_sq,
            **self.counters,
        }
        arrays = {"unit_sum": np.ascontiguousarray(self.unit_sum, dtype="<f8")}
        if self.rff_sum is not None:
            arrays["rff_sum"] = np.ascontiguousarray(self.rff_sum, dtype="<f8")
        return bytes(np_save(arrays, metadata={"g": json.dumps(header, sort_keys=True)}))

    @classmethod
    def decode(cls, blob: bytes) -> Globals:
        try:
            arrays = np_load(bytes(blob))
            header = json.loads(metadata_of(blob)["g"])
            if header.get("format") != FORMAT:
                raise IncompatibleStats("not a split-statistics globals field")
            if header.get("version") != VERSION:
                raise IncompatibleStats(
                    f"statistics store format {header.get('version')!r} is not supported "
                    f"(this release reads format {VERSION})"
                )
            dim, num_classes = int(header["dim"]), int(header["num_classes"])
            rff = None if header.get("rff") is None else RFFConfig.from_json(header["rff"])
            counters = {k: int(header[k]) for k in _COUNTERS}
            rff_sq = float(header["rff_sq"])
            unit_sum = arrays["unit_sum"]
            rff_sum = arrays.get("rff_sum")
        except (KeyError, TypeError, ValueError, SafetensorError) as exc:
            if isinstance(exc, IncompatibleStats):
                raise
            raise IncompatibleStats(f"corrupt statistics globals: {exc}") from exc
        if dim < 1 or num_classes < 1 or unit_sum.shape != (dim,):
            raise IncompatibleStats("corrupt statistics globals: shape")
        if (rff is None) != (rff_sum is None) or (
            rff is not None and rff_sum is not None and rff_sum.shape != (rff.features,)
        ):
            raise IncompatibleStats("corrupt statistics globals: RFF sums")
        if min(counters.values()) < 0 or counters["nc4_hits"] > counters["nc4_total"]:
            raise IncompatibleStats("corrupt statistics globals: counters")
        finite = np.isfinite(unit_sum).all() and math.isfinite(rff_sq)
        if not finite or (rff_sum is not None and not np.isfinite(rff_sum).all()):
            raise IncompatibleStats("corrupt statistics globals: non-finite values")
        return cls(
            num_classes,
            dim,
            bool(header["second_moment"]),
            rff,
            counters,
            rff_sq,
            unit_sum.astype(np.float64),
            None if rff_sum is None else rff_sum.astype(np.float64),
        )

    def combined(self, other: Globals, sign: int) -> Globals:
        if self.signature() != other.signature():
            raise IncompatibleStats(
                "cannot merge statistics of (num_classes, dim, second_moment, rff) "
                f"{other.signature()} into {self.signature()}"
            )
        counters = {k: self.counters[k] + sign * other.counters[k] for k in _COUNTERS}
        if min(counters.values()) < 0:
            raise IncompatibleStats("subtracting statistics that were never added")
        rff_sum = None
        if self.rff_sum is not None and other.rff_sum is not None:
            rff_sum = self.rff_sum + sign * other.rff_sum
        rff_sq = max(self.rff_sq + sign * other.rff_sq, 0.0)
        if counters["sample_count"] == 0:  # empty again: drop the rounding residue too
            return Globals(
                *self.signature(),
                counters,
                0.0,
                np.zeros_like(self.unit_sum),
                None if rff_sum is None else np.zeros_like(rff_sum),
            )
        unit_sum = self.unit_sum + sign * other.unit_sum
        return Globals(*self.signature(), counters, rff_sq, unit_sum, rff_sum)


def metadata_of(blob: bytes) -> dict[str, str]:
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def _globals_of(stats: CollapseStats) -> Globals:
    return Globals(
        stats.num_classes,
        stats.dim,
        stats.has_second_moment,
        stats.rff,
        {
            "sample_count": stats.sample_count,
            "unit_count": stats.unit_count,
            "nc4_hits": stats.nc4_hits,
            "nc4_total": stats.nc4_total,
        },
        float(stats.rff_sq),
        stats.unit_sum.detach().cpu().numpy().astype(np.float64),
        None if stats.rff_sum is None else stats.rff_sum.detach().cpu().numpy(),
    )


def row_dtype(dim: int) -> np.dtype[np.void]:
    return np.dtype([("n", "<i8"), ("q", "<f8"), ("s", "<f8", (dim,))])


def field_chunks(stats: CollapseStats, max_bytes: int = BLOCK_BYTES) -> Iterator[Fields]:
    """The fields of `stats` in chunks of about `max_bytes`: globals first, then class rows,
    then second-moment blocks. Streamed, so a large state is never encoded whole at once."""
    yield {GLOBAL_FIELD: _globals_of(stats).encode()}
    dtype = row_dtype(stats.dim)
    step = max(1, max_bytes // dtype.itemsize)
    ids = stats.class_ids
    for start in range(0, stats.touched_classes, step):
        part = slice(start, start + step)
        rows = np.empty(len(ids[part]), dtype=dtype)
        rows["n"] = stats.counts[part].cpu().numpy()
        rows["q"] = stats.sq_norms[part].cpu().numpy()
        rows["s"] = stats.sums[part].cpu().numpy()
        names = ids[part].cpu().tolist()
        yield {str(c).encode(): row.tobytes() for c, row in zip(names, rows, strict=True)}
    if stats.second is not None:
        second = stats.second.cpu().numpy()
        rows_per_block = block_rows(stats.dim)
        for i, start in enumerate(range(0, stats.dim, rows_per_block)):
            block = second[start : start + rows_per_block].tobytes()
            yield {BLOCK_PREFIX + str(i).encode(): block}


def to_fields(stats: CollapseStats) -> Fields:
    """All fields of `stats` in one mapping (partials and other small statistics)."""
    fields: Fields = {}
    for chunk in field_chunks(stats):
        fields.update(chunk)
    return fields


class StatsAlgebra:
    """Adds and subtracts field values: the merge the store applies without knowing them."""

    def combine(
        self,
        fields: Sequence[bytes],
        current: Sequence[bytes | None],
        delta: Sequence[bytes],
        sign: int,
    ) -> list[bytes | None]:
        """`current + sign * delta` per field; None where a field becomes empty (deleted)."""
        out: list[bytes | None] = [None] * len(fields)
        rows = [i for i, f in enumerate(fields) if is_row(f)]
        for i, field in enumerate(fields):
            if field == GLOBAL_FIELD:
                out[i] = self._globals(current[i], delta[i], sign)
            elif field.startswith(BLOCK_PREFIX):
                out[i] = self._block(current[i], delta[i], sign)
            elif not is_row(field):
                raise IncompatibleStats(f"unknown statistics field {field[:40]!r}")
        if rows:
            merged = self._rows([current[i] for i in rows], [delta[i] for i in rows], sign)
            for i, value in zip(rows, merged, strict=True):
                out[i] = value
        return out

    def merge_all(self, parts: Iterable[Mapping[bytes, bytes]]) -> Fields:
        """The sum of several field mappings (the partials of one compaction group)."""
        total: Fields = {}
        for part in parts:
            names = list(part)
            merged = self.combine(names, [total.get(n) for n in names], list(part.values()), 1)
            for name, value in zip(names, merged, strict=True):
                if value is not None:
                    total[name] = value
        return total

    def combine_decayed(
        self,
        fields: Sequence[bytes],
        current: Sequence[bytes | None],
        delta: Sequence[bytes],
        at: float,
        tau: float,
    ) -> list[bytes | None]:
        """`current` (a decayed window's fields) plus `delta` of data at time `at`."""
        from monitor.stats.decayed import merge_fields

        return list(merge_fields(fields, current, delta, at, tau))

    def expired(
        self, chunk: Iterable[tuple[bytes, bytes]], now: float, tau: float, min_weight: float
    ) -> list[bytes]:
        """Rows of a decayed state that weigh less than `min_weight` at `now`."""
        from monitor.stats.decayed import expired_fields

        return expired_fields(chunk, now, tau, min_weight)

    def summary(self, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """The globals alone: what a bucket keeps in decayed mode."""
        return {GLOBAL_FIELD: fields[GLOBAL_FIELD]} if GLOBAL_FIELD in fields else {}

    @staticmethod
    def _globals(current: bytes | None, delta: bytes, sign: int) -> bytes:
        add = Globals.decode(delta)
        if current is None:
            if sign < 0:
                raise IncompatibleStats("subtracting statistics from an empty state")
            return add.encode()
        return Globals.decode(current).combined(add, sign).encode()

    @staticmethod
    def _block(current: bytes | None, delta: bytes, sign: int) -> bytes:
        add = np.frombuffer(delta, dtype="<f8")
        if current is None:
            return bytes(delta) if sign > 0 else (-add).tobytes()
        base = np.frombuffer(current, dtype="<f8")
        if base.shape != add.shape:
            raise IncompatibleStats("second-moment blocks of different sizes")
        return bytes((base + sign * add).tobytes())

    @staticmethod
    def _rows(current: list[bytes | None], delta: list[bytes], sign: int) -> list[bytes | None]:
        size = len(delta[0])
        if (size - 16) % 8 or any(len(d) != size for d in delta):
            raise IncompatibleStats("class rows of different widths")
        dtype = row_dtype((size - 16) // 8)
        add = np.frombuffer(b"".join(delta), dtype=dtype)
        base = np.zeros(len(delta), dtype=dtype)
        have = [i for i, c in enumerate(current) if c is not None]
        if have:
            if any(len(current[i] or b"") != size for i in have):
                raise IncompatibleStats("class rows of different widths")
            base[have] = np.frombuffer(b"".join(current[i] or b"" for i in have), dtype=dtype)
        out = np.empty_like(base)
        out["n"] = base["n"] + sign * add["n"]
        out["q"] = base["q"] + sign * add["q"]
        out["s"] = base["s"] + sign * add["s"]
        if bool((out["n"] < 0).any()):
            raise IncompatibleStats("subtracting class rows that were never added")
        return [row.tobytes() if row["n"] > 0 else None for row in out]


def decode_block(field: bytes, value: bytes, dim: int) -> tuple[int, np.ndarray]:
    """First row and (rows, dim) values of second-moment block `m:<i>`, its size checked."""
    step = block_rows(dim)
    start = int(field[len(BLOCK_PREFIX) :]) * step
    rows = min(step, dim - start)
    block = np.frombuffer(value, dtype="<f8")
    if start >= dim or block.size != rows * dim:
        raise IncompatibleStats("a second-moment block of the wrong size")
    return start, block.reshape(rows, dim)


def decode_globals(blob: bytes | None) -> Globals | None:
    return None if blob is None else Globals.decode(blob)


@dataclass(frozen=True)
class Rows:
    """Class rows of one chunk, decoded and checked (float64 sums, int64 counts)."""

    class_ids: torch.Tensor
    counts: torch.Tensor
    sq_norms: torch.Tensor
    sums: torch.Tensor


def row_fields(chunk: Iterable[tuple[bytes, bytes]]) -> tuple[list[int], list[bytes]]:
    """Class ids and values of the class rows among `chunk`'s fields (others are skipped)."""
    ids: list[int] = []
    values: list[bytes] = []
    for field, value in chunk:
        if is_row(field):
            ids.append(int(field))
            values.append(value)
    return ids, values


def decode_rows(chunk: Iterable[tuple[bytes, bytes]], globals_: Globals) -> Rows | None:
    """The class rows among `chunk`'s fields (others are skipped); None when there are none."""
    dtype = row_dtype(globals_.dim)
    ids, values = row_fields(chunk)
    if not ids:
        return None
    if any(len(v) != dtype.itemsize for v in values):
        raise IncompatibleStats("a class row of the wrong width")
    import torch

    rows = np.frombuffer(b"".join(values), dtype=dtype)
    class_ids = torch.tensor(ids, dtype=torch.int64)
    if int(class_ids.min()) < 0 or int(class_ids.max()) >= globals_.num_classes:
        raise IncompatibleStats("a class row outside the vocabulary")
    counts = torch.from_numpy(rows["n"].copy())
    if int(counts.min()) < 1:
        raise IncompatibleStats("a class row with no samples")
    sums = torch.from_numpy(np.ascontiguousarray(rows["s"]))
    sq = torch.from_numpy(rows["q"].copy())
    if not (bool(torch.isfinite(sums).all()) and bool(torch.isfinite(sq).all())):
        raise IncompatibleStats("non-finite values in class rows")
    return Rows(class_ids, counts, sq, sums)


class StatsBuilder:
    """Rebuilds `CollapseStats` from fields arriving in chunks (a store streams them).

    The class rows go straight into one preallocated K x d tensor, so a window of 128k classes
    at d = 4,096 (4.2 GB) is never held twice: the chunks are bounded and dropped as they go.
    """

    def __init__(self, globals_: Globals, rows: int, *, device: str | torch.device = "cpu"):
        from monitor.stats.collapse_stats import CollapseStats

        g = globals_
        self.globals = g
        self.stats = CollapseStats(
            g.num_classes, g.dim, second_moment=g.second_moment, rff=g.rff, device=device
        )
        self.stats._reserve(min(max(rows, 0), g.num_classes))
        self._step = block_rows(g.dim)

    def add(self, chunk: Iterable[tuple[bytes, bytes]]) -> None:
        items = list(chunk)
        for field, value in items:
            if field.startswith(BLOCK_PREFIX):
                self._add_block(field, value)
            elif field != GLOBAL_FIELD and not is_row(field):
                raise IncompatibleStats(f"unknown statistics field {field[:40]!r}")
        rows = decode_rows(items, self.globals)
        if rows is not None:
            self.stats._load_rows(rows.class_ids, rows.counts, rows.sums, rows.sq_norms)

    def _add_block(self, field: bytes, value: bytes) -> None:
        import torch

        second = self.stats.second
        if second is None:
            raise IncompatibleStats("a second-moment block in statistics without one")
        start, block = decode_block(field, value, self.globals.dim)
        second[start : start + block.shape[0]] = torch.from_numpy(block.copy())

    def finish(self) -> CollapseStats:
        g, stats = self.globals, self.stats
        if int(stats.counts.sum()) != g.sample_count:
            raise IncompatibleStats(
                f"class counts sum to {int(stats.counts.sum())}, the globals say {g.sample_count}"
            )
        install_globals(stats, g)
        return stats


def install_globals(stats: CollapseStats, g: Globals) -> None:
    """Set the global sums and counters of `stats` (built from rows) from its `g` field."""
    import torch

    stats.sample_count = g.sample_count
    stats.unit_count = g.counters["unit_count"]
    stats.nc4_hits = g.counters["nc4_hits"]
    stats.nc4_total = g.counters["nc4_total"]
    stats.unit_sum = torch.from_numpy(g.unit_sum.copy()).to(stats.device)
    if g.rff_sum is not None:
        stats.rff_sum = torch.from_numpy(g.rff_sum.copy()).to(stats.device)
        stats.rff_sq = g.rff_sq


def from_fields(fields: Mapping[bytes, bytes]) -> CollapseStats:
    """Statistics from a whole field mapping (small states: partials, tests)."""
    g = Globals.decode(fields[GLOBAL_FIELD])
    builder = StatsBuilder(g, len(fields))
    builder.add(fields.items())
    return builder.finish()
