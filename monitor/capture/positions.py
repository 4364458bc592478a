"""Per-call bookkeeping of the probe: which states a forward call produced and their labels.

Kept apart from the hooks so the rules are in one place: the state at position t is labelled
with token t+1 when both positions are real (attention mask 1); a request's prompt length is the
length of its first forward call; after an end-of-sequence token a finished row's padding is
not counted. Every helper works on shapes and index tensors only, so nothing here forces the
accelerator to synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from monitor.errors import InvalidInput


@dataclass
class CallInputs:
    """What the hooks of one forward call collect before the model's forward returns."""

    input_ids: torch.Tensor | None
    mask: torch.Tensor | None
    past: int  # positions already in the cache before this call
    decoder_out: torch.Tensor | None = None
    head_in: torch.Tensor | None = None


@dataclass
class PendingStates:
    """Sampled states of a call's last position, waiting for their next token."""

    features: torch.Tensor  # (R, d) on the model's device
    rows: torch.Tensor  # (R,) int64 on the model's device
    valid: torch.Tensor  # (R,) bool on the model's device
    pos: int  # absolute position of these states in the sequence


@dataclass
class RequestState:
    """One batch of requests, followed across the forward calls of a `generate()`."""

    batch: int
    prompt_len: int
    next_pos: int
    rows_on: torch.Tensor  # (B,) bool CPU: request-level sampling decision
    alive: torch.Tensor | None = None  # (B,) bool device: no end-of-sequence generated yet
    pending: PendingStates | None = None


def last_hidden(output: Any) -> torch.Tensor | None:
    """The last hidden state of a decoder's output (tensor, ModelOutput or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def take(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`t[rows, cols]` for a (B, T, ...) tensor and CPU index tensors, as one flat gather.

    On the CPU, advanced indexing with two index tensors can cost milliseconds where a flat
    `index_select` costs microseconds, which matters on the request path.
    """
    flat = (rows * int(t.shape[1]) + cols).to(t.device, non_blocking=True)
    if t.is_contiguous():
        return t.reshape(int(t.shape[0]) * int(t.shape[1]), *t.shape[2:]).index_select(0, flat)
    return t[rows.to(t.device, non_blocking=True), cols.to(t.device, non_blocking=True)]


def head_states(call: CallInputs, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """(B, T', d) states of the call's last T' positions, and the offset T - T'.

    The head may see only a suffix (`logits_to_keep` in `generate()`); then the decoder's output
    is used instead, but only when the head's input is literally a view of its last positions,
    so what is measured is always what the head receives.
    """
    head_in = call.head_in
    if head_in is None or head_in.ndim != 3 or head_in.shape[0] != batch:
        raise InvalidInput("no_head_input", "the LM head did not receive a (B, T, d) input")
    seen = int(head_in.shape[1])
    dec = call.decoder_out
    if seen < length and dec is not None and dec.shape == (batch, length, head_in.shape[2]):
        tail = dec[:, length - seen :]
        same = tail.data_ptr() == head_in.data_ptr() and tail.stride() == head_in.stride()
        if same and dec.untyped_storage().data_ptr() == head_in.untyped_storage().data_ptr():
            return dec, 0
    return head_in, length - seen


def mask_at(
    mask: torch.Tensor | None,
    rows: torch.Tensor,
    pos: torch.Tensor,
    end: int,
    device: torch.device,
) -> torch.Tensor:
    """Mask values (bool, on `device`) at absolute positions; the mask ends at position `end`."""
    if mask is None:
        return torch.ones(rows.shape, dtype=torch.bool, device=device)
    return take(mask, rows, pos + (int(mask.shape[1]) - end)).bool()


def mask_column(mask: torch.Tensor | None, pos: int, end: int) -> torch.Tensor | None:
    """(B,) bool mask column at absolute position `pos`; None when there is no mask."""
    if mask is None:
        return None
    return mask[:, pos + int(mask.shape[1]) - end].bool()


def alive_positions(
    req: RequestState, ids: torch.Tensor, past: int, eos: torch.Tensor | None
) -> torch.Tensor | None:
    """(B, T) device bool: no end-of-sequence among generated tokens up to each position.

    None means "all alive" (no generated tokens in this call, or no EOS token configured).
    Updates `req.alive` for the next call.
    """
    first = req.prompt_len - past  # index of the first generated token in this call
    if first >= ids.shape[1] or eos is None:
        return None
    if req.alive is None:
        req.alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    first = max(first, 0)
    ended = torch.isin(ids[:, first:], eos).cumsum(dim=1) > 0
    tail = req.alive[:, None] & ~ended
    req.alive = tail[:, -1].clone()
    head = torch.ones(ids.shape[0], first, dtype=torch.bool, device=ids.device)
    return torch.cat([head, tail], dim=1)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head (`get_output_embeddings()`), or a clear `InvalidInput` when there is none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, torch.nn.Module):
        raise InvalidInput(
            "no_output_embeddings",
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned "
            f"{type(head).__name__}); the probe needs a causal LM with an LM head",
        )
    return head


def find_decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack (`get_decoder()`) whose output feeds the head, when there is one."""
    getter = getattr(model, "get_decoder", None)
    try:
        decoder = getter() if callable(getter) else None
    except Exception:
        return None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def past_length(ids: torch.Tensor | None, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
    """Positions already cached before this call: from shapes when a mask is given."""
    if ids is not None and mask is not None:
        return max(int(mask.shape[1]) - int(ids.shape[1]), 0)
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            return int(length())
        except Exception:
            return 0
    return 0
