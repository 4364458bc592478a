"""Checks a batch of (features, labels) before anything is accumulated.

Every check runs before the statistics change, so a refused batch leaves them untouched. Each
failure is an `InvalidInput` whose `reason` is the label the pipeline counts rejections by.

Feature values must be finite *and* lie within the float32 range (`FLOAT32_MAX`), whatever
dtype they arrive in: the random-feature map projects in float32, so a finite float64 value
beyond it (1e39) became inf there and NaN in the sums, and poisoned every state it was merged
into. Inside that range every later step stays finite: squares (<= 1.2e77) and their sums in
float64, the float32 projection (rows that overflow it are redone in float64, `rff.py`), and
the median-heuristic bandwidth. Refusing at the door, with its own reason, is the one check
every path (HTTP, Celery message, embed worker, baseline import) passes through.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from monitor.errors import InvalidInput
from monitor.stats.checks import FLOAT32_MAX, check_arrays, check_layout

ArrayLike: TypeAlias = torch.Tensor | np.ndarray

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def as_tensor(value: ArrayLike, what: str) -> torch.Tensor:
    """A torch view of a numpy array or tensor, without copying where possible."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == np.float16 or value.dtype.kind in "fiub":
            with warnings.catch_warnings():
                # Read-only arrays (memory maps, wire buffers) are fine: nothing here writes.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(np.ascontiguousarray(value))
        raise InvalidInput("wrong_dtype", f"{what}: unsupported dtype {value.dtype}")
    raise InvalidInput(
        "wrong_type",
        f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}",
    )


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: min and max propagate NaN and reach +-Inf, so one cheap
    reduction replaces an elementwise mask (isfinite(x).all() was the slowest step of update)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    smallest, largest = torch.aminmax(t)
    return bool(torch.isfinite(smallest)) and bool(torch.isfinite(largest))


def check_values(x: torch.Tensor, what: str = "features") -> None:
    """Refuse NaN/Inf (`non_finite`) and magnitudes beyond float32 (`value_out_of_range`).

    One aminmax pass decides in the common case; the rows at fault are counted only for the
    message of a refusal.
    """
    if x.numel() == 0 or not x.is_floating_point():
        return
    smallest, largest = (float(v) for v in torch.aminmax(x))
    if smallest >= -FLOAT32_MAX and largest <= FLOAT32_MAX:  # also False for NaN
        return
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        bad_rows = int((~finite).any(dim=1).sum())
        raise InvalidInput("non_finite", f"{what} contain NaN or Inf in {bad_rows} row(s)")
    bad_rows = int((rows.abs() > FLOAT32_MAX).any(dim=1).sum())
    raise InvalidInput(
        "value_out_of_range",
        f"{what} exceed the float32 range (|value| <= {FLOAT32_MAX:.4g}) in {bad_rows} row(s)",
    )


def check_batch(
    features: ArrayLike, labels: ArrayLike, *, dim: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch; returns (features, labels) as tensors, unconverted.

    Raises `InvalidInput` naming the first problem found: shape, dtype, empty batch, mismatched
    lengths, labels outside `[0, num_classes)`, non-finite features, or features beyond the
    float32 range. numpy input is checked by `checks.check_arrays` (the same rules, torch-free:
    the API runs them in a core install) and returned as tensors.
    """
    if isinstance(features, np.ndarray) and isinstance(labels, np.ndarray):
        check_arrays(features, labels, dim=dim, num_classes=num_classes)
        return as_tensor(features, "features"), as_tensor(labels, "labels")
    x = as_tensor(features, "features")
    y = as_tensor(labels, "labels")
    if x.dtype not in _FLOAT_DTYPES:
        raise InvalidInput(
            "wrong_dtype",
            f"features must be floating point (float16/bfloat16/32/64), got {x.dtype}",
        )
    if y.dtype not in _INT_DTYPES:
        raise InvalidInput("wrong_dtype", f"labels must be integers, got {y.dtype}")
    check_layout(
        tuple(x.shape), tuple(y.shape), lambda: (int(y.min()), int(y.max())), dim, num_classes
    )
    check_values(x)
    return x, y


@dataclass(frozen=True)
class CheckedBatch:
    """Features and labels that passed every check for (`dim`, `num_classes`).

    `CollapseStats.add_checked` takes them without checking again: a batch is validated once
    on its way in (the worker decodes and checks a payload, then summarises it), not once per
    layer it passes through.
    """

    features: torch.Tensor
    labels: torch.Tensor
    dim: int
    num_classes: int

    @classmethod
    def check(
        cls, features: ArrayLike, labels: ArrayLike, *, dim: int, num_classes: int
    ) -> CheckedBatch:
        """Run `check_batch`; raises `InvalidInput` like it."""
        x, y = check_batch(features, labels, dim=dim, num_classes=num_classes)
        return cls(x, y, dim, num_classes)

    @classmethod
    def of_checked_arrays(
        cls, features: np.ndarray, labels: np.ndarray, *, dim: int, num_classes: int
    ) -> CheckedBatch:
        """Arrays that `checks.check_arrays` already accepted for (dim, num_classes), e.g. by
        `Ingestor.validate`: viewed as tensors, not checked again."""
        return cls(as_tensor(features, "features"), as_tensor(labels, "labels"), dim, num_classes)
