"""Mirror: teacher-forced batches equal the probe's, one forward per batch, offline loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from capture_fixtures import VOCAB, assert_same_rows, expected_pairs, make_model, reference_forward

from monitor.capture import (
    CollapseProbe,
    CollectingSink,
    NC4Reference,
    SamplingPolicy,
    embed_batches,
    load_model,
)
from monitor.capture.mirror import pad_batch
from monitor.capture.tinymodel import train_tokenizer
from monitor.data import read_corpus
from monitor.errors import InvalidInput


def sequences(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 12, 1, 9, 5, 11]
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def count_forwards(model: Any) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mirror_equals_probe_and_reference(family: str, side: Any) -> None:
    model = make_model(family, seed=12)
    seqs = sequences()
    calls = count_forwards(model)
    gen = torch.Generator().manual_seed(3)
    class_ids = torch.arange(3, 15)
    means = torch.randn(12, 32, generator=gen, dtype=torch.float64)
    ref = NC4Reference.from_head(model.get_output_embeddings(), class_ids, means)
    mirrored = list(
        embed_batches(model, None, seqs, batch_size=3, reference=ref, padding_side=side)
    )
    kept = [s for s in seqs if len(s) >= 2]
    assert calls[0] == 2  # one forward per batch of 3 (the 1-token sequence is skipped)
    assert len(mirrored) == 2
    assert all(b.source == "mirror" for b in mirrored)

    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, SamplingPolicy(token_rate=1.0, seed=0))
    probe.set_reference(class_ids, means)
    padded = [pad_batch(kept[i : i + 3], 0, side) for i in range(0, len(kept), 3)]
    for ids, mask in padded:  # what the probe sees when the same batches are served
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    probe.detach()
    for (ids, mask), batch in zip(padded, mirrored, strict=True):  # independent reference
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        by_hand, _, _ = reference_forward(model, ids, mask, position_ids=pos)
        want_x, want_y = expected_pairs(by_hand, ids, mask)
        assert_same_rows(batch.features, batch.labels, want_x, want_y)
    probe_batches = sink.batches
    assert torch.equal(torch.cat([b.labels for b in mirrored]), sink.labels())
    assert torch.allclose(torch.cat([b.features for b in mirrored]), sink.features(), atol=1e-5)
    assert sum(b.nc4_hits for b in mirrored) == sum(b.nc4_hits for b in probe_batches)
    assert sum(b.nc4_total for b in mirrored) == sum(len(s) - 1 for s in kept)


def test_mirror_texts_with_a_trained_tokenizer() -> None:
    tok = train_tokenizer(read_corpus("train")[:10], vocab_size=300, max_length=64)
    torch.manual_seed(0)
    import transformers as tr

    model = tr.GPT2LMHeadModel(
        tr.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    ).eval()
    texts = read_corpus("heldout")[:4]
    batches = list(embed_batches(model, tok, texts, batch_size=2))
    ids = [tok(t, add_special_tokens=False)["input_ids"][:64] for t in texts]
    got = torch.cat([b.labels for b in batches]).tolist()
    assert got == [i for seq in ids for i in seq[1:]]  # right padding keeps row order


def test_mirror_refuses_bad_inputs() -> None:
    model = make_model("gpt2")
    with pytest.raises(InvalidInput) as err:
        list(embed_batches(model, None, [[1, 2, VOCAB + 5]]))
    assert err.value.reason == "label_out_of_range"
    with pytest.raises(InvalidInput) as err:
        list(embed_batches(model, None, ["text", [1, 2]]))  # type: ignore[list-item]
    assert err.value.reason == "mixed_inputs"
    with pytest.raises(InvalidInput) as err:
        list(embed_batches(model.get_decoder(), None, [[1, 2, 3]]))
    assert err.value.reason == "no_output_embeddings"
    with pytest.raises(InvalidInput) as err:
        list(embed_batches(model, None, [[1, 2, 3]], batch_size=0))
    assert err.value.reason == "invalid_batch_size"
    assert not model._forward_hooks, "a failed mirror run must not leave hooks behind"


def test_load_model_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    model = make_model("qwen2", seed=1)
    tok = train_tokenizer(read_corpus("train")[:5], vocab_size=VOCAB, max_length=64)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(tmp_path / "m", dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    assert loaded_tok("The fox")["input_ids"] == tok("The fox")["input_ids"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = model(ids).logits.double()
        b = loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(InvalidInput) as err:
        load_model("no-such-org/no-such-model")
    assert err.value.reason == "model_not_found"
    assert "HF_HUB_OFFLINE" in str(err.value)
