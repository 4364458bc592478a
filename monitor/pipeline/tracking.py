"""The optional cap on tracked classes (`max_tracked_classes` of a model).

A model with the cap keeps class statistics only for its most frequent classes. The store holds
every class's decayed count (`Store.top_classes`; a sorted set of at most V small entries, a few
MB at V = 128k, so exact counts need no sketch); each batch adds the count of every label it
carries in the same exactly-once step as its partial (`TrackedCounts`). A class is tracked when
it is among the top `max_tracked_classes` by that count; while fewer classes than that are
known, a worker also admits new classes, most frequent in the batch first, up to the cap.

Samples of untracked classes are dropped as whole samples before the partial's statistics are
built, so every field (counts, sums, unit sums, RFF sums, second moment) covers the same rows.
NC4 counts, measured by the producer over the whole batch, are kept as sent.

Each worker process keeps its own `TrackedClasses` and reads the top set again every
`tracked_refresh_seconds`: a set that changed reaches every worker within that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from monitor.store.base import Store, TrackedCounts

__all__ = ["TrackedClasses", "label_counts"]


def label_counts(labels: np.ndarray) -> dict[int, float]:
    """How often each class occurs among `labels`: what a batch adds to the frequencies."""
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): float(n) for c, n in zip(classes, counts, strict=True)}


@dataclass
class _Tracked:
    """One model's tracked set as last read, plus the classes this process admitted since."""

    top: frozenset[int]
    fetched: float
    admitted: set[int] = field(default_factory=set)
    _array: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        if self._array is None:
            self._array = np.fromiter(self.top | self.admitted, dtype=np.int64)
        return self._array

    def admit(self, labels: np.ndarray, cap: int) -> None:
        """While fewer than `cap` classes are known, take new ones up to the cap, the most
        frequent in this batch first (ties: the lower class id)."""
        free = cap - len(self.top) - len(self.admitted)
        if free <= 0:
            return
        counts = label_counts(labels)
        new = [c for c in counts if c not in self.top and c not in self.admitted]
        new.sort(key=lambda c: (-counts[c], c))
        if new[:free]:
            self.admitted.update(new[:free])
            self._array = None


class TrackedClasses:
    """Per worker process: which samples of a capped model's batch are kept."""

    def __init__(
        self,
        store: Store,
        refresh_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._models: dict[tuple[str, int], _Tracked] = {}

    def tracked(self, model: str, cap: int) -> _Tracked:
        """The model's tracked set, read again from the store when older than the refresh."""
        now = self._clock()
        entry = self._models.get((model, cap))
        if entry is None or now - entry.fetched >= self.refresh_seconds:
            entry = _Tracked(frozenset(self.store.top_classes(model, cap)), now)
            self._models[(model, cap)] = entry
        return entry

    def keep(self, model: str, cap: int, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of the samples whose class is tracked."""
        entry = self.tracked(model, cap)
        entry.admit(labels, cap)
        return np.isin(labels, entry.allowed())

    def select(self, model: str, cap: int, labels: np.ndarray) -> tuple[np.ndarray, TrackedCounts]:
        """The mask of kept samples, and what the batch adds to the store with its partial:
        every label's count (tracked or not, so a class can rise into the top set) and the
        number of samples left out."""
        mask = self.keep(model, cap, labels)
        return mask, TrackedCounts(label_counts(labels), int(mask.size - mask.sum()))
