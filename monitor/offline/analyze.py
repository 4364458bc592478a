"""`analyze`: the metrics of saved features, labels and (optionally) the LM head."""

from __future__ import annotations

from collections.abc import Callable

import torch

from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.metrics import MetricReport, compute_metrics
from monitor.metrics.engine import resolve_device
from monitor.stats import CollapseStats

_CHUNK = 65_536


def analyze_arrays(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    classifier: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eval_features: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    settings: Settings | None = None,
    second_moment: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> MetricReport:
    """Accumulate statistics in chunks (calling `progress(done, total)`), then compute metrics.

    The vocabulary size is the classifier's row count, else the largest label + 1. NC4 runs on
    the eval set when given, else on the analysed features themselves. Metric options come
    from `settings` (default: the environment's).
    """
    options = settings if settings is not None else Settings()
    if labels.ndim != 1 or labels.numel() == 0:
        raise InvalidInput(
            "wrong_shape", f"labels must be a non-empty 1-D array, got {tuple(labels.shape)}"
        )
    if features.ndim != 2:
        raise InvalidInput(
            "wrong_shape", f"features must be 2-D (N, d), got {tuple(features.shape)}"
        )
    if eval_labels is not None and eval_features is None:
        raise InvalidInput("wrong_shape", "--eval-labels needs --eval-features")
    if (
        eval_features is not None
        and eval_labels is not None
        and eval_labels.shape[0] != eval_features.shape[0]
    ):
        raise InvalidInput(
            "length_mismatch",
            f"{eval_features.shape[0]} eval feature rows but {eval_labels.shape[0]} eval labels",
        )
    if classifier is not None:
        if classifier.ndim != 2:
            raise InvalidInput(
                "wrong_shape", f"classifier must be 2-D (V, d), got {tuple(classifier.shape)}"
            )
        num_classes = int(classifier.shape[0])
    else:
        num_classes = int(labels.max()) + 1 if not labels.is_floating_point() else 1
    for name, y in (("labels", labels), ("eval labels", eval_labels)):
        if y is not None and y.numel() and not y.is_floating_point():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise InvalidInput(
                    "label_out_of_range",
                    f"{name}: label {bad} is outside the vocabulary [0, {num_classes})",
                )
    stats = CollapseStats(
        max(num_classes, 1),
        int(features.shape[1]),
        second_moment=second_moment,
        device=resolve_device(options.device),
    )
    total = int(features.shape[0])
    if labels.shape[0] != total:
        raise InvalidInput("length_mismatch", f"{total} feature rows but {labels.shape[0]} labels")
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
        stats.update(features[start:stop], labels[start:stop])
        if progress is not None:
            progress(stop, total)
    return compute_metrics(
        stats,
        classifier,
        bias,
        eval_features=eval_features if eval_features is not None else features,
        **options.metric_options(),
    )
