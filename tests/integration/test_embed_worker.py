"""The text path: an `embed` worker runs a real tiny causal LM over mirrored texts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from servers import RedisServer, service_env, start_worker, wait_for

from monitor.capture.mirror import embed_batches, load_model
from monitor.capture.tinymodel import TinyModelSpec, build_tiny_model
from monitor.config import Settings
from monitor.data import read_corpus
from monitor.pipeline.client import MonitorClient
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats

pytestmark = pytest.mark.slow

SPEC = TinyModelSpec(vocab_size=300, n_embd=32, n_layer=1, n_head=2, max_steps=3, max_seconds=30)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), SPEC)


def test_embed_worker_matches_in_process_mirror(
    redis_server: RedisServer,
    tiny_checkpoint: Path,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    models = [{"name": "tiny", "checkpoint": str(tiny_checkpoint)}]
    env = service_env(redis_server.url, json.dumps(models))
    log = tmp_path / "embed.log"
    processes.append(start_worker(env, log, queues="embed"))
    wait_for(lambda: "ready." in log.read_text(errors="replace"), 60, "embed worker")

    sentences = [s for doc in read_corpus("heldout") for s in doc.split(". ") if len(s) > 20]
    texts = sentences[:24]
    assert len(texts) == 24
    settings = Settings(redis_url=redis_server.url, models=models)  # type: ignore[arg-type]
    runtime = Runtime(settings)
    ids = MonitorClient(settings).submit_texts("tiny", texts, texts_per_task=8)
    assert len(ids) == 3
    wait_for(
        lambda: runtime.store.counters("tiny").get("batches_ingested", 0) == 3,
        120,
        "embedded batches",
        interval=0.5,
    )
    compact_model(runtime.store, "tiny")
    got = window_stats(runtime.store, "tiny", "15m", 900).stats
    assert got is not None

    model, tokenizer = load_model(tiny_checkpoint)
    config = model.config
    want = CollapseStats(config.vocab_size, config.n_embd)
    for start in range(0, len(texts), 8):
        for batch in embed_batches(model, tokenizer, texts[start : start + 8], batch_size=8):
            want.update(batch.features, batch.labels)
    assert got.sample_count == want.sample_count > 0
    a, b = got.classes(), want.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-5)


def test_baseline_pinned_from_a_corpus_run(
    redis_server: RedisServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from servers import ROOT

    from monitor.pipeline.baselines import decode_calibration, load_baseline

    models = [{"name": "tiny", "checkpoint": str(tiny_checkpoint)}]
    corpus = tmp_path / "val.txt"
    lines = [s for doc in read_corpus("heldout") for s in doc.split(". ") if len(s) > 20][:40]
    corpus.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "baseline", "pin", "--model", "tiny",
         "--name", "val", "--corpus", str(corpus)],
        env=service_env(redis_server.url, json.dumps(models)),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    runtime = Runtime(Settings(redis_url=redis_server.url, models=models))  # type: ignore[arg-type]
    stats, meta = load_baseline(runtime.store, runtime.registry, "tiny", "val")
    assert meta["source"] == "corpus:val.txt"
    model, tokenizer = load_model(tiny_checkpoint)
    expected = sum(len(b) for b in embed_batches(model, tokenizer, lines, batch_size=8))
    assert stats.sample_count == expected
    assert stats.rff_sum is not None  # the model's features: drift MMD works against it
    found = runtime.store.baseline("tiny", "val")
    assert found is not None
    buckets = decode_calibration(found.calibration)
    assert len(buckets) == 5  # 40 lines in batches of 8, dealt into parts
    assert sum(b.count for b in buckets) == expected
