"""Reading a decayed state: the window as it stands at a time, presented as ordinary statistics
(monitor/stats/decayed.py has the format and the merge).

A read keeps the classes whose weight is at least `min_weight` and presents each with its Kish
effective size n = W^2 / V (rounded) and sums n S / W, n Q / W, so class means, within-class
variances and the n/(n-1), s^2/n corrections of the metrics are the weighted ones; the globals
are scaled to the presented sample count (`DecayedGlobals.presented`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from monitor.errors import IncompatibleStats
from monitor.stats.decayed import DecayedGlobals, decayed_row_dtype
from monitor.stats.fields import (
    BLOCK_PREFIX,
    GLOBAL_FIELD,
    Fields,
    decode_block,
    install_globals,
    is_row,
    row_dtype,
    row_fields,
)

if TYPE_CHECKING:
    from monitor.stats.collapse_stats import CollapseStats


@dataclass(frozen=True)
class PresentedRows:
    """Member classes of one chunk, presented: ids, effective counts, sums, square-norm sums."""

    class_ids: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    sq_norms: np.ndarray


class DecayedView:
    """Presents a decayed state at `now` as ordinary statistics (the module docstring)."""

    def __init__(self, g: DecayedGlobals, now: float, min_weight: float) -> None:
        self.g, self.now, self.min_weight = g, float(now), float(min_weight)
        self.dtype = decayed_row_dtype(g.dim)

    def weights_now(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows["w"] * np.exp(-(self.now - rows["a"]) / self.g.tau))

    def rows(self, chunk: Iterable[tuple[bytes, bytes]]) -> PresentedRows | None:
        ids, values = row_fields(chunk)
        if not ids:
            return None
        if any(len(v) != self.dtype.itemsize for v in values):
            raise IncompatibleStats("a decayed class row of the wrong width")
        rows = np.frombuffer(b"".join(values), dtype=self.dtype)
        class_ids = np.asarray(ids, dtype=np.int64)
        if int(class_ids.min()) < 0 or int(class_ids.max()) >= self.g.num_classes:
            raise IncompatibleStats("a class row outside the vocabulary")
        if not (np.isfinite(rows["s"]).all() and np.isfinite(rows["q"]).all()):
            raise IncompatibleStats("non-finite values in decayed class rows")
        if bool((rows["w"] <= 0).any()) or bool((rows["v"] <= 0).any()):
            raise IncompatibleStats("a decayed class row with no weight")
        keep = self.weights_now(rows) >= self.min_weight
        rows, class_ids = rows[keep], class_ids[keep]
        counts = np.maximum(np.rint(rows["w"] ** 2 / rows["v"]), 1.0)
        ratio = counts / rows["w"]
        return PresentedRows(
            class_ids, counts.astype(np.int64), rows["s"] * ratio[:, None], rows["q"] * ratio
        )

    def block(self, name: bytes, value: bytes) -> tuple[int, np.ndarray]:
        """Row start and values of a second-moment block per unit of weight: `sum w h h^T / W`
        at the globals' anchor (times the presented sample count, it is the presented block)."""
        start, block = decode_block(name, value[8:], self.g.dim)
        anchor = float(np.frombuffer(value[:8], dtype="<f8")[0])
        w = self.g.weights["sample"]
        factor = math.exp(-(self.g.anchor - anchor) / self.g.tau) / w if w > 0 else 0.0
        return start, block * factor


def presented_chunks(
    view: DecayedView, scan: Iterable[Sequence[tuple[bytes, bytes]]], samples: int
) -> Iterator[Fields]:
    """Ordinary fields of the presented state, chunk by chunk (for pinning a baseline), given
    its effective sample count from a first pass (`count_members`). Globals come last."""
    ordinary = row_dtype(view.g.dim)
    for chunk in scan:
        presented = view.rows(chunk)
        if presented is not None:
            rows = np.empty(len(presented.class_ids), dtype=ordinary)
            rows["n"], rows["q"], rows["s"] = presented.counts, presented.sq_norms, presented.sums
            ids = presented.class_ids.tolist()
            yield {str(c).encode(): r.tobytes() for c, r in zip(ids, rows, strict=True)}
        for name, value in chunk:
            if name.startswith(BLOCK_PREFIX):
                _, block = view.block(name, value)
                yield {name: np.ascontiguousarray(block * samples, dtype="<f8").tobytes()}
    yield {GLOBAL_FIELD: view.g.presented(samples).encode()}


def count_members(
    view: DecayedView, scan: Iterable[Sequence[tuple[bytes, bytes]]]
) -> tuple[int, int]:
    """(effective samples, member classes) of a decayed state: the first pass of a pin."""
    samples = classes = 0
    for chunk in scan:
        presented = view.rows(chunk)
        if presented is not None:
            samples += int(presented.counts.sum())
            classes += len(presented.class_ids)
    return samples, classes


class DecayedStatsBuilder:
    """`CollapseStats` of a decayed state presented at `now`, from fields arriving in chunks
    (the class rows go straight into one preallocated K x d tensor, as `StatsBuilder`'s)."""

    def __init__(
        self, g: DecayedGlobals, rows: int, now: float, min_weight: float, *, device: str = "cpu"
    ) -> None:
        from monitor.stats.collapse_stats import CollapseStats

        self.view = DecayedView(g, now, min_weight)
        self.stats = CollapseStats(
            g.num_classes, g.dim, second_moment=g.second_moment, rff=g.rff, device=device
        )
        self.stats._reserve(min(max(rows, 0), g.num_classes))

    def add(self, chunk: Iterable[tuple[bytes, bytes]]) -> None:
        import torch

        items = list(chunk)
        for field, value in items:
            if field.startswith(BLOCK_PREFIX):
                # per unit of weight now, scaled to the sample count in `finish` (in place: the
                # d x d moment is never held twice)
                second = self.stats.second
                if second is None:
                    raise IncompatibleStats("a second-moment block in statistics without one")
                start, block = self.view.block(field, value)
                second[start : start + block.shape[0]] = torch.from_numpy(block)
            elif field != GLOBAL_FIELD and not is_row(field):
                raise IncompatibleStats(f"unknown statistics field {field[:40]!r}")
        rows = self.view.rows(items)
        if rows is not None and len(rows.class_ids):
            self.stats._load_rows(
                torch.from_numpy(rows.class_ids),
                torch.from_numpy(rows.counts),
                torch.from_numpy(np.ascontiguousarray(rows.sums)),
                torch.from_numpy(np.ascontiguousarray(rows.sq_norms)),
            )

    def finish(self) -> CollapseStats:

        stats = self.stats
        samples = int(stats.counts.sum())
        install_globals(stats, self.view.g.presented(samples))
        if stats.second is not None:
            stats.second.mul_(samples)
        return stats
