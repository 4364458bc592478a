"""The cap on tracked classes on the text path: an `embed` task of a capped model keeps the
samples of at most `max_tracked_classes` classes, whole, and counts the rest as untracked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monitor.capture.mirror import embed_batches, load_model
from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model
from monitor.config import Settings
from monitor.data import read_corpus
from monitor.pipeline.embed import embed_payload
from monitor.pipeline.payload import SCHEMA_VERSION
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats

pytestmark = pytest.mark.slow

SPEC = TinyModelSpec(vocab_size=300, n_embd=32, n_layer=1, n_head=2, max_steps=3, max_seconds=30)
CAP = 12


def test_embedded_texts_of_a_capped_model_keep_whole_classes(tmp_path: Path) -> None:
    checkpoint = build_tiny_model(tmp_path / "tiny", SPEC)
    models = [{"name": "tiny", "checkpoint": str(checkpoint), "max_tracked_classes": CAP}]
    runtime = Runtime(Settings(models=models))  # type: ignore[arg-type]
    sentences = [s for doc in read_corpus("heldout") for s in doc.split(". ") if len(s) > 20]
    texts = sentences[:24]
    payload = {"v": SCHEMA_VERSION, "model": "tiny", "batch_id": "t-0", "texts": texts}
    assert embed_payload(runtime, payload).stored
    compact_model(runtime.store, "tiny")
    got = window_stats(runtime.store, "tiny", "15m", 900).stats
    assert got is not None

    model, tokenizer = load_model(checkpoint)
    want = CollapseStats(model.config.vocab_size, model.config.n_embd)
    for batch in embed_batches(model, tokenizer, texts, batch_size=8):
        want.update(batch.features, batch.labels)
    assert want.touched_classes > CAP  # else the cap would drop nothing
    kept = got.classes()
    assert 0 < kept.class_ids.numel() <= CAP
    # Each tracked class has every one of its samples (whole classes, no partial rows) ...
    for c, n, s in zip(kept.class_ids.tolist(), kept.counts.tolist(), kept.sums, strict=True):
        assert n == want.count_of(c)
        full = want.classes().sums[want.classes().class_ids.tolist().index(c)]
        torch.testing.assert_close(s, full, rtol=1e-5, atol=1e-5)
    # ... and the dropped samples are counted, so nothing is lost from the books.
    counters = runtime.store.counters("tiny")
    assert counters["untracked_samples"] == want.sample_count - got.sample_count > 0
    # every label, tracked or not, counted into the frequencies (so a class can rise)
    assert len(runtime.store.top_classes("tiny", 10**6)) == want.touched_classes
