"""Helpers for the capture tests: tiny random models of several families, independent references.

The reference for "the state the LM head sees" is computed without the probe: the input of each
family's final norm is taken with a plain hook and the norm is re-applied by hand in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tr

VOCAB = 61
FAMILIES = ("gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2")


def make_config(family: str) -> Any:
    common: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return tr.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if family == "gpt_neo":
        return tr.GPTNeoConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
            window_size=8,
            **common,
        )
    if family == "gpt_neox":
        return tr.GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    if family == "llama":
        return tr.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    if family == "qwen2":
        return tr.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    raise ValueError(family)


def make_model(family: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(make_config(family))
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def final_norm(model: Any) -> torch.nn.Module:
    """The family's final norm module, found by its documented attribute path."""
    for path in ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AssertionError(f"no final norm in {type(model).__name__}")


def apply_norm_by_hand(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm or RMSNorm, recomputed in float64 from the module's parameters."""
    x = x.double()
    weight = norm.weight.double()
    if isinstance(norm, torch.nn.LayerNorm):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * weight + norm.bias.double()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed state by hand (B,T,d) float64, hidden_states[-1], logits) of a plain forward."""
    seen: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    finally:
        handle.remove()
    by_hand = apply_norm_by_hand(final_norm(model), seen[-1]).detach()
    return by_hand, out.hidden_states[-1], out.logits


def padded_batch(
    lengths: list[int], side: str, seed: int = 0, low: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never 0..2: pad/bos/eos) padded with 0 on `side`."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(low, VOCAB, (n,), generator=gen)
        mask[i, sl] = 1
    return ids, mask


def expected_pairs(
    states: torch.Tensor,
    seq: torch.Tensor,
    mask: torch.Tensor,
    keep: Callable[[int, int], bool] = lambda _b, _t: True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (state at t, token t+1) for positions where both t and t+1 are real."""
    feats, labels = [], []
    for b in range(seq.shape[0]):
        for t in range(seq.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1] and keep(b, t):
                feats.append(states[b, t])
                labels.append(int(seq[b, t + 1]))
    if not feats:
        return torch.empty(0, states.shape[-1], dtype=torch.float64), torch.empty(0).long()
    return torch.stack(feats).double(), torch.tensor(labels)


def assert_same_rows(
    got_x: torch.Tensor,
    got_y: torch.Tensor,
    want_x: torch.Tensor,
    want_y: torch.Tensor,
    atol: float = 1e-4,
) -> None:
    """The two row sets are equal up to order: a bijection pairs equal labels, close states.

    Rows are matched greedily among the expected rows with the same label within tolerance;
    identical states (same prefix) are interchangeable, so greedy matching is exact here.
    """
    got_x, want_x = got_x.detach().double(), want_x.detach().double()
    assert got_x.shape[0] == want_x.shape[0], (got_x.shape, want_x.shape)
    tol = atol * max(1.0, float(want_x.abs().max())) if want_x.numel() else atol
    dist = torch.cdist(got_x, want_x, compute_mode="donot_use_mm_for_euclid_dist")
    used = torch.zeros(want_x.shape[0], dtype=torch.bool)
    for i in range(got_x.shape[0]):
        ok = (dist[i] <= tol) & (want_y.long() == int(got_y[i])) & ~used
        assert bool(ok.any()), f"captured row {i} (label {int(got_y[i])}) matches no expected row"
        used[int(ok.nonzero()[0])] = True
    assert bool(used.all())
