"""Loading arrays for offline analysis from `.npy` or `.safetensors` files, never pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from monitor.errors import InvalidInput
from monitor.stats.validation import as_tensor


def load_array(path: str | Path, what: str) -> torch.Tensor:
    """One array from `.npy` (memory-mapped, `allow_pickle=False`) or a one-tensor `.safetensors`.

    A safetensors file with several tensors is refused unless one is named after `what`.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInput("missing_file", f"{what}: no such file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InvalidInput("malformed_file", f"{what}: cannot read {p}: {exc}") from exc
        if array.dtype.kind not in "fiu":
            raise InvalidInput("wrong_dtype", f"{what}: {p} holds dtype {array.dtype}")
        return as_tensor(array, what)
    if suffix == ".safetensors":
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise InvalidInput("malformed_file", f"{what}: cannot read {p}: {exc}") from exc
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        if what in tensors:
            return tensors[what]
        raise InvalidInput(
            "malformed_file",
            f"{what}: {p} holds {len(tensors)} tensors {sorted(tensors)}; "
            f"keep one, or name it {what!r}",
        )
    raise InvalidInput("malformed_file", f"{what}: {p} is neither .npy nor .safetensors")
