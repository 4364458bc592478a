"""The LM head of each model (for NC3, NC4 and token text), loaded once per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from monitor.data.arrays import load_array
from monitor.evaluate.head_weights import read_head
from monitor.pipeline.embed import is_loaded
from monitor.pipeline.runtime import Runtime


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None  # (V,)
    token_text: Callable[[int], str]


def _plain(class_id: int) -> str:
    return f"#{class_id}"


def load_head(runtime: Runtime, model: str) -> Head | None:
    """The head of a checkpoint, or the classifier files of a features-only model, or None.

    Not cached here: the evaluator keeps what it loaded (the checkpoint itself is cached per
    process by `loaded_model`), so two runtimes never share a head by model name alone.
    """
    spec = runtime.registry.spec(model)
    head: Head | None = None
    if spec.checkpoint is not None and not is_loaded(runtime, model):
        from transformers import AutoTokenizer

        found = read_head(spec.checkpoint)
        if found is not None:  # the head alone, not the whole model (docs/architecture.md)
            tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint, local_files_only=True)

            def decode_only(class_id: int) -> str:
                return str(tokenizer.decode([class_id]))

            return Head(found[0], found[1], decode_only)
    if spec.checkpoint is not None:
        from monitor.pipeline.embed import loaded_model

        lm, tokenizer = loaded_model(runtime, model)
        layer = lm.get_output_embeddings()
        weight = getattr(layer, "weight", None)
        bias = getattr(layer, "bias", None)
        if isinstance(weight, torch.Tensor):

            def decode(class_id: int) -> str:
                return str(tokenizer.decode([class_id]))

            head = Head(
                weight.detach().float().cpu(),
                bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None,
                decode,
            )
    elif spec.classifier_path is not None:
        weight = load_array(spec.classifier_path, "classifier")
        bias = load_array(spec.bias_path, "bias") if spec.bias_path else None
        head = Head(weight, bias, _plain)
    return head
