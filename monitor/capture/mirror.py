"""Mirror capture: rerun sampled traffic teacher-forced on a worker, serving stays untouched.

`embed_batches` pads token sequences into batches, runs one forward pass per batch and yields
exactly what the probe would ship for that forward (it attaches a `CollapseProbe` with rate 1 and
collects its rows synchronously), so both ways in share one labelling code path. NC4 hits come
from the same hidden states and the head's weights (no second forward pass, no full logits: when
the model supports `logits_to_keep`, the head only scores the last position).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch

from monitor.capture.probe import CollapseProbe
from monitor.capture.sampling import SamplingPolicy
from monitor.capture.shipping import Chunk, assemble_batch
from monitor.capture.sinks import CaptureBatch, NC4Reference
from monitor.errors import InvalidInput

DTypeArg = torch.dtype | Literal["auto"] | None


class _ListTarget:
    """A `ChunkTarget` that keeps every chunk (the mirror runs synchronously)."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []

    def offer(self, chunk: Chunk) -> bool:
        self.chunks.append(chunk)
        return True

    def has_room(self, rows: int) -> bool:
        return True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(device: torch.device, dtype: DTypeArg) -> torch.dtype | None:
    """`"auto"`: bf16 on CUDA when supported, else fp16; on CPU keep the model's dtype."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: DTypeArg = "auto",
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local directory or a hub id, ready for inference.

    `local_files_only` defaults to True for a local directory or when `HF_HUB_OFFLINE=1`, so an
    air-gapped worker never tries the network; a missing model raises `InvalidInput`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    local = Path(source).is_dir()
    offline = local_files_only if local_files_only is not None else (local or _offline())
    model: Any
    tokenizer: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline)
    except OSError as exc:
        hint = " (HF_HUB_OFFLINE=1: only local files are used)" if offline else ""
        raise InvalidInput("model_not_found", f"cannot load model {source!r}{hint}: {exc}") from exc
    dev = torch.device(device)
    model = model.to(device=dev, dtype=resolve_dtype(dev, dtype))
    model.eval()
    return model, tokenizer


def _encode(
    tokenizer: Any, inputs: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor, vocab: int
) -> list[list[int]]:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim != 2:
            raise InvalidInput("wrong_shape", "token ids must be a 2-D tensor or a list of lists")
        seqs = [[int(v) for v in row] for row in inputs.tolist()]
    elif all(isinstance(x, str) for x in inputs):
        if tokenizer is None:
            raise InvalidInput("no_tokenizer", "texts need a tokenizer")
        seqs = [list(tokenizer(str(x), add_special_tokens=False)["input_ids"]) for x in inputs]
    elif any(isinstance(x, str) for x in inputs):
        raise InvalidInput("mixed_inputs", "inputs mix texts and token ids")
    else:
        seqs = [[int(v) for v in cast_ids(x)] for x in inputs]
    for seq in seqs:
        if seq and (min(seq) < 0 or max(seq) >= vocab):
            raise InvalidInput(
                "label_out_of_range", f"token id outside the vocabulary [0, {vocab})"
            )
    return seqs


def cast_ids(x: object) -> Sequence[int]:
    """A row of token ids as a sequence of ints (lists, tuples, 1-D tensors, numpy arrays)."""
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.flatten().tolist()]
    if isinstance(x, Sequence) or hasattr(x, "__iter__"):
        return [int(v) for v in cast(Iterable[Any], x)]
    raise InvalidInput("wrong_type", f"expected a sequence of token ids, got {type(x).__name__}")


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_len) int64, padded on `side`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, seq in enumerate(seqs):
        n = len(seq)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(list(seq), dtype=torch.int64)
        mask[i, sl] = 1
    return ids, mask


def embed_batches(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: DTypeArg = "auto",
    *,
    reference: NC4Reference | None = None,
    max_length: int | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> Iterator[CaptureBatch]:
    """Teacher-forced forward over `inputs` in batches; yields one `CaptureBatch` per batch.

    Texts are tokenised without special tokens; sequences longer than `max_length` (default:
    the model's context size) are truncated, sequences under two tokens are skipped (they have no
    labelled position). `device`/`dtype` move the model when they differ from its own. NC4 hits
    are counted against `reference` when given.
    """
    if batch_size < 1:
        raise InvalidInput("invalid_batch_size", f"batch_size must be >= 1, got {batch_size}")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, torch.nn.Module):
        raise InvalidInput("no_output_embeddings", f"{type(model).__name__} has no LM head")
    param = next(model.parameters())
    dev = torch.device(device) if device is not None else param.device
    target_dtype = resolve_dtype(dev, dtype)
    if dev != param.device or (target_dtype is not None and target_dtype != param.dtype):
        model.to(device=dev, dtype=target_dtype)
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 2**62
    seqs = _encode(tokenizer, inputs, vocab)
    config = getattr(model, "config", None)
    limit = max_length or getattr(config, "n_positions", None)
    limit = limit or getattr(config, "max_position_embeddings", None)
    if limit:
        seqs = [s[: int(limit)] for s in seqs]
    seqs = [s for s in seqs if len(s) >= 2]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    if "use_cache" in params:
        extra["use_cache"] = False
    target = _ListTarget()
    probe = CollapseProbe(model, target, SamplingPolicy(token_rate=1.0, seed=0), positions="both")
    try:
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start : start + batch_size], int(pad_id), padding_side)
            ids, mask = ids.to(dev), mask.to(dev)
            kwargs = dict(extra)
            if "position_ids" in params:
                kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, **kwargs)
            if probe.counters.errors:
                raise InvalidInput("capture_failed", f"mirror capture failed: {probe.last_error}")
            chunks, target.chunks = target.chunks, []
            batch, _ = assemble_batch(chunks, reference, "mirror")
            if len(batch):
                yield batch
    finally:
        probe.detach()
