"""2-D projection of class means: the current window against the baseline, on shared axes.

Both sets are projected onto the same two principal components of their union (centred at the
union's mean), so a class that moved between baseline and window moves on the page. float64
throughout: class means of a large model differ in the low digits when they collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from monitor.snapshot import TopDrift
from monitor.stats.collapse_stats import CollapseStats

__all__ = ["MeanProjection", "drift_ranking", "project_means", "top_drift_ids"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class MeanProjection:
    """Class ids and 2-D coordinates of both sets, and the share of variance each axis keeps."""

    base_ids: I64
    base_xy: F64  # (K_base, 2)
    current_ids: I64
    current_xy: F64  # (K_current, 2)
    explained: tuple[float, float]  # fraction of the union's variance on each component
    components: F64  # (2, d), unit rows, sign fixed (largest |loading| positive)
    centre: F64  # (d,)


def _kept(stats: CollapseStats, min_count: int, max_classes: int) -> tuple[I64, F64, I64]:
    """Ids, means and counts of the classes with n_c >= min_count, at most the most frequent."""
    rows = stats.classes(min_count=min_count)
    ids = rows.class_ids.cpu().numpy().astype(np.int64)
    counts = rows.counts.cpu().numpy().astype(np.int64)
    means = rows.means().to(torch.float64).cpu().numpy()
    if ids.size > max_classes:
        # Most frequent first; ties broken by class id so the choice is reproducible.
        order = np.lexsort((ids, -counts))[:max_classes]
        order.sort()
        ids, means, counts = ids[order], means[order], counts[order]
    return ids, means, counts


def project_means(
    baseline: CollapseStats,
    current: CollapseStats,
    *,
    min_count: int = 2,
    max_classes: int = 1000,
) -> MeanProjection | None:
    """Project both sets of class means onto the top-2 principal axes of their union.

    `max_classes` caps each set at its most frequent classes (a page cannot show 50k points,
    and the eigenproblem of the union stays small). None when fewer than 3 means are
    available in all or the width is below 2: no plane to draw.
    """
    if baseline.dim != current.dim:
        raise ValueError(f"baseline width {baseline.dim} differs from the window's {current.dim}")
    base_ids, base_means, _ = _kept(baseline, min_count, max_classes)
    cur_ids, cur_means, _ = _kept(current, min_count, max_classes)
    union = np.concatenate([base_means, cur_means], axis=0)
    if union.shape[0] < 3 or union.shape[1] < 2:
        return None
    centre = union.mean(axis=0)
    comps, power = _top_two(union - centre)
    total = float(((union - centre) ** 2).sum())
    explained = (power[0] / total, power[1] / total) if total > 0 else (0.0, 0.0)
    return MeanProjection(
        base_ids=base_ids,
        base_xy=(base_means - centre) @ comps.T,
        current_ids=cur_ids,
        current_xy=(cur_means - centre) @ comps.T,
        explained=explained,
        components=comps,
        centre=centre,
    )


def _top_two(centred: F64) -> tuple[F64, tuple[float, float]]:
    """The two leading principal axes (2, d) of centred rows and the variance along each.

    An eigendecomposition of the smaller of the Gram matrix (n x n) and the scatter matrix
    (d x d), not an SVD of the rows: 2000 means of width 4096 take ~2.5 s instead of ~22 s
    on one core, and float64 keeps the leading axes exact to rounding.
    """
    x = torch.from_numpy(centred)
    n, d = x.shape
    if n <= d:
        values, vectors = torch.linalg.eigh(x @ x.T)
        lead = vectors[:, [-1, -2]]  # eigh sorts ascending
        axes = (x.T @ lead).T  # (2, d), norm sqrt(eigenvalue)
    else:
        values, vectors = torch.linalg.eigh(x.T @ x)
        axes = vectors[:, [-1, -2]].T.clone()
    power = (max(float(values[-1]), 0.0), max(float(values[-2]), 0.0))
    comps = axes.numpy().astype(np.float64)
    norms = np.linalg.norm(comps, axis=1)
    if norms[0] == 0:  # every mean identical: any plane shows them as one point
        comps[0] = np.eye(1, d, 0)[0]
        norms[0] = 1.0
    comps[0] /= norms[0]
    if norms[1] <= 1e-12 * norms[0]:  # means on one line: any orthogonal second axis will do
        basis = np.eye(d)[int(np.argmin(np.abs(comps[0])))]
        comps[1] = basis - (basis @ comps[0]) * comps[0]
        norms[1] = float(np.linalg.norm(comps[1]))
    comps[1] /= norms[1]
    for row in comps:  # eigenvector signs are arbitrary; fix them so reruns draw the same
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1.0
    return comps, power


def drift_ranking(
    baseline: CollapseStats, current: CollapseStats, *, min_count: int = 2, top: int = 10
) -> list[int]:
    """Class ids in both sets, by count-weighted cosine distance of their means, largest first.

    Used when the snapshot carries no `top_drift` (the same ordering the evaluator reports:
    a class's contribution to `drift_class_mean_cos` is its weight times 1 - cos).
    """
    b = baseline.classes(min_count=min_count)
    c = current.classes(min_count=min_count)
    b_ids, c_ids = b.class_ids.cpu().numpy(), c.class_ids.cpu().numpy()
    common, bi, ci = np.intersect1d(b_ids, c_ids, return_indices=True)
    if common.size == 0:
        return []
    bm = b.means().cpu().numpy()[bi]
    cm = c.means().cpu().numpy()[ci]
    norms = np.linalg.norm(bm, axis=1) * np.linalg.norm(cm, axis=1)
    cos = np.where(norms > 0, (bm * cm).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    weight = c.counts.cpu().numpy()[ci].astype(np.float64)
    score = weight * (1.0 - cos)
    order = np.lexsort((common, -score))[:top]
    return [int(common[i]) for i in order]


def top_drift_ids(top_drift: list[TopDrift], top: int = 10) -> list[int]:
    """The snapshot's most drifted classes, by contribution, largest first."""
    ranked = sorted(top_drift, key=lambda t: (-t.contribution, t.class_id))
    return [t.class_id for t in ranked[:top]]
