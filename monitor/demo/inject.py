"""The injected collapse: the model's final normalisation layer squeezed onto a few directions.

Why this fault: the state the monitor measures is the output of the final norm (the LM head's
input), so a corrupted final norm is the most direct real-world collapse (a bad fine-tune, a
quantisation bug, a broken checkpoint merge). Keeping only `keep` of the norm's gains projects
every hidden state onto a `keep`-dimensional subspace: class means blur together (CDNV up),
the covariance loses rank, and the distribution moves far from the baseline (MMD up). The
model keeps serving (its completions turn to nonsense), exactly as a silent failure would.
The weights are changed in place under `torch.no_grad()` and restored bit for bit.
"""

from __future__ import annotations

import torch

from monitor.errors import InvalidInput

# Where common causal LMs keep their final norm (GPT-2/Neo/J, Llama/Qwen/Mistral, GPT-NeoX, OPT).
_FINAL_NORM_PATHS = (
    "transformer.ln_f",
    "model.norm",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "model.final_layernorm",
)


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    found: object = module
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found if isinstance(found, torch.nn.Module) else None


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The model's final normalisation layer (a module with a 1-D `weight` of gains)."""
    for path in _FINAL_NORM_PATHS:
        module = _get(model, path)
        if module is not None and _gains(module) is not None:
            return module
    raise InvalidInput(
        "no_final_norm",
        f"cannot find the final norm of {type(model).__name__} (looked for "
        f"{', '.join(_FINAL_NORM_PATHS)}); run the demo with --no-inject",
    )


def _gains(module: torch.nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None


class NormCollapse:
    """Zero all but `keep` randomly chosen gains of the final norm; `restore` undoes it."""

    description = "final norm collapsed onto {keep} of {dim} directions"

    def __init__(self, model: torch.nn.Module, keep: int = 4, seed: int = 0) -> None:
        self.norm = final_norm(model)
        gains = _gains(self.norm)
        assert gains is not None  # final_norm checked it
        self.dim = int(gains.shape[0])
        if not 1 <= keep < self.dim:
            raise InvalidInput("invalid_keep", f"keep must be in [1, {self.dim - 1}], got {keep}")
        self.keep = keep
        gen = torch.Generator().manual_seed(seed)
        self._mask = torch.zeros(self.dim, dtype=gains.dtype)
        self._mask[torch.randperm(self.dim, generator=gen)[:keep]] = 1
        self._saved: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def describe(self) -> str:
        return self.description.format(keep=self.keep, dim=self.dim)

    def apply(self) -> None:
        if self._saved is not None:
            return
        gains = _gains(self.norm)
        assert gains is not None
        with torch.no_grad():
            self._saved = gains.detach().clone()
            gains.mul_(self._mask.to(gains.device))

    def restore(self) -> None:
        if self._saved is None:
            return
        gains = _gains(self.norm)
        assert gains is not None
        with torch.no_grad():
            gains.copy_(self._saved)
        self._saved = None
