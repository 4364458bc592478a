"""CollapseProbe on five model families: features, labels, generate(), positions, detach, errors."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
import transformers
from capture_fixtures import (
    FAMILIES,
    assert_same_rows,
    expected_pairs,
    final_norm,
    make_model,
    padded_batch,
    reference_forward,
)

from monitor.capture import CollapseProbe, CollectingSink, SamplingPolicy
from monitor.errors import InvalidInput

ALL = SamplingPolicy(token_rate=1.0, seed=0)


def capture(model: Any, run: Any, **attach: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, attach.pop("policy", ALL), **attach)
    try:
        result = run()
        assert probe.flush()
        assert not probe.counters.errors, probe.last_error
    finally:
        probe.detach()
    return sink.features(), sink.labels(), (result, probe.counters)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_features_and_labels(family: str, side: str) -> None:
    model = make_model(family)
    ids, mask = padded_batch([9, 5, 12, 1], side, seed=1)
    by_hand, last_hidden, logits = reference_forward(model, ids, mask)

    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    x, y, _ = capture(model, run)
    # The independent reference really is the head's input: it reproduces the model's logits,
    # and transformers' own hidden_states[-1] agrees with it.
    weight = model.get_output_embeddings().weight.double()
    real = mask.bool()
    assert torch.allclose((by_hand @ weight.T)[real], logits.double()[real], atol=1e-4)
    assert torch.allclose(by_hand[real], last_hidden.double()[real], atol=1e-4)
    want_x, want_y = expected_pairs(by_hand, ids, mask)
    assert want_y.numel() == sum(max(n - 1, 0) for n in [9, 5, 12, 1])
    assert_same_rows(x, y, want_x, want_y)


def generate_reference(model: Any, seq: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced states of the whole generated sequence, positioned as generate() does."""
    extra = seq.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones(seq.shape[0], extra, dtype=prompt_mask.dtype)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    by_hand, _, _ = reference_forward(model, seq, mask, position_ids=pos)
    return by_hand


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampled", [False, True])
def test_generate_prompt_and_completion_labels(family: str, sampled: bool) -> None:
    model = make_model(family, seed=3)
    ids, mask = padded_batch([4, 7, 6], "left", seed=2)
    prompt_len = ids.shape[1]
    new = 5

    def gen() -> torch.Tensor:
        torch.manual_seed(11)
        with torch.no_grad():
            out: torch.Tensor = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=sampled,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out

    unhooked = gen()
    for positions in ("prompt", "completion", "both"):
        x, y, (seq, counters) = capture(model, gen, positions=positions)
        assert torch.equal(seq, unhooked), "the probe changed what generate() produced"
        assert seq.shape[1] == prompt_len + new
        states = generate_reference(model, seq, mask)
        full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], 1)

        def keep(_b: int, t: int, positions: str = positions) -> bool:
            is_prompt = t + 1 < prompt_len
            return positions == "both" or (positions == "prompt") == is_prompt

        want_x, want_y = expected_pairs(states, seq, full_mask, keep)
        assert_same_rows(x, y, want_x, want_y, atol=5e-4)
        if positions == "completion":
            # Completion labels are exactly the generated tokens, row by row.
            assert sorted(y.tolist()) == sorted(seq[:, prompt_len:].flatten().tolist())
        assert counters.unresolved == 0


