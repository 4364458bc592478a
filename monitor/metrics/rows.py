"""Class means, centred means and head rows of the kept classes, a tile of rows at a time.

At an LLM's size (K = 128,256 classes, d = 4,096) one K x d float64 matrix is 4.2 GB, as large
as the statistics themselves, and the metric engine used to hold about seven of them (kept sums,
means, centred means, head rows, and the temporaries of NC3). Every metric here reduces over
classes, so each of these matrices can be produced a tile of rows at a time from the class sums
and the head as stored: `ClassMeans` derives `mu_c = s_c / n_c` and `m_c = mu_c - mu_G` per
tile, `HeadRows` gathers and upcasts the head's rows per tile (the head stays in its own dtype,
bf16/fp16/fp32). Each row has the same value as the whole-matrix expression gave; only `mu_G`,
a sum over tiles, may differ from a one-shot mean in the last bits.

`ClassMeans.materialise` builds the one (K, d) matrix of centred means, for the exact pair
walk (which reads every tile K / tile times) and for a compute device other than the storage's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from monitor.stats import ClassStatistics

_F64 = torch.float64
TILE_BYTES = 32 << 20  # about 32 MB of float64 rows per tile (read at each call: tests shrink it)


def tile_rows(dim: int, tile_bytes: int | None = None) -> int:
    """Rows of `dim` float64 values that fit in `tile_bytes` (default `TILE_BYTES`; at least 1)."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    return max(1, budget // (8 * max(1, dim)))


def row_ranges(count: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive tiles of `step` rows covering 0..count-1."""
    for start in range(0, count, step):
        yield start, min(start + step, count)


class ClassMeans:
    """`mu_c` and `m_c = mu_c - mu_G` of the kept classes on `device`, tile by tile.

    `mu_G` (the unweighted mean of the class means, METRICS.md) is computed once, in one pass
    over the sums; nothing of size K x d is kept unless `materialise` is called.
    """

    def __init__(
        self, kept: ClassStatistics, device: torch.device, *, tile: int | None = None
    ) -> None:
        self.kept = kept
        self.device = device
        self.num_classes = kept.num_classes
        self.dim = int(kept.storage.shape[1])
        self.tile = tile if tile is not None else tile_rows(self.dim)
        self._centred: torch.Tensor | None = None
        total = torch.zeros(self.dim, dtype=_F64, device=kept.storage.device)
        for start, stop in self.tiles():
            total += kept.mean_tile(start, stop).sum(dim=0)
        k = self.num_classes
        self.centre = (total / k if k else total).to(device)

    def tiles(self) -> Iterator[tuple[int, int]]:
        return row_ranges(self.num_classes, self.tile)

    def means(self, start: int, stop: int) -> torch.Tensor:
        """mu_c for classes start..stop-1, (T, d) float64 on the device."""
        return self.kept.mean_tile(start, stop).to(self.device)

    def centred(self, start: int, stop: int) -> torch.Tensor:
        """m_c for classes start..stop-1 (a view of the materialised matrix when there is one)."""
        if self._centred is not None:
            return self._centred[start:stop]
        return self.means(start, stop).sub_(self.centre)

    def take_centred(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """m_c for the classes at positions `index`, (len, d) float64 on the device (a new
        tensor, or `out`: reused by callers that take rows many times)."""
        if self._centred is not None:
            if out is None:
                return self._centred.index_select(0, index)
            return torch.index_select(self._centred, 0, index, out=out)
        storage = self.kept.storage.device
        if storage != self.device:
            rows = self.kept.take_means(index.to(storage)).to(self.device)
            return rows.sub_(self.centre) if out is None else out.copy_(rows).sub_(self.centre)
        return self.kept.take_means(index, out=out).sub_(self.centre)

    def centred_norms(self) -> torch.Tensor:
        """||m_c|| for every class, (K,) float64 on the device."""
        out = torch.empty(self.num_classes, dtype=_F64, device=self.device)
        for start, stop in self.tiles():
            out[start:stop] = self.centred(start, stop).norm(dim=1)
        return out

    def materialise(self) -> torch.Tensor:
        """The (K, d) centred means on the device, built once (the only K x d this makes)."""
        if self._centred is None:
            out = torch.empty(self.num_classes, self.dim, dtype=_F64, device=self.device)
            for start, stop in self.tiles():
                out[start:stop] = self.centred(start, stop)
            self._centred = out
        return self._centred


class HeadRows:
    """The LM head's rows (and biases) of the kept classes, upcast to float64 a tile at a time.

    `weight` (V, d) stays as given (an LLM head is bf16/fp16/fp32: upcasting all of it would be
    a V x d float64 copy); each tile gathers its rows and converts them, which gives the same
    float64 values as converting the whole head first.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        class_ids: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.weight = weight
        self.bias = bias
        self.ids = class_ids.to(weight.device)
        self.device = device

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """w_c for classes start..stop-1, (T, d) float64 on the device."""
        return self.weight[self.ids[start:stop]].to(self.device, _F64)

    def bias_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """b_c for classes start..stop-1, (T,) float64, or None for a head without bias."""
        if self.bias is None:
            return None
        return self.bias[self.ids[start:stop].to(self.bias.device)].to(self.device, _F64)
