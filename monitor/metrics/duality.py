"""NC3 (self-duality of classifier and class means) and NC4 (linear vs nearest-centre decision).

Both walk the classes a tile at a time (`ClassMeans`, `HeadRows`): at K = 128,256, d = 4,096
the head rows in float64 alone would be 4.2 GB, and NC3's masked copies three more such.
"""

from __future__ import annotations

import torch

from monitor.metrics.nc4 import agreement_by_tiles, agreement_estimate
from monitor.metrics.report import Estimate
from monitor.metrics.rows import ClassMeans, HeadRows, tile_rows

_F64 = torch.float64
# Read at each call (tests shrink them to cross many blocks, chunks and tiles):
NC4_BLOCK_BYTES = 128 << 20  # float64 evaluation features converted at a time
NC4_MAX_ELEMENTS = 1 << 22  # values of one (sample chunk x class tile) product, 32 MB


def duality(head: HeadRows, classes: ClassMeans) -> tuple[float | None, float | None]:
    """(mean, CoV) over classes of cos(w_c, m_c); classes with a zero vector are left out."""
    k = classes.num_classes
    cos = torch.zeros(k, dtype=_F64, device=classes.device)
    valid = torch.zeros(k, dtype=torch.bool, device=classes.device)
    for start, stop in classes.tiles():
        w = head.weight_rows(start, stop)
        m = classes.centred(start, stop)
        wn = w.norm(dim=1)
        mn = m.norm(dim=1)
        ok = (wn > 0) & (mn > 0)
        valid[start:stop] = ok
        cos[start:stop] = torch.where(ok, (w * m).sum(dim=1) / (wn * mn), 0.0)
    if not bool(valid.any()):
        return None, None
    values = cos[valid]
    mean = float(values.mean())
    std = float(values.std(correction=0))
    return mean, (std / mean if mean != 0 else None)


def nc4_from_samples(
    features: torch.Tensor,
    classes: ClassMeans,
    head: HeadRows,
    *,
    max_samples: int,
    seed: int,
) -> Estimate:
    """Agreement fraction on `features`; a seeded uniform subsample above `max_samples` rows.

    Null with one class; a subsample reports the Wilson half-width
    (`agreement_estimate`). The class means and
    head rows are produced a tile at a time, once per block of up to 128 MB of features, so
    nothing of size K x d is built (`agreement_by_tiles`).
    """
    n = int(features.shape[0])
    if n == 0:
        return Estimate(None)
    sampled = n > max_samples
    if sampled:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:max_samples].to(features.device)
        features = features[rows]
        n = max_samples

    def class_rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (
            classes.means(start, stop),
            head.weight_rows(start, stop),
            head.bias_rows(start, stop),
        )

    dim = classes.dim
    class_tile = max(1, min(classes.num_classes, 4096, tile_rows(dim)))
    chunk = max(1, NC4_MAX_ELEMENTS // class_tile)
    block = max(chunk, tile_rows(dim, NC4_BLOCK_BYTES))
    agree = agreement_by_tiles(
        features, classes.num_classes, class_rows, class_tile=class_tile, chunk=chunk, block=block
    )
    return agreement_estimate(int(agree.sum()), n, classes.num_classes, sampled=sampled)
