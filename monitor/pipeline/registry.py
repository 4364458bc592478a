"""The models the service watches, with the sizes their statistics need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from monitor.config import ModelSpec, Settings
from monitor.errors import InvalidInput


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    dim: int
    second_moment: bool


def _checkpoint_sizes(checkpoint: str) -> tuple[int, int]:
    """Vocabulary size and hidden width from a checkpoint's config, without loading weights."""
    local = Path(checkpoint) / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
        vocab = config.get("vocab_size")
        dim = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    else:  # a hub id: honours HF_HUB_OFFLINE and the local cache
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(checkpoint)
        vocab = getattr(cfg, "vocab_size", None)
        dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(vocab, int) or not isinstance(dim, int):
        raise InvalidInput(
            "unknown_model", f"cannot read vocab_size and hidden size of {checkpoint}"
        )
    return vocab, dim


class ModelRegistry:
    """Declared models by name; anything else is refused as `unknown_model`."""

    def __init__(self, settings: Settings) -> None:
        self._specs = {m.name: m for m in settings.models}
        self._shapes: dict[str, ModelShape] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise InvalidInput(
                "unknown_model",
                f"model {name!r} is not declared (COLLAPSE_MODELS); known: {self.names}",
            )
        return spec

    def shape(self, name: str) -> ModelShape:
        if name not in self._shapes:
            spec = self.spec(name)
            if spec.vocab_size is not None and spec.dim is not None:
                vocab, dim = spec.vocab_size, spec.dim
            else:
                assert spec.checkpoint is not None  # guaranteed by ModelSpec's validator
                vocab, dim = _checkpoint_sizes(spec.checkpoint)
            self._shapes[name] = ModelShape(name, vocab, dim, spec.second_moment)
        return self._shapes[name]
