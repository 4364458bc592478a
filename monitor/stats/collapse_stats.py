"""`CollapseStats`: additive sufficient statistics of hidden states grouped by next token.

Only the classes a batch touches get a row (a slot), so a per-batch partial over a 50k-token
vocabulary stays as small as the batch, while a window that has seen every class holds one row
per class. Everything is float64: `q_c/n_c - ||mu_c||^2` in float32 cancels catastrophically
when `||mu|| >> sigma` (METRICS.md). Any split of the data, merged in any order, gives the same
statistics up to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.errors import IncompatibleStats
from monitor.stats.rff import RFFConfig, rff_features
from monitor.stats.validation import ArrayLike, CheckedBatch

_F64 = torch.float64
_CHUNK_ROWS = 512


def _scatter_add(target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """target[rows] += values, summing repeated rows.

    index_put_ with accumulate rather than index_add_: on CPU, index_add_'s parallel region
    stalled for ~0.1 s per call whenever the cores were oversubscribed (a worker beside other
    processes), 20-600x slower than this. On an idle machine index_add_ is about 2x faster
    (docs/benchmarks.md); robustness under load wins for a service.
    """
    target.index_put_((rows,), values, accumulate=True)


@dataclass(frozen=True)
class ClassStatistics:
    """The per-class rows of the classes with `n_c >= min_count`, ordered by class id.

    `class_ids`, `counts` and `sq_norms` are copies (O(K)). The sums are not copied: at an LLM's
    vocabulary and width one K x d float64 matrix is 4.2 GB (K = 128,256, d = 4,096), the size
    of the statistics themselves, so `storage` is the statistics' own rows and `rows` says which
    of them each class is (None: `storage` is exactly the K rows, in order). Read them before
    the statistics change (update and merge write into that storage) and never write into
    them. `sums` and `means()` build the whole (K, d) matrix for callers that want it;
    `sum_tile`, `mean_tile`, `take_sums` and `take_means` give a few rows without it.
    """

    class_ids: torch.Tensor  # (K,) int64
    counts: torch.Tensor  # (K,) int64
    sq_norms: torch.Tensor  # (K,) float64, q_c = sum ||h||^2
    storage: torch.Tensor  # (S, d) float64, the statistics' sum rows (a view, not a copy)
    rows: torch.Tensor | None = None  # (K,) int64: row of class c in `storage`; None = c
    TILE_BYTES = 32 << 20  # bytes of rows per step of `means()` and `variances()` (not a field)

    @property
    def num_classes(self) -> int:
        return int(self.class_ids.numel())

    @property
    def sums(self) -> torch.Tensor:
        """s_c = sum h, (K, d) float64: a view of the statistics when in order, else a copy."""
        return self.storage if self.rows is None else self.storage[self.rows]

    def sum_tile(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of `sums` (a view, or a gather of those rows only)."""
        if self.rows is None:
            return self.storage[start:stop]
        return self.storage[self.rows[start:stop]]

    def take_sums(self, index: torch.Tensor) -> torch.Tensor:
        """`sums[index]` without building `sums`."""
        if self.rows is None:
            return self.storage[index]
        return self.storage[self.rows[index]]

    def mean_tile(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of `means()`, the same numbers."""
        return self.sum_tile(start, stop) / self.counts[start:stop].unsqueeze(1).to(_F64)

    def take_means(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`means()[index]` without building `means()`, the same numbers.

        Into `out` (len(index), d) when given: a sampled-pair chunk calls this ~1,000 times,
        and a fresh buffer each time (page faults on every large allocation) was 10x slower.
        """
        where = index if self.rows is None else self.rows[index]
        if out is None:
            out = self.storage.index_select(0, where)
        else:
            torch.index_select(self.storage, 0, where, out=out)
        return out.div_(self.counts[index].unsqueeze(1).to(_F64))

    def means(self) -> torch.Tensor:
        """mu_c = s_c / n_c, (K, d) float64 (filled tile by tile: no gathered copy first)."""
        out = torch.empty(
            self.num_classes, self.storage.shape[1], dtype=_F64, device=self.storage.device
        )
        for start, stop in self._tiles():
            torch.div(
                self.sum_tile(start, stop),
                self.counts[start:stop].unsqueeze(1).to(_F64),
                out=out[start:stop],
            )
        return out

    def variances(self) -> torch.Tensor:
        """sigma_c^2 = q_c/n_c - ||mu_c||^2 (trace of the biased class covariance), clamped at 0.

        Tile by tile: `sums * sums` at once would be another K x d temporary.
        """
        n = self.counts.to(_F64)
        sq_sums = torch.empty(self.num_classes, dtype=_F64, device=self.storage.device)
        for start, stop in self._tiles():
            s = self.sum_tile(start, stop)
            sq_sums[start:stop] = (s * s).sum(dim=1)
        mean_sq = sq_sums / (n * n)
        return (self.sq_norms / n - mean_sq).clamp_min(0.0)

    def _tiles(self) -> list[tuple[int, int]]:
        """Row ranges of about `TILE_BYTES` of sums each."""
        step = max(1, self.TILE_BYTES // (8 * max(1, int(self.storage.shape[1]))))
        k = self.num_classes
        return [(a, min(a + step, k)) for a in range(0, k, step)]


class CollapseStats:
    """Sufficient statistics of METRICS.md: per class `n, sum h, sum ||h||^2`, plus global sums.

    Global: sample count `N`, `sum h/||h||` (for anisotropy), optionally the d x d
    second moment `S = sum h h^T` (for the trace ratio and effective rank), optionally random
    Fourier feature sums `sum phi(h)`, `sum ||phi(h)||^2` (for drift MMD), and NC4 hit counts
    recorded by capture. Tensors live on `device` (CPU by default) in float64.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        second_moment: bool = False,
        rff: RFFConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes}, {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device)
        self._size = 0
        self._slot = torch.full((self.num_classes,), -1, dtype=torch.int64, device=self.device)
        self._class_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._counts = torch.empty(0, dtype=torch.int64, device=self.device)
        self._sums = torch.empty(0, self.dim, dtype=_F64, device=self.device)
        self._sq_norms = torch.empty(0, dtype=_F64, device=self.device)
        self.sample_count = 0
        self.unit_sum = torch.zeros(self.dim, dtype=_F64, device=self.device)
        self.unit_count = 0
        self.second: torch.Tensor | None = (
            torch.zeros(self.dim, self.dim, dtype=_F64, device=self.device)
            if second_moment
            else None
        )
        self.nc4_hits = 0
        self.nc4_total = 0
        if rff is not None and rff.dim != self.dim:
            raise ValueError(f"RFF config is for dimension {rff.dim}, not {self.dim}")
        self.rff = rff
        self.rff_sum: torch.Tensor | None = (
            None if rff is None else torch.zeros(rff.features, dtype=_F64, device=self.device)
        )
        self.rff_sq = 0.0  # sum over samples of ||phi(h)||^2, for the unbiased MMD

    # ----------------------------------------------------------------- views
    @property
    def has_second_moment(self) -> bool:
        return self.second is not None

    @property
    def total_sum(self) -> torch.Tensor:
        """sum h over all samples (d,), derived from the class sums."""
        return self.sums.sum(dim=0)

    @property
    def touched_classes(self) -> int:
        """Number of classes with at least one sample."""
        return self._size

    @property
    def class_ids(self) -> torch.Tensor:
        return self._class_ids[: self._size]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[: self._size]

    @property
    def sums(self) -> torch.Tensor:
        return self._sums[: self._size]

    @property
    def sq_norms(self) -> torch.Tensor:
        return self._sq_norms[: self._size]

    def classes(self, min_count: int = 1) -> ClassStatistics:
        """Rows of the classes with `n_c >= min_count`, sorted by class id.

        The O(K) vectors are copies; the sums are not (see `ClassStatistics`): when every class
        is kept and the rows are already in class order, as after loading a blob, the result
        reads this object's storage directly, else it holds the positions of its rows in it.
        """
        ids, counts = self.class_ids, self.counts
        in_order = ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())
        keep = counts >= min_count
        rows: torch.Tensor | None
        if in_order:
            rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        else:
            order = torch.argsort(ids)
            rows = order[keep[order]]
        if rows is None:
            return ClassStatistics(
                class_ids=ids.clone(),
                counts=counts.clone(),
                sq_norms=self.sq_norms.clone(),
                storage=self.sums,
            )
        return ClassStatistics(
            class_ids=ids[rows],
            counts=counts[rows],
            sq_norms=self.sq_norms[rows],
            storage=self.sums,
            rows=rows,
        )

    def count_of(self, class_id: int) -> int:
        slot = int(self._slot[class_id])
        return 0 if slot < 0 else int(self._counts[slot])

    # ---------------------------------------------------------------- update
    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: features (N, d) float, labels (N,) int next-token ids.

        Validates everything first (shape, dtype, finite values, label range) and raises
        `InvalidInput` without changing anything when the batch is bad.
        """
        self.add_checked(
            CheckedBatch.check(features, labels, dim=self.dim, num_classes=self.num_classes)
        )

    def add_checked(self, batch: CheckedBatch) -> None:
        """Add a batch that was checked for this statistics' width and vocabulary."""
        if batch.dim != self.dim or batch.num_classes > self.num_classes:
            raise IncompatibleStats(
                f"a batch checked for d={batch.dim}, V={batch.num_classes} cannot be added to "
                f"statistics of d={self.dim}, V={self.num_classes}"
            )
        x, y = batch.features, batch.labels
        slots = self._slots_for(y.to(device=self.device, dtype=torch.int64))
        _scatter_add(self._counts, slots, torch.ones_like(slots))
        # Row chunks keep the float64 temporaries in cache and in the allocator's pools: a whole
        # 4096 x 768 batch at once ran at a quarter of the speed (page faults on every call).
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            self._add_rows(x[start : start + _CHUNK_ROWS], slots[start : start + _CHUNK_ROWS])
        self.sample_count += int(x.shape[0])

    def _add_rows(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        x = rows.to(device=self.device, dtype=_F64)
        # (x * x).sum(1), not vector_norm(x)**2: the square root and back would round, and
        # identical samples must give a within-class scatter of exactly 0.
        sq = (x * x).sum(dim=1)
        _scatter_add(self._sums, slots, x)
        _scatter_add(self._sq_norms, slots, sq)
        norms = sq.sqrt()
        nonzero = norms > 0
        inv = torch.where(nonzero, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        self.unit_sum += inv @ x
        self.unit_count += int(nonzero.sum())
        if self.second is not None:
            self.second.addmm_(x.T, x)
        if self.rff is not None and self.rff_sum is not None:
            phi = rff_features(rows, self.rff).to(_F64)
            self.rff_sum += phi.sum(dim=0)
            self.rff_sq += float((phi * phi).sum())

    def record_nc4(self, hits: int, total: int) -> None:
        """Add NC4 agreement counts measured at ingestion (capture counts them per batch)."""
        if total < 0 or hits < 0 or hits > total:
            raise ValueError(f"invalid NC4 counts: {hits} hits of {total}")
        self.nc4_hits += int(hits)
        self.nc4_total += int(total)

    # ----------------------------------------------------------------- merge
    def merge(self, other: CollapseStats) -> CollapseStats:
        """Add `other` into `self` exactly (sums of sums); returns `self`."""
        self._check_compatible(other)
        ids = other.class_ids.to(self.device)
        slots = self._slots_for(ids)
        _scatter_add(self._counts, slots, other.counts.to(self.device))
        _scatter_add(self._sums, slots, other.sums.to(self.device))
        _scatter_add(self._sq_norms, slots, other.sq_norms.to(self.device))
        self.unit_sum += other.unit_sum.to(self.device)
        self.unit_count += other.unit_count
        if self.second is not None and other.second is not None:
            self.second += other.second.to(self.device)
        self.sample_count += other.sample_count
        self.nc4_hits += other.nc4_hits
        self.nc4_total += other.nc4_total
        if self.rff_sum is not None and other.rff_sum is not None:
            self.rff_sum += other.rff_sum.to(self.device)
            self.rff_sq += other.rff_sq
        return self

    def __iadd__(self, other: CollapseStats) -> CollapseStats:
        return self.merge(other)

    def copy(self) -> CollapseStats:
        out = CollapseStats(
            self.num_classes,
            self.dim,
            second_moment=self.has_second_moment,
            rff=self.rff,
            device=self.device,
        )
        return out.merge(self)

    @classmethod
    def merged(cls, parts: list[CollapseStats]) -> CollapseStats:
        """The sum of several statistics (at least one), as a new object."""
        if not parts:
            raise ValueError("merged() needs at least one CollapseStats")
        out = parts[0].copy()
        for part in parts[1:]:
            out.merge(part)
        return out

    def _check_compatible(self, other: CollapseStats) -> None:
        mine = (self.num_classes, self.dim, self.has_second_moment, self.rff)
        theirs = (other.num_classes, other.dim, other.has_second_moment, other.rff)
        if mine != theirs:
            raise IncompatibleStats(
                "cannot merge statistics of (num_classes, dim, second_moment, rff) "
                f"{theirs} into {mine}"
            )

    # -------------------------------------------------------------- storage
    def _slots_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each class id, allocating rows for classes seen for the first time."""
        slots = self._slot[ids]
        missing = slots < 0
        if bool(missing.any()):
            new_ids = torch.unique(ids[missing])
            start = self._size
            self._reserve(start + int(new_ids.numel()))
            stop = start + int(new_ids.numel())
            self._slot[new_ids] = torch.arange(start, stop, device=self.device)
            self._class_ids[start:stop] = new_ids
            self._size = stop
            slots = self._slot[ids]
        return slots

    def _reserve(self, needed: int) -> None:
        """Grow row capacity geometrically so streaming updates copy each row O(1) times."""
        capacity = int(self._class_ids.numel())
        if needed <= capacity:
            return
        new_cap = min(self.num_classes, max(needed, 2 * capacity, 16))

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((new_cap, *t.shape[1:]), dtype=t.dtype, device=self.device)
            out[: self._size] = t[: self._size]
            return out

        self._class_ids = grow(self._class_ids)
        self._counts = grow(self._counts)
        self._sums = grow(self._sums)
        self._sq_norms = grow(self._sq_norms)

    def _load_rows(
        self, class_ids: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, sq: torch.Tensor
    ) -> None:
        """Install validated rows of classes not present yet (deserialisation, in chunks)."""
        if bool((self._slot[class_ids.to(self.device)] >= 0).any()):
            raise RuntimeError("_load_rows got a class that already has a row")
        slots = self._slots_for(class_ids.to(self.device))
        self._counts[slots] = counts.to(self.device)
        self._sums[slots] = sums.to(self.device, _F64)
        self._sq_norms[slots] = sq.to(self.device, _F64)

    def __repr__(self) -> str:
        return (
            f"CollapseStats(num_classes={self.num_classes}, dim={self.dim}, "
            f"samples={self.sample_count}, touched_classes={self._size}, "
            f"second_moment={self.has_second_moment})"
        )

    # Serialisation lives in monitor.stats.serialization; bound here for the public API.
    def to_bytes(self) -> bytes:
        from monitor.stats.serialization import stats_to_bytes

        return stats_to_bytes(self)

    @classmethod
    def from_bytes(cls, blob: bytes, *, device: str | torch.device = "cpu") -> CollapseStats:
        from monitor.stats.serialization import stats_from_bytes

        return stats_from_bytes(blob, device=device)
