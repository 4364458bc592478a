"""The LM head's weight and bias read alone from a checkpoint's safetensors files.

The evaluator needs only the head (V x d) of a model, not its layers: loading a whole Llama-3
8B (16 GB in bf16) to read a 128,256 x 4,096 matrix would blow any sensible memory budget of an
evaluator. The model's skeleton is built on the `meta` device (no memory) to learn which
parameter the head is, under every name it goes by when tied to the input embeddings; then
that one tensor is read from the (possibly sharded) safetensors files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def _tensor_files(root: Path) -> dict[str, Path] | None:
    """Tensor name -> file, for a single-file or sharded safetensors checkpoint; else None."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _names_of(model: Any, tensor: torch.Tensor) -> list[str]:
    """Every name the skeleton gives `tensor` (a tied head has two), with and without the
    base-model prefix, since some checkpoints store the base model's names."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor]
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    stripped = [n[len(prefix) + 1 :] for n in names if prefix and n.startswith(prefix + ".")]
    return names + stripped


def read_head(checkpoint: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the checkpoint's LM head in float32 on the CPU, read without loading
    the model; None when the checkpoint is not a local safetensors one or stores the head
    under a name the skeleton does not know (a legacy name): load the model whole then."""
    root = Path(checkpoint)
    files = _tensor_files(root) if root.is_dir() else None
    if files is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    layer = skeleton.get_output_embeddings()
    weight = _read(files, _names_of(skeleton, layer.weight))
    if weight is None:
        return None
    bias_param = getattr(layer, "bias", None)
    bias = None
    if isinstance(bias_param, torch.Tensor):
        bias = _read(files, _names_of(skeleton, bias_param))
        if bias is None:
            return None
    return weight, bias


def _read(files: dict[str, Path], names: list[str]) -> torch.Tensor | None:
    for name in names:
        path = files.get(name)
        if path is not None:
            with safe_open(str(path), framework="pt") as f:
                tensor: torch.Tensor = f.get_tensor(name)
                return tensor.to(torch.float32)
    return None
