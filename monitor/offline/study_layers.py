"""Per-layer collapse statistics for `study --layers`, which Wu & Papyan leave out.

One extra teacher-forced pass over the train windows with `output_hidden_states=True`: state
l of every labelled position (layer 0: the embeddings' output; 1..L: after block l) feeds one
`CollapseStats` per layer, grouped by next token as the final states are. Only one batch's
hidden states exist at a time, so memory is L + 1 sets of statistics plus one batch.

Hugging Face returns, as the last hidden state, either the LM head's input (after the final
norm: GPT-2, Llama and most decoders in transformers 5) or the last block's raw output; which
one is checked per checkpoint against the head's actual input (`LayerPass.head_input`).
NC3 and NC4 need the head, so layers get the head-free keys only (`HEAD_FREE_KEYS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor.config import Settings
from monitor.errors import InvalidInput
from monitor.metrics import compute_metrics
from monitor.metrics.keys import REPORT_KEYS
from monitor.offline.correlation import Correlation, correlate
from monitor.offline.study_scale import class_mean_sq_norm, derived_values
from monitor.stats import CollapseStats

# Everything of REPORT_KEYS that does not need the LM head's weights.
HEAD_FREE_KEYS: tuple[str, ...] = tuple(
    k for k in REPORT_KEYS if not k.startswith(("nc3_", "nc4_"))
)


@dataclass(frozen=True)
class LayerRow:
    """One layer's head-free metrics (and the study's derived quantities) for a checkpoint."""

    layer: int  # 0: embeddings' output, l: after block l
    head_input: bool  # these states are exactly the LM head's input
    metrics: dict[str, float | int | None]  # HEAD_FREE_KEYS
    derived: dict[str, float | None]  # the study's DERIVED_KEYS

    def value(self, key: str) -> float | None:
        raw = self.derived[key] if key in self.derived else self.metrics.get(key)
        return None if raw is None else float(raw)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "head_input": self.head_input,
            "metrics": self.metrics,
            "derived": self.derived,
        }


@dataclass(frozen=True)
class LayerPass:
    """What the per-layer pass leaves: statistics per hidden state, and what the last one is."""

    stats: list[CollapseStats]  # index l: hidden_states[l]
    head_input: bool  # hidden_states[-1] equals the LM head's input
    positions: int  # labelled positions per layer


@torch.no_grad()
def accumulate_layers(
    model: Any, windows: torch.Tensor, batch_size: int, device: torch.device
) -> LayerPass:
    """Run `windows` (W, T) token ids through the model; per-layer statistics of positions
    0..T-2 labelled with tokens 1..T-1 (the windows are unpadded, every position is real)."""
    head = model.get_output_embeddings()
    num_classes = int(head.weight.shape[0])
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"output_hidden_states": True}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1  # the head then scores (and we check) the last position only
    if "use_cache" in params:
        extra["use_cache"] = False
    seen: list[torch.Tensor] = []

    def keep_input(_module: Any, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    hook = head.register_forward_pre_hook(keep_input)
    stats: list[CollapseStats] = []
    head_input = True
    positions = 0
    try:
        for start in range(0, int(windows.shape[0]), batch_size):
            ids = windows[start : start + batch_size].to(device)
            seen.clear()
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
            states = hidden.hidden_states
            if not stats:
                dim = int(states[0].shape[-1])
                stats = [
                    CollapseStats(num_classes, dim, second_moment=True, device=device)
                    for _ in states
                ]
            labels = ids[:, 1:].reshape(-1)
            for layer_stats, state in zip(stats, states, strict=True):
                layer_stats.update(state[:, :-1].reshape(-1, state.shape[-1]), labels)
            positions += int(labels.numel())
            if seen:  # the head saw the last position(s): do they equal the last state's?
                got = seen[0][:, -1]
                head_input = head_input and torch.equal(got, states[-1][:, -1].to(got.dtype))
    finally:
        hook.remove()
    if not stats:
        raise InvalidInput("empty_corpus", "no train window for the per-layer pass")
    return LayerPass(stats, head_input, positions)


def layer_rows(found: LayerPass, settings: Settings, device: torch.device) -> list[LayerRow]:
    """Head-free metrics and derived quantities of each hidden state's statistics."""
    rows: list[LayerRow] = []
    last = len(found.stats) - 1
    for layer, stats in enumerate(found.stats):
        report = compute_metrics(stats, keys=HEAD_FREE_KEYS, **settings.metric_options())
        metrics = {key: report.value(key) for key in HEAD_FREE_KEYS}
        scale2 = class_mean_sq_norm(stats, settings.min_count, device)
        head_input = layer == last and found.head_input
        rows.append(LayerRow(layer, head_input, metrics, derived_values(metrics, scale2)))
    return rows


def layer_correlations(
    layers: Sequence[Sequence[LayerRow] | None],
    losses: Sequence[float],
    keys: Sequence[str],
    signs: Mapping[str, int],
) -> list[tuple[int, Correlation]]:
    """Per layer index and key: Pearson/Spearman with loss over the checkpoints having it.

    No bootstrap or partials (the main table has them for the head's input): a cheap look at
    where in depth a metric follows loss. Layer l of a deeper model is not the same depth.
    """
    depth = max((len(rows) for rows in layers if rows), default=0)
    out: list[tuple[int, Correlation]] = []
    for layer in range(depth):
        having = [
            (rows[layer], loss)
            for rows, loss in zip(layers, losses, strict=True)
            if rows and layer < len(rows)
        ]
        kept = [loss for _, loss in having]
        for key in keys:
            values = [row.value(key) for row, _ in having]
            out.append((layer, correlate(key, values, kept, signs.get(key))))
    return out
