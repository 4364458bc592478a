"""The tiny demo model: built offline, loadable with from_pretrained, cached under a lock."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from monitor.capture import CollapseProbe, CollectingSink, SamplingPolicy, load_model, tinymodel
from monitor.capture.tinymodel import TinyModelSpec, build_info, ensure_tiny_model
from monitor.data import read_corpus

FAST = TinyModelSpec(
    vocab_size=300,
    n_embd=32,
    n_layer=1,
    n_head=2,
    n_positions=64,
    seq_len=32,
    batch_size=8,
    lr=1e-2,
    max_steps=40,
    max_seconds=30.0,
)


def test_corpus_is_bundled_and_split() -> None:
    train, heldout = read_corpus("train"), read_corpus("heldout")
    assert len(train) >= 30
    assert len(heldout) >= 5
    assert not set(train) & set(heldout)
    assert all(doc.isascii() for doc in train + heldout)
    with pytest.raises(ValueError, match="split"):
        read_corpus("test")  # type: ignore[arg-type]


def test_build_train_save_load_and_capture(tmp_path: Path) -> None:
    path = tinymodel.build_tiny_model(tmp_path / "tiny", FAST)
    info = build_info(path)
    assert info is not None
    assert info["steps"] == FAST.max_steps
    # Training moved the model well away from chance (uniform loss = ln V).
    assert info["train_loss"] < math.log(FAST.vocab_size) - 1.0
    # The saved weights are the checkpoint with the best validation loss, better than chance.
    assert 0 < info["best_step"] <= FAST.max_steps
    assert info["val_loss"] < math.log(FAST.vocab_size)
    model, tok = load_model(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    text = read_corpus("heldout")[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips any text
    assert tok.eos_token == tinymodel.EOS
    assert tok.pad_token_id == tok.eos_token_id
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, SamplingPolicy(token_rate=1.0, seed=0))
    with torch.no_grad():
        docs = read_corpus("heldout")[:2]
        batch = tok(docs, return_tensors="pt", padding=True, truncation=True, max_length=64)
        model(**batch)
    probe.detach()
    assert sink.labels().numel() == int(batch["attention_mask"].sum()) - 2


def test_ensure_builds_once_under_a_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    spec = dataclasses.replace(FAST, max_steps=1)

    def fake_build(out: Path, spec: TinyModelSpec, **_: object) -> Path:
        builds.append(Path(out))
        Path(out).mkdir(parents=True, exist_ok=True)
        info = {"fingerprint": spec.fingerprint()}
        (Path(out) / tinymodel.INFO_FILE).write_text(json.dumps(info))
        return Path(out)

    monkeypatch.setattr(tinymodel, "build_tiny_model", fake_build)
    monkeypatch.setenv("COLLAPSE_CACHE_DIR", str(tmp_path))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(spec=spec)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(builds) == 1
    assert len(set(results)) == 1
    assert len(results) == 4
    target = results[0]
    assert target.parent == tmp_path
    assert build_info(target) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny")], "temp dir left"
    # A different recipe is a different artefact.
    other = ensure_tiny_model(spec=dataclasses.replace(spec, seed=1))
    assert other != target
    assert len(builds) == 2


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(out: Path, spec: TinyModelSpec, **_: object) -> Path:
        (Path(out) / "partial.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tinymodel, "build_tiny_model", broken)
    with pytest.raises(RuntimeError):
        ensure_tiny_model(tmp_path, FAST)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]
