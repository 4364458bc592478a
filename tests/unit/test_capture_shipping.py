"""The bounded buffer: a stalled sink never blocks the request path; every row is accounted for."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from capture_fixtures import make_model, padded_batch

from monitor import CollapseStats
from monitor.capture import (
    CaptureBatch,
    CollapseProbe,
    CollectingSink,
    InProcessSink,
    SamplingPolicy,
    Sink,
)

ALL = SamplingPolicy(token_rate=1.0, seed=0)


class StalledSink:
    """Blocks in send() until released, like a dead Redis connection."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.rows = 0

    def send(self, batch: CaptureBatch) -> None:
        self.entered.set()
        self.release.wait()
        self.rows += len(batch)

    def close(self) -> None:
        self.release.set()


class BrokenSink:
    def send(self, batch: CaptureBatch) -> None:
        raise ConnectionError("redis is down")

    def close(self) -> None:
        raise ConnectionError("still down")


def accounted(c: dict[str, int]) -> int:
    keys = ("shipped", "invalid", "unresolved", "pending", "dropped_full", "dropped_sink_error")
    return sum(c[k] for k in keys)


def test_sinks_satisfy_the_protocol() -> None:
    for sink in (StalledSink(), CollectingSink(), InProcessSink(CollapseStats(10, 4))):
        assert isinstance(sink, Sink)


@pytest.mark.timeout(60)
def test_full_buffer_drops_and_counts_without_blocking() -> None:
    model = make_model("gpt2", seed=1)
    ids, mask = padded_batch([16, 16, 12, 16], "right", seed=1)
    sink = StalledSink()
    probe = CollapseProbe.attach(
        model, sink, ALL, capacity_rows=100, batch_rows=20, flush_interval=0.01
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert sink.entered.wait(10), "the shipper never called the sink"
        # The sink is now stuck inside send(); the request path must not wait for it. If
        # offer() blocked, this loop would hang and the timeout would fail the test.
        for _ in range(15):
            model(input_ids=ids, attention_mask=mask)
    assert sink.rows == 0, "the sink returned early: the test did not stall it"
    counts = probe.counters.as_dict()
    assert counts["dropped_full"] > 0
    assert probe._shipper is not None
    assert probe._shipper.buffered_rows <= 100
    sink.release.set()
    assert probe.flush(10)
    probe.detach()
    counts = probe.counters.as_dict()
    assert counts["sampled"] == 16 * 4 * 16  # every position; padding is sorted out later
    assert counts["invalid"] + counts["dropped_full"] + counts["unresolved"] >= 16 * 4
    assert counts["sampled"] == accounted(counts)
    assert sink.rows == counts["shipped"] > 0


def test_sink_errors_are_counted_not_raised() -> None:
    model = make_model("gpt2", seed=2)
    ids, mask = padded_batch([8, 6], "left", seed=2)
    probe = CollapseProbe.attach(model, BrokenSink(), ALL, flush_interval=0.01)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert probe.flush(10)
    probe.detach()  # sink.close() raising must not escape detach()
    counts = probe.counters.as_dict()
    assert counts["dropped_sink_error"] == 7 + 5
    assert counts["shipped"] == 0
    assert counts["sampled"] == accounted(counts)


def test_in_process_sink_accumulates_statistics() -> None:
    model = make_model("llama", seed=3)
    ids, mask = padded_batch([9, 4, 7], "right", seed=3)
    stats = CollapseStats(model.config.vocab_size, model.config.hidden_size)
    sink = InProcessSink(stats)
    direct = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL, batch_rows=5, flush_interval=0.01)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    probe.detach()
    other = CollapseProbe.attach(model, direct, ALL)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    other.detach()
    snap = sink.snapshot()
    assert snap.sample_count == 8 + 3 + 6 == direct.labels().numel()
    for label in set(direct.labels().tolist()):
        assert snap.count_of(label) == int((direct.labels() == label).sum())
    assert torch.allclose(snap.total_sum, direct.features().double().sum(0), atol=1e-5)
    assert direct.closed
    assert sink.batches >= 1


def test_time_based_flush_ships_small_batches() -> None:
    model = make_model("gpt2", seed=4)
    ids, mask = padded_batch([5], "right", seed=4)
    sink = CollectingSink()
    probe = CollapseProbe.attach(model, sink, ALL, batch_rows=10_000, flush_interval=0.05)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    deadline = time.monotonic() + 5
    while not sink.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.labels().tolist() == ids[0, 1:].tolist()
    probe.detach()
