"""NC4 at capture: the head's decision is the argmax of the model's own logits over seen classes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from capture_fixtures import make_model, padded_batch, reference_forward

from monitor import CollapseStats
from monitor.capture import (
    CollapseProbe,
    CollectingSink,
    InProcessSink,
    NC4Reference,
    SamplingPolicy,
)
from monitor.errors import InvalidInput

ALL = SamplingPolicy(token_rate=1.0, seed=0)


def with_bias(model: Any, seed: int) -> Any:
    """Replace the (tied, bias-free) head by an untied one with a bias, to test b_c too."""
    old = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight + 0.1 * torch.randn(old.weight.shape, generator=gen))
        head.bias.copy_(torch.randn(old.out_features, generator=gen))
    model.set_output_embeddings(head)
    return model


@pytest.mark.parametrize(("family", "bias"), [("gpt2", False), ("llama", True), ("qwen2", False)])
def test_nc4_hits_match_model_logits(family: str, bias: bool) -> None:
    model = make_model(family, seed=4)
    if bias:
        model = with_bias(model, seed=4)
    ids, mask = padded_batch([20, 14, 20, 9], "right", seed=8)
    states, _, logits = reference_forward(model, ids, mask)
    real = (mask[:, :-1] & mask[:, 1:]).bool()
    h = states[:, :-1][real]  # the labelled positions the probe ships
    z = logits[:, :-1][real].double()
    gen = torch.Generator().manual_seed(1)
    class_ids = torch.randperm(model.config.vocab_size, generator=gen)[:12].sort().values
    means = h[torch.randperm(h.shape[0], generator=gen)[:12]] + 0.3 * torch.randn(
        12, h.shape[1], generator=gen, dtype=torch.float64
    )
    # Independent reference: the model's own logits restricted to the seen classes, vs NCC.
    linear = z[:, class_ids].argmax(dim=1)
    nearest = torch.cdist(h, means).argmin(dim=1)
    want = int((linear == nearest).sum())
    assert 0 < want < h.shape[0], "degenerate reference: choose another seed"

    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL)
    probe.set_reference(class_ids, means)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    probe.detach()
    assert sum(b.nc4_total for b in sink.batches) == h.shape[0]
    assert sum(b.nc4_hits for b in sink.batches) == want


def test_reference_from_stats_and_in_process_recording() -> None:
    model = make_model("gpt2", seed=6)
    ids, mask = padded_batch([30, 30], "right", seed=9)
    stats = CollapseStats(model.config.vocab_size, model.config.n_embd)
    sink = InProcessSink(stats)
    probe = CollapseProbe.attach(model, sink, ALL)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # no reference yet: no NC4 counts
        probe.flush()
        first = sink.snapshot()
        probe.set_reference_from_stats(first, min_count=2)
        assert probe.reference is not None
        model(input_ids=ids, attention_mask=mask)
    probe.detach()
    ref = probe.reference
    assert ref is not None
    assert torch.equal(ref.class_ids, first.classes(2).class_ids)
    assert torch.allclose(ref.means, first.classes(2).means())
    assert first.nc4_total == 0
    assert stats.nc4_total == 58
    assert 0 < stats.nc4_hits <= 58


def test_reference_validation() -> None:
    model = make_model("gpt2")
    head = model.get_output_embeddings()
    with pytest.raises(InvalidInput) as err:
        NC4Reference.from_head(head, torch.tensor([1, 2]), torch.zeros(3, 32))
    assert err.value.reason == "wrong_shape"
    with pytest.raises(InvalidInput) as err:
        NC4Reference.from_head(head, torch.tensor([1, 999]), torch.zeros(2, 32))
    assert err.value.reason == "label_out_of_range"
    with pytest.raises(InvalidInput) as err:
        NC4Reference.from_head(torch.nn.Identity(), torch.tensor([1]), torch.zeros(1, 32))
    assert err.value.reason == "no_head_weight"