def test_generate_stops_counting_after_eos() -> None:
    model = make_model("llama", seed=5)
    ids, mask = padded_batch([5, 5], "left", seed=4)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second generated token becomes EOS

    def run() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model.generate(
                ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos
            )
        return out

    _x, y, (seq, _) = capture(model, run, positions="completion")
    gen = seq[:, ids.shape[1] :]
    want = 0
    for row in gen.tolist():  # labels up to and including the first EOS, none after
        want += row.index(eos) + 1 if eos in row else len(row)
    assert y.numel() == want
    assert (seq[0, ids.shape[1] + 2 :] == 0).all(), "row 0 should be padded after EOS"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_detach_leaves_outputs_bit_identical(family: str) -> None:
    model = make_model(family, seed=7)
    twin = copy.deepcopy(model)
    ids, mask = padded_batch([6, 8], "left", seed=5)

    def outputs(m: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits
            seq = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        return logits, seq

    probe = CollapseProbe.attach(model, CollectingSink(), ALL)
    hooked = outputs(model)
    probe.detach()
    after = outputs(model)
    reference = outputs(twin)
    for a, b, c in zip(hooked, after, reference, strict=True):
        assert torch.equal(a, c)
        assert torch.equal(b, c)
    assert "generate" not in model.__dict__
    modules = [model, model.get_output_embeddings(), model.get_decoder()]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    CollapseProbe.attach(model, CollectingSink(), ALL).detach()  # can attach again


def test_final_norm_output_is_what_is_hooked() -> None:
    """For GPT-2, ln_f's output is the head input: compare with a hook on ln_f itself."""
    model = make_model("gpt2", seed=8)
    ids, mask = padded_batch([7, 7], "right", seed=6)
    outs: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_hook(lambda _m, _a, o: outs.append(o))
    x, y, _ = capture(model, lambda: model(input_ids=ids, attention_mask=mask))
    handle.remove()
    want_x, want_y = expected_pairs(outs[-1], ids, mask)
    assert_same_rows(x, y, want_x, want_y, atol=0.0)


def test_model_without_output_embeddings_is_refused() -> None:
    base = make_model("llama").get_decoder()
    with pytest.raises(InvalidInput) as err:
        CollapseProbe.attach(base, CollectingSink(), ALL)
    assert err.value.reason == "no_output_embeddings"


def test_bad_positions_and_double_attach_are_refused() -> None:
    model = make_model("gpt2")
    with pytest.raises(InvalidInput, match="positions"):
        CollapseProbe.attach(model, CollectingSink(), ALL, positions="middle")  # type: ignore[arg-type]
    probe = CollapseProbe.attach(model, CollectingSink(), ALL)
    with pytest.raises(InvalidInput) as err:
        CollapseProbe.attach(model, CollectingSink(), ALL)
    assert err.value.reason == "already_attached"
    probe.detach()


def test_batch_without_attention_mask_is_skipped_with_a_clear_error() -> None:
    model = make_model("gpt2")
    ids, _ = padded_batch([5, 5], "right")
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL)
    with torch.no_grad():
        out = model(input_ids=ids).logits  # the request itself still succeeds
    probe.flush()
    assert out.shape == (2, 5, model.config.vocab_size)
    assert probe.counters.errors == {"missing_attention_mask": 1}
    assert probe.last_error is not None
    assert "attention_mask" in probe.last_error
    assert sink.labels().numel() == 0
    with torch.no_grad():  # a single unpadded sequence needs no mask
        model(input_ids=ids[:1])
    probe.detach()
    assert sink.labels().tolist() == ids[0, 1:].tolist()


def test_custom_decode_loop_labels_last_position_with_next_input() -> None:
    """Without generate(): a cached decode step supplies the previous call's next token."""
    model = make_model("qwen2", seed=9)
    ids, mask = padded_batch([6], "right", seed=7)
    nxt = torch.tensor([[17]])

    def run() -> None:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            mask2 = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            major = int(transformers.__version__.split(".")[0])
            name = "cache" if major >= 5 else "past_key_values"  # renamed in transformers 5
            model(input_ids=nxt, attention_mask=mask2, **{name: out.past_key_values})

    x, y, (_, counters) = capture(model, run)
    full = torch.cat([ids, nxt], 1)
    states, _, _ = reference_forward(model, full, torch.ones_like(full))
    want_x, want_y = expected_pairs(states, full, torch.ones_like(full))
    assert_same_rows(x, y, want_x, want_y)
    assert 17 in y.tolist()
    assert counters.unresolved == 1  # the decode step's own state never got a next token


def test_beam_search_is_skipped_and_counted() -> None:
    """Beams reorder the cache, so labels cannot be paired: nothing shipped, reason counted."""
    model = make_model("gpt2", seed=10)
    ids, mask = padded_batch([5, 5], "right", seed=8)
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
        model(input_ids=ids, attention_mask=mask)  # plain forwards are monitored again
    probe.detach()
    assert probe.counters.errors.get("beam_search", 0) >= 3
    assert sink.labels().numel() == 2 * 4


def test_concurrent_threads_are_labelled_independently() -> None:
    """Per-thread state: two threads generating at once on one model keep their own labels."""
    model = make_model("llama", seed=11)
    batches = [padded_batch([6, 4], "left", seed=20 + i) for i in range(2)]
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL)
    outputs: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        ids, mask = batches[i]
        with torch.no_grad():
            for _ in range(3):
                outputs[i] = model.generate(
                    ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None
                )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    probe.detach()
    assert not probe.counters.errors
    assert probe.counters.unresolved == 0
    want: list[int] = []
    for i, (_, mask) in enumerate(batches):
        seq = outputs[i]
        full = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
        want += 3 * expected_pairs(seq.double()[..., None], seq, full)[1].tolist()
    assert sorted(sink.labels().tolist()) == sorted(want)
