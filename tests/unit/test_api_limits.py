"""The ingest API's resource bounds in-process: token bucket, body budget, refusal tally.

The attacks themselves (slow bodies, concurrent large bodies, a slow broker, floods) run
against a real API process in tests/integration/test_hardening_api.py; these check the
arithmetic with a fake clock and the answers through FastAPI's TestClient.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_api import JSON, LIMIT, URL, arrays, body, error_of, make_settings

from monitor.api import ApiConfigError, create_api
from monitor.api.limits import BodyBudget, Hold, Limited, RateLimiter, RefusalTally
from monitor.pipeline.runtime import Runtime, set_runtime
from monitor.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_admits_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.admit("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("a") == pytest.approx(0.5)  # one token back after 1 / rate seconds
    assert limiter.admit("b") == 0.0  # another client has its own bucket
    clock.now += 0.5
    assert limiter.admit("a") == 0.0
    assert limiter.admit("a") > 0
    clock.now += 100.0  # a long pause refills to the burst, never beyond it
    assert [limiter.admit("a") for _ in range(4)][-1] > 0


def test_token_bucket_forgets_full_buckets_and_stays_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=100, clock=clock)
    for i in range(1000):
        limiter.admit(f"client-{i}")
    assert len(limiter._buckets) <= 101
    clock.now += 10.0
    limiter.admit("late")
    assert set(limiter._buckets) <= {"late"}  # refilled buckets are forgotten
    assert RateLimiter(rate=0, burst=1).admit("x") == 0.0  # rate 0: no bound


def test_body_budget_counts_bytes_and_refuses_past_the_limit() -> None:
    budget = BodyBudget(100)
    first, second = Hold(budget), Hold(budget)
    first.take(60)
    second.take(40)
    with pytest.raises(Limited) as refused:
        second.take(1)
    assert (refused.value.reason, refused.value.status) == ("server_busy", 503)
    assert refused.value.headers["Retry-After"] == "1"
    first.release()
    second.take(60)
    second.release()
    assert budget.held == 0


def test_refusal_flood_is_written_in_few_batches() -> None:
    class CountingStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.writes = 0
            self.slow = threading.Event()

        def add_counters(self, model: str, deltas: dict[str, int]) -> None:
            self.writes += 1
            self.slow.wait(0.05)  # a slow store: refusals pile up while a flush runs
            super().add_counters(model, deltas)

    store = CountingStore()
    pool = ThreadPoolExecutor(max_workers=4)
    tally = RefusalTally(store, pool, lambda exc: None)
    futures = [tally.add(None, "unauthorized", 1) for _ in range(2000)]
    for future in futures:
        future.result(timeout=10)
    assert store.counters("_unknown")["rejected:unauthorized"] == 2000
    assert store.writes < 50  # one write per owner and reason per flush, not per request
    pool.shutdown()


def test_refusal_counts_survive_a_failed_flush() -> None:
    class FlakyStore(MemoryStore):
        fail = True

        def add_counters(self, model: str, deltas: dict[str, int]) -> None:
            if self.fail:
                raise ConnectionError("store down")
            super().add_counters(model, deltas)

    store, warnings = FlakyStore(), list[BaseException]()
    pool = ThreadPoolExecutor(max_workers=1)
    tally = RefusalTally(store, pool, warnings.append)
    tally.add("m", "rate_limited", 1).result(timeout=5)
    assert warnings
    assert store.counters("m") == {}
    store.fail = False
    tally.add("m", "rate_limited", 2).result(timeout=5)
    assert store.counters("m") == {"rejected:rate_limited": 3}
    pool.shutdown()


@pytest.fixture
def limited() -> Any:
    settings = make_settings(api_client_rate=1.0, api_client_burst=2)
    rt = Runtime(settings)
    set_runtime(rt)
    yield TestClient(create_api(settings, rt)), rt
    set_runtime(None)


def test_client_over_its_rate_gets_429_with_retry_after_and_is_counted(limited: Any) -> None:
    client, rt = limited
    x, y = arrays()
    answers = [client.post(URL, json=body(x, y)) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 429, 429]
    assert error_of(answers[2]) == "rate_limited"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert rt.store.counters("m")["rejected:rate_limited"] == 2
    assert rt.store.counters("m")["batches_ingested"] == 2
    time.sleep(1.05)
    assert client.post(URL, json=body(x, y)).status_code == 202


def test_busy_budget_answers_503_and_releases_every_byte() -> None:
    settings = make_settings(api_max_inflight_bytes=LIMIT)
    rt = Runtime(settings)
    set_runtime(rt)
    try:
        api = create_api(settings, rt)
        client, budget = TestClient(api), api.state.ingress.budget
        x, y = arrays()
        budget.take(LIMIT - 100)  # other requests hold nearly everything
        busy = client.post(URL, json=body(x, y))
        assert busy.status_code == 503
        assert error_of(busy) == "server_busy"
        assert busy.headers["retry-after"] == "1"
        assert busy.headers["connection"] == "close"
        assert "batch_id" not in busy.json()  # nothing was sent
        assert rt.store.counters("m")["rejected:server_busy"] == 1
        budget.give(LIMIT - 100)
        assert client.post(URL, json=body(x, y)).status_code == 202
        bad = client.post(URL, content=b"{", headers=JSON)
        assert bad.status_code == 400
        assert budget.held == 0  # accepted and refused requests both gave their bytes back

        def chunks() -> Iterator[bytes]:  # chunked: no length to check first, counted as read
            for _ in range(8):
                yield b" " * 1024

        budget.take(LIMIT - 4096)
        streamed = client.post(URL, content=chunks(), headers=JSON)
        assert (streamed.status_code, error_of(streamed)) == (503, "server_busy")
        assert budget.held == LIMIT - 4096  # the refused request gave back what it took
        assert rt.store.counters("m")["rejected:server_busy"] == 2
    finally:
        set_runtime(None)


def test_inflight_budget_below_the_body_limit_is_refused_at_start() -> None:
    with pytest.raises(ApiConfigError, match="MAX_INFLIGHT"):
        create_api(make_settings(api_max_inflight_bytes=LIMIT - 1))


def test_openapi_documents_the_retry_contract_and_the_bounds() -> None:
    rt = Runtime(make_settings())
    document = TestClient(create_api(rt.settings, rt)).get("/openapi.json").json()
    responses = document["paths"]["/v1/models/{model}/samples"]["post"]["responses"]
    assert {"202", "408", "413", "429", "503"} <= set(responses)
    assert "X-Batch-Id" in responses["202"]["headers"]
    assert {"X-Batch-Id", "Retry-After"} <= set(responses["503"]["headers"])
    assert "Retry-After" in responses["429"]["headers"]
    retry = document["components"]["schemas"]["RetryLater"]
    assert "batch_id" in retry["properties"]
    assert "retry with this batch_id" in retry["properties"]["batch_id"]["description"]
