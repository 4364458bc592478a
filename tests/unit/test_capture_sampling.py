"""Sampling policy: rates hold statistically, the budget caps throughput, seeds reproduce."""

from __future__ import annotations

import math

import pytest
import torch
from capture_fixtures import make_model, padded_batch

from monitor.capture import CollapseProbe, CollectingSink, SamplingPolicy
from monitor.capture.sampling import Sampler, TokenBucket
from monitor.errors import InvalidInput


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_token_rate_holds(rate: float) -> None:
    sampler = Sampler(SamplingPolicy(token_rate=rate, seed=1))
    eligible = torch.ones(200, 500, dtype=torch.bool)
    eligible[:, ::2] = False  # only eligible positions may be chosen
    rows, cols = sampler.sample_positions(eligible)
    assert within(int(rows.numel()), 200 * 250, rate)
    assert bool(eligible[rows, cols].all())
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == rows.numel()


def test_request_rate_holds_and_is_seeded() -> None:
    a = Sampler(SamplingPolicy(request_rate=0.25, seed=7)).sample_requests(20000)
    b = Sampler(SamplingPolicy(request_rate=0.25, seed=7)).sample_requests(20000)
    c = Sampler(SamplingPolicy(request_rate=0.25, seed=8)).sample_requests(20000)
    assert within(int(a.sum()), 20000, 0.25)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_budget_caps_tokens_per_second_with_a_fake_clock() -> None:
    now = [0.0]
    policy = SamplingPolicy(token_rate=1.0, tokens_per_second=100, burst_tokens=100, seed=0)
    sampler = Sampler(policy, clock=lambda: now[0])
    eligible = torch.ones(10, 100, dtype=torch.bool)
    kept = []
    for _ in range(20):
        kept.append(int(sampler.sample_positions(eligible)[0].numel()))
        now[0] += 0.5  # half a second between calls refills 50 tokens
    assert kept[0] == 100
    assert all(k == 50 for k in kept[1:])


def test_token_bucket_never_exceeds_capacity() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, capacity=5, clock=lambda: now[0])
    now[0] = 100.0
    assert bucket.take(50) == 5
    assert bucket.take(1) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_rate": 1.5},
        {"token_rate": -0.1},
        {"request_rate": float("nan")},
        {"tokens_per_second": 0},
        {"burst_tokens": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidInput) as err:
        SamplingPolicy(**kwargs)  # type: ignore[arg-type]
    assert err.value.reason == "invalid_policy"


def test_probe_rates_on_a_real_forward() -> None:
    """Through the probe: ~10% of labelled positions of monitored requests, same with a seed."""
    model = make_model("gpt2", seed=2)
    ids, mask = padded_batch([40] * 48, "right", seed=3)

    def run(policy: SamplingPolicy) -> torch.Tensor:
        sink = CollectingSink()
        probe = CollapseProbe.attach(model, sink, policy)
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, attention_mask=mask)
        probe.detach()
        return sink.labels()

    labelled = 3 * 48 * 39
    first = run(SamplingPolicy(token_rate=0.1, seed=5))
    assert within(int(first.numel()), labelled, 0.1)
    assert torch.equal(first, run(SamplingPolicy(token_rate=0.1, seed=5)))
    per_request = run(SamplingPolicy(token_rate=1.0, request_rate=0.5, seed=6))
    assert per_request.numel() % 39 == 0  # whole requests: every position of a kept row
    assert within(per_request.numel() // 39, 3 * 48, 0.5)
    assert run(SamplingPolicy(token_rate=0.0, seed=1)).numel() == 0
