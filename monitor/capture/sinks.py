"""Where captured batches go: the `Sink` protocol and the in-process sink.

Capture produces `CaptureBatch`es (features, next-token labels, NC4 counts) and hands them to a
sink from a background thread. The in-process sink adds them to a `CollapseStats` (the embedded
single-process mode); the pipeline's sink (a later issue) will enqueue them for Celery. Both only
need `send` and `close`, so capture knows nothing about Redis or Celery.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from monitor.errors import InvalidInput
from monitor.stats import CollapseStats


def _new_batch_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class CaptureBatch:
    """One shipped batch: rows of final hidden states paired with the token that came next.

    `features` is (N, d) float32 on the CPU, `labels` (N,) int64. `nc4_hits`/`nc4_total` count,
    over these N rows, how often the head's decision (restricted to the reference classes) agreed
    with the nearest class mean; both are 0 when no reference was set. `batch_id` is unique, so a
    pipeline can make ingestion idempotent.
    """

    features: torch.Tensor
    labels: torch.Tensor
    nc4_hits: int = 0
    nc4_total: int = 0
    source: str = "probe"
    batch_id: str = field(default_factory=_new_batch_id)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@runtime_checkable
class Sink(Protocol):
    """Receives batches on capture's shipping thread; may be slow, must be thread-safe.

    A sink may also define `close()`: it is called once, when the probe is detached.
    """

    def send(self, batch: CaptureBatch) -> None:
        """Take ownership of one batch (called from the shipping thread)."""


class InProcessSink:
    """Adds every batch to a `CollapseStats`, under a lock so readers see whole batches."""

    def __init__(self, stats: CollapseStats) -> None:
        self.stats = stats
        self._lock = threading.Lock()
        self.batches = 0

    def send(self, batch: CaptureBatch) -> None:
        if len(batch) == 0:
            return
        with self._lock:
            self.stats.update(batch.features, batch.labels)
            if batch.nc4_total:
                self.stats.record_nc4(batch.nc4_hits, batch.nc4_total)
            self.batches += 1

    def close(self) -> None:
        """Nothing to flush: `send` applies each batch immediately."""

    @contextmanager
    def locked(self) -> Iterator[CollapseStats]:
        """Hold the lock while reading `stats` from another thread."""
        with self._lock:
            yield self.stats

    def snapshot(self) -> CollapseStats:
        """A consistent copy of the statistics so far."""
        with self._lock:
            return self.stats.copy()


class CollectingSink:
    """Keeps every batch in a list: for tests, the mirror and notebooks."""

    def __init__(self) -> None:
        self.batches: list[CaptureBatch] = []
        self._lock = threading.Lock()
        self.closed = False

    def send(self, batch: CaptureBatch) -> None:
        with self._lock:
            self.batches.append(batch)

    def close(self) -> None:
        self.closed = True

    def features(self) -> torch.Tensor:
        with self._lock:
            parts = [b.features for b in self.batches]
        return torch.cat(parts) if parts else torch.empty(0, 0)

    def labels(self) -> torch.Tensor:
        with self._lock:
            parts = [b.labels for b in self.batches]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


@dataclass(frozen=True)
class NC4Reference:
    """Class means of the last evaluation and the head rows of the same classes, on the CPU.

    NC4 at ingestion compares, for each captured state, the head's decision restricted to these
    K classes with the nearest of these K means (METRICS.md, `nc4_ncc_agreement`).
    """

    class_ids: torch.Tensor  # (K,) int64
    means: torch.Tensor  # (K, d) float64
    weight: torch.Tensor  # (K, d) float64, rows of the LM head for class_ids
    bias: torch.Tensor | None  # (K,) float64 or None

    @classmethod
    def from_head(
        cls, head: torch.nn.Module, class_ids: torch.Tensor, means: torch.Tensor
    ) -> NC4Reference:
        """Slice `head.weight` (and `head.bias`) to `class_ids`; copies to CPU float64."""
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise InvalidInput(
                "no_head_weight",
                f"the LM head {type(head).__name__} has no 2-D `weight`; NC4 needs a linear head",
            )
        ids = torch.as_tensor(class_ids, dtype=torch.int64).flatten().cpu()
        mu = torch.as_tensor(means).detach().to("cpu", torch.float64)
        if mu.ndim != 2 or mu.shape[0] != ids.numel() or mu.shape[1] != weight.shape[1]:
            raise InvalidInput(
                "wrong_shape",
                f"means {tuple(mu.shape)} do not match {ids.numel()} class ids and the head "
                f"dimension {weight.shape[1]}",
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise InvalidInput("label_out_of_range", "class ids outside the head's vocabulary")
        with torch.no_grad():
            rows = weight.detach()[ids.to(weight.device)].to("cpu", torch.float64)
            bias = getattr(head, "bias", None)
            b = (
                bias.detach()[ids.to(bias.device)].to("cpu", torch.float64)
                if isinstance(bias, torch.Tensor)
                else None
            )
        return cls(class_ids=ids, means=mu, weight=rows, bias=b)

    def hits(self, features: torch.Tensor) -> int:
        """Number of rows of `features` on which the two decisions agree."""
        from monitor.metrics.nc4 import ncc_agreement

        if self.class_ids.numel() < 1 or features.shape[0] == 0:
            return 0
        return int(ncc_agreement(features, self.means, self.weight, self.bias).sum())
