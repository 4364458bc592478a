"""The batch checks of `monitor.stats.validation` for numpy arrays, torch-free.

A batch decoded from the wire is numpy; the API refuses a bad one before queueing it, in a
core install without torch. Same rules, reasons and messages as the tensor checks:
`validation.check_batch` hands numpy input here, so one implementation judges each input type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from monitor.errors import InvalidInput

FLOAT32_MAX = float(np.finfo(np.float32).max)  # largest feature magnitude accepted
# What torch.from_numpy turns into the tensor dtypes the tensor checks accept.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
INT_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8))


def check_array_values(x: np.ndarray, what: str = "features") -> None:
    """Refuse NaN/Inf (`non_finite`) and magnitudes beyond float32 (`value_out_of_range`)."""
    if x.size == 0 or x.dtype.kind != "f":
        return
    smallest, largest = float(np.min(x)), float(np.max(x))
    if smallest >= -FLOAT32_MAX and largest <= FLOAT32_MAX:  # also False for NaN
        return
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    finite = np.isfinite(rows)
    if not bool(finite.all()):
        bad_rows = int((~finite).any(axis=1).sum())
        raise InvalidInput("non_finite", f"{what} contain NaN or Inf in {bad_rows} row(s)")
    bad_rows = int((np.abs(rows) > FLOAT32_MAX).any(axis=1).sum())
    raise InvalidInput(
        "value_out_of_range",
        f"{what} exceed the float32 range (|value| <= {FLOAT32_MAX:.4g}) in {bad_rows} row(s)",
    )


def check_layout(
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    label_bounds: Callable[[], tuple[int, int]],
    dim: int,
    num_classes: int,
) -> None:
    """The checks a batch's shapes and label range must pass, whatever holds them (numpy or
    torch): `label_bounds` gives (min, max) of the labels, asked only for a non-empty batch."""
    if len(x_shape) != 2:
        raise InvalidInput("wrong_shape", f"features must be 2-D (N, dim), got shape {x_shape}")
    if len(y_shape) != 1:
        raise InvalidInput("wrong_shape", f"labels must be 1-D (N,), got shape {y_shape}")
    if x_shape[1] != dim:
        raise InvalidInput(
            "wrong_dimension", f"features have dimension {x_shape[1]}, these statistics use {dim}"
        )
    if x_shape[0] != y_shape[0]:
        raise InvalidInput("length_mismatch", f"{x_shape[0]} feature rows but {y_shape[0]} labels")
    if x_shape[0] == 0:
        raise InvalidInput("empty_batch", "empty batch: no samples to add")
    lo, hi = label_bounds()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise InvalidInput(
            "label_out_of_range", f"label {bad} is outside the vocabulary [0, {num_classes})"
        )


def check_arrays(features: np.ndarray, labels: np.ndarray, *, dim: int, num_classes: int) -> None:
    """Validate a numpy batch; raises `InvalidInput` naming the first problem found (the order
    and reasons of `validation.check_batch`)."""
    x, y = features, labels
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidInput(
            "wrong_dtype", f"features must be floating point (float16/32/64), got {x.dtype}"
        )
    if y.dtype not in INT_DTYPES:
        raise InvalidInput("wrong_dtype", f"labels must be integers, got {y.dtype}")
    check_layout(x.shape, y.shape, lambda: (int(y.min()), int(y.max())), dim, num_classes)
    check_array_values(x)
