"""The study's scale quantities, beside the METRICS.md keys, for final and per-layer states.

Study-only quantities, not METRICS.md keys (docs/metrics.md defines them):
class_mean_sq_norm = mean over the kept classes of ||mu_c - mu_G||^2, the squared scale of the
class means; nc1_cdnv2_scale_free = nc1_cdnv2 * class_mean_sq_norm, which does not change when
the features are multiplied by a constant (nc1_cdnv2 scales as 1 / constant^2).
"""

from __future__ import annotations

import torch

from monitor.metrics.rows import ClassMeans
from monitor.stats import CollapseStats

DERIVED_KEYS: tuple[str, ...] = ("class_mean_sq_norm", "nc1_cdnv2_scale_free")


def class_mean_sq_norm(stats: CollapseStats, min_count: int, device: torch.device) -> float | None:
    """Mean over the kept classes of ||mu_c - mu_G||^2 (the metrics' classes and centring)."""
    kept = stats.classes(min_count=min_count)
    if kept.num_classes < 2:
        return None
    norms = ClassMeans(kept, device).centred_norms()
    return float((norms * norms).mean())


def derived_values(
    metrics: dict[str, float | int | None], scale2: float | None
) -> dict[str, float | None]:
    """DERIVED_KEYS from the report and the squared class-mean scale."""
    cdnv2 = metrics.get("nc1_cdnv2")
    free = None if cdnv2 is None or scale2 is None else float(cdnv2) * scale2
    return {"class_mean_sq_norm": scale2, "nc1_cdnv2_scale_free": free}
