"""The evaluator reads the LM head alone from a checkpoint, equal to the loaded model's head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from capture_fixtures import FAMILIES, make_model

from monitor.evaluate.head_weights import read_head


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_head_read_alone_equals_the_models(family: str, tied: bool, tmp_path: Path) -> None:
    model = make_model(family)
    model.config.tie_word_embeddings = tied
    if not tied:  # give the head its own values, so reading the embeddings would be caught
        out = model.get_output_embeddings()
        out.weight = torch.nn.Parameter(torch.randn_like(out.weight))
    else:
        model.tie_weights()
    model.save_pretrained(tmp_path, safe_serialization=True)
    found = read_head(str(tmp_path))
    if family == "gpt_neox" and not tied:
        # transformers saves this head under a legacy name (`embed_out`) that the skeleton
        # does not use: the reader must decline, and the evaluator loads the model instead.
        assert found is None
        return
    assert found is not None
    weight, bias = found
    head = model.get_output_embeddings()
    assert torch.equal(weight, head.weight.detach().float())
    assert (bias is None) == (getattr(head, "bias", None) is None)


def test_sharded_checkpoint_and_non_safetensors(tmp_path: Path) -> None:
    model = make_model("llama")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    found = read_head(str(tmp_path / "sharded"))
    assert found is not None
    assert torch.equal(found[0], model.get_output_embeddings().weight.detach().float())
    assert read_head(str(tmp_path / "missing")) is None
