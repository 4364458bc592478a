"""The Prometheus exporter against a real redis-server: what a scrape shows, and when nothing.

Snapshots, counters and partials are written with `RedisStore` (prefix "cm"), the way the
evaluator and the workers write them; the exposition is parsed back with prometheus-client's
own text parser, so a malformed page fails here and not in Prometheus.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import ROOT, RedisServer, free_port, service_env, wait_for
from typer.testing import CliRunner

from monitor.cli.exporter import register
from monitor.config import Settings
from monitor.exporter import FAMILY_HELP, METRIC_HELP
from monitor.exporter.collector import CollapseCollector
from monitor.exporter.server import create_exporter_app, exporter_store, queue_depth_reader
from monitor.metrics.report import ESTIMATED_KEYS, REPORT_KEYS
from monitor.pipeline.runtime import bucket_policy
from monitor.store.memory import MemoryStore
from monitor.store.redis_store import RedisStore

pytestmark = pytest.mark.timeout(60)

MODELS = [
    {"name": "m", "vocab_size": 300, "dim": 16},
    {"name": "idle", "vocab_size": 300, "dim": 16},
]
WINDOWS = {"15m": 900, "1h": 3600}
NOW = 1_764_140_000.0
# Every key of METRICS.md, written out here rather than imported: this is the contract.
COLLAPSE = re.findall(
    r"\w+",
    """nc1_cdnv nc1_cdnv2 nc1_trace_ratio nc2_equinorm_cv nc2_equiangularity_mean
    nc2_equiangularity_std nc2_log_energy_mean nc2_log_energy_std nc3_duality_mean_cos
    nc3_uniform_duality_cv nc4_ncc_agreement""",
)
GEOMETRY = ["anisotropy_mean_cos", "effective_rank", "class_count", "sample_count"]
DRIFT = re.findall(
    r"\w+",
    """drift_mmd drift_mmd_threshold drift_mean_shift drift_class_mean_cos drift_label_js
    drift_nc1_cdnv_ratio drift_nc2_equiangularity_std_ratio drift_nc4_ncc_agreement_ratio
    drift_effective_rank_ratio""",
)
STDERR = [f"{k}_stderr" for k in ESTIMATED_KEYS]
ALL_KEYS = COLLAPSE + GEOMETRY + DRIFT + STDERR
# METRICS.md: two keys are exported under other names (`_count` on a gauge fails promtool).
RENAMED = {"sample_count": "collapse_window_samples", "class_count": "collapse_window_classes"}


def gauge(key: str) -> str:
    return RENAMED.get(key, f"collapse_{key}")


def settings_for(server: RedisServer, **extra: Any) -> Settings:
    return Settings(redis_url=server.url, models=MODELS, windows=WINDOWS, **extra)


def snapshot(model: str, window: str, metrics: dict[str, Any], **extra: Any) -> str:
    doc: dict[str, Any] = {
        "v": 1,
        "model": model,
        "window": window,
        "window_seconds": WINDOWS[window],
        "timestamp": NOW - 30,
        "status": "ok",
        "reason": None,
        "duration_seconds": 0.53,
        "sample_count": int(metrics.get("sample_count") or 0),
        "class_count": int(metrics.get("class_count") or 0),
        "metrics": metrics,
        "baseline": {"name": "launch", "created": NOW - 86400, "source": "window:24h"},
        "top_drift": [],
    }
    doc.update(extra)
    return json.dumps(doc)


def full_metrics(offset: float) -> dict[str, Any]:
    values: dict[str, Any] = {k: offset + i / 100 for i, k in enumerate(ALL_KEYS)}
    values.update(sample_count=1234, class_count=56)
    return values


def scrape_text(collector: CollapseCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def parse(text: str) -> dict[str, Any]:
    """Family name -> family (the parser strips `_total` from counter family names)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(text))), "duplicate family"
    return families


def series(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of `name` keyed by their sorted labels; each label set must be unique."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == name:
                key = tuple(sorted(sample.labels.items()))
                assert key not in out, f"duplicate series {name}{key}"
                out[key] = sample.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


@pytest.fixture
def setup(redis_server: RedisServer) -> tuple[Settings, RedisStore, CollapseCollector]:
    settings = settings_for(redis_server)
    store = exporter_store(settings)
    depths = queue_depth_reader(settings)
    return (
        settings,
        store,
        CollapseCollector.for_settings(store, settings, clock=lambda: NOW, queue_depths=depths),
    )


def test_catalogue_matches_metrics_md_and_report() -> None:
    assert set(ALL_KEYS) <= set(METRIC_HELP)
    assert set(REPORT_KEYS) <= set(METRIC_HELP)
    drift = pytest.importorskip("monitor.metrics.drift")  # the evaluator's own list
    assert set(drift.DRIFT_KEYS) == set(DRIFT)
    assert all("\n" not in h and h.strip() for h in (*METRIC_HELP.values(), *FAMILY_HELP.values()))


def test_nothing_but_health_before_any_snapshot(setup: Any) -> None:
    _, _, collector = setup
    families = parse(scrape_text(collector))
    assert series(families, "collapse_store_up") == {(): 1.0}
    build = labels(version=metadata.version("collapse-monitor"), python=platform.python_version())
    assert series(families, "collapse_build_info") == {build: 1.0}
    assert "version" in families["collapse_build_info"].documentation
    for key in ALL_KEYS:
        assert not series(families, gauge(key)), key
    for name in ("snapshot_ok", "snapshot_timestamp_seconds", "baseline_info"):
        assert not series(families, f"collapse_{name}")
    ingested = series(families, "collapse_samples_ingested_total")
    assert ingested == {labels(model="m"): 0.0, labels(model="idle"): 0.0}
    assert series(families, "collapse_compaction_lag_seconds")[labels(model="m")] == 0.0
    depth = series(families, "collapse_queue_depth")
    assert depth == {labels(queue=q): 0.0 for q in ("embed", "ingest", "maintenance")}


def test_every_metrics_key_exported_with_its_value(setup: Any) -> None:
    _, store, collector = setup
    metrics_1h = full_metrics(1.0)
    metrics_15m = full_metrics(2.0)
    metrics_15m["nc4_ncc_agreement"] = None  # not computable: absent, not 0
    metrics_15m["my.custom-metric"] = 3.0
    metrics_15m["store_up"] = 7.0  # a custom key must not shadow an exporter family
    metrics_15m["a_label"] = "text"  # not a number: skipped
    store.put_snapshot("m", "1h", snapshot("m", "1h", metrics_1h), history=5)
    raw = snapshot("m", "15m", metrics_15m).replace('"drift_mmd": 2.15', '"drift_mmd": NaN')
    store.put_snapshot("m", "15m", raw, history=5)
    too_few = {"sample_count": 3, "class_count": 1}
    doc = snapshot("idle", "1h", too_few, status="insufficient_data", reason="1 class")
    store.put_snapshot("idle", "1h", doc, history=5)

    families = parse(scrape_text(collector))
    for key in ALL_KEYS:
        got = series(families, gauge(key))
        assert families[gauge(key)].documentation == METRIC_HELP[key]
        assert families[gauge(key)].type == "gauge"
        assert got[labels(model="m", window="1h")] == pytest.approx(metrics_1h[key]), key
        if key not in ("nc4_ncc_agreement", "drift_mmd"):
            assert got[labels(model="m", window="15m")] == pytest.approx(metrics_15m[key]), key
        if key in ("sample_count", "class_count"):
            assert got[labels(model="idle", window="1h")] == too_few[key]
        else:
            assert labels(model="idle", window="1h") not in got, key
    assert labels(model="m", window="15m") not in series(families, "collapse_drift_mmd")
    assert labels(model="m", window="15m") not in series(families, "collapse_nc4_ncc_agreement")
    custom = series(families, "collapse_my_custom_metric")
    assert custom == {labels(model="m", window="15m"): 3.0}
    assert "Custom metric" in families["collapse_my_custom_metric"].documentation
    assert series(families, "collapse_store_up") == {(): 1.0}
    assert "collapse_a_label" not in families
    # promtool reads `_count` as a histogram's or summary's: no gauge may end so (renamed keys)
    assert not [n for n, f in families.items() if f.type == "gauge" and n.endswith("_count")]

    ok = series(families, "collapse_snapshot_ok")
    assert ok == {
        labels(model="m", window="1h"): 1.0,
        labels(model="m", window="15m"): 1.0,
        labels(model="idle", window="1h"): 0.0,
    }
    stamps = series(families, "collapse_snapshot_timestamp_seconds")
    assert stamps[labels(model="m", window="1h")] == NOW - 30
    duration = series(families, "collapse_evaluation_duration_seconds")
    assert duration[labels(model="m", window="15m")] == pytest.approx(0.53)
    info = series(families, "collapse_baseline_info")
    assert info[labels(model="m", baseline_id="launch", source="window:24h")] == 1.0
    created = series(families, "collapse_baseline_created_timestamp_seconds")
    assert created[labels(model="m", baseline_id="launch")] == NOW - 86400


def test_pipeline_health(setup: Any, redis_server: RedisServer) -> None:
    _, store, collector = setup
    for i in range(3):
        store.put_partial("m", f"b{i}", {b"g": b"x" * 1000}, ts=NOW - 120 + i, samples=10)
    store.put_partial("m", "b0", {b"g": b"x" * 1000}, ts=NOW, samples=10)  # redelivered: duplicate
    store.add_counters("m", {"rejected:wrong_shape": 5, "rejected:non_finite": 2})
    store.add_counters("m", {"samples_dropped": 4})
    store.add_counters("_unknown", {"rejected:unknown_model": 9})
    redis_server.client().rpush("ingest", "t1", "t2", "t3")
    redis_server.client().rpush("embed", "t4")

    families = parse(scrape_text(collector))
    m = labels(model="m")
    assert series(families, "collapse_samples_ingested_total")[m] == 30.0
    assert series(families, "collapse_batches_ingested_total")[m] == 3.0
    assert series(families, "collapse_batches_duplicate_total")[m] == 1.0
    assert series(families, "collapse_samples_dropped_total")[m] == 4.0
    assert series(families, "collapse_samples_dropped_total")[labels(model="idle")] == 0.0
    assert families["collapse_samples_ingested"].type == "counter"
    assert series(families, "collapse_samples_rejected_total") == {
        labels(model="m", reason="wrong_shape"): 5.0,
        labels(model="m", reason="non_finite"): 2.0,
        labels(model="_unknown", reason="unknown_model"): 9.0,
    }
    assert series(families, "collapse_pending_partials")[m] == 3.0
    assert series(families, "collapse_compaction_lag_seconds")[m] == pytest.approx(120.0)
    assert series(families, "collapse_store_memory_bytes")[m] > 3000
    assert series(families, "collapse_queue_depth") == {
        labels(queue="ingest"): 3.0,
        labels(queue="embed"): 1.0,
        labels(queue="maintenance"): 0.0,
    }


def test_failure_counters_show_every_known_reason_from_zero(setup: Any) -> None:
    """Dead letters, infrastructure failures and maintenance failures, from the counters hash.
    Known reasons are exported at 0 before the first one: increase() cannot see a series that
    is born at 1, so an alert on any increase would miss the first dead letter."""
    from monitor.pipeline.deadletter import DEAD_LETTER_REASONS, FAILURE_REASONS

    _, store, collector = setup
    families = parse(scrape_text(collector))
    dead = series(families, "collapse_dead_letters_total")
    assert dead == {
        labels(model=model, reason=reason): 0.0
        for model in ("m", "idle", "_unknown")
        for reason in DEAD_LETTER_REASONS
    }
    failures = series(families, "collapse_ingest_failures_total")
    assert set(failures) == {
        labels(model=model, reason=reason)
        for model in ("m", "idle", "_unknown")
        for reason in FAILURE_REASONS
    }
    for name in ("collapse_compaction_failures_total", "collapse_evaluation_failures_total"):
        assert series(families, name) == {labels(model="m"): 0.0, labels(model="idle"): 0.0}

    store.add_counters("m", {"dead_letters:retries_exhausted": 2, "ingest_failures:oom": 7})
    store.add_counters("m", {"compaction_failures": 3, "evaluation_failures": 1})
    store.add_counters("m", {"ingest_failures:a-new\nreason": 1})  # sanitised, not dropped
    store.add_counters("_unknown", {"dead_letters:undecodable_message": 4})
    families = parse(scrape_text(collector))
    assert families["collapse_dead_letters"].type == "counter"
    dead = series(families, "collapse_dead_letters_total")
    assert dead[labels(model="m", reason="retries_exhausted")] == 2.0
    assert dead[labels(model="_unknown", reason="undecodable_message")] == 4.0
    assert dead[labels(model="idle", reason="retries_exhausted")] == 0.0
    failures = series(families, "collapse_ingest_failures_total")
    assert failures[labels(model="m", reason="oom")] == 7.0
    assert failures[labels(model="m", reason="a-new\\nreason")] == 1.0
    compaction = series(families, "collapse_compaction_failures_total")
    assert compaction == {labels(model="m"): 3.0, labels(model="idle"): 0.0}
    assert series(families, "collapse_evaluation_failures_total")[labels(model="m")] == 1.0


def test_top_drift_is_bounded_and_sanitised(setup: Any) -> None:
    _, store, collector = setup
    tokens = [" the", "line\nbreak", "tab\there", "\x00nul", "x" * 200, "ü∑ok", ""]
    counts = {"count": 10, "base_count": 5, "contribution": 0.01}
    entries = [
        {"class_id": i, "token": tokens[i % 7], "cosine_distance": 1 - i / 100, **counts}
        for i in range(30)
    ]
    entries.insert(1, dict(entries[0]))  # the same class twice must not duplicate a series
    metrics = full_metrics(0.0)
    for window in WINDOWS:
        store.put_snapshot(
            "m", window, snapshot("m", window, metrics, top_drift=entries), history=2
        )

    families = parse(scrape_text(collector))
    top = series(families, "collapse_top_drift_cosine_distance")
    for window in WINDOWS:
        mine = {k: v for k, v in top.items() if dict(k)["window"] == window}
        assert len(mine) == 20
        assert {dict(k)["class_id"] for k in mine} == {str(i) for i in range(20)}
    for key in top:
        token = dict(key)["token"]
        assert token.isprintable()
        assert len(token) <= 32
    got = {dict(k)["class_id"]: dict(k)["token"] for k in top}
    assert got["0"] == " the"
    assert got["1"] == "line\\nbreak"
    assert got["4"] == "x" * 32
    assert got["5"] == "ü∑ok"
    # The bound is the evaluator's top_drift_classes (up to 100), not a constant of its own.
    wide = CollapseCollector(store, models=["m"], windows=list(WINDOWS), top_drift_limit=25)
    top = series(parse(scrape_text(wide)), "collapse_top_drift_cosine_distance")
    assert len([k for k in top if dict(k)["window"] == "1h"]) == 25


def test_replicas_agree(redis_server: RedisServer) -> None:
    settings = settings_for(redis_server)
    writer = exporter_store(settings)
    writer.put_snapshot("m", "1h", snapshot("m", "1h", full_metrics(1.0)), history=2)
    writer.put_partial("m", "b1", {b"g": b"y" * 100}, ts=NOW - 5, samples=3)
    a = CollapseCollector.for_settings(exporter_store(settings), settings, clock=lambda: NOW)
    b = CollapseCollector.for_settings(exporter_store(settings), settings, clock=lambda: NOW)
    assert scrape_text(a) == scrape_text(b)


def test_store_down_still_answers(redis_server: RedisServer) -> None:
    settings = settings_for(redis_server)
    store = exporter_store(settings)
    store.put_snapshot("m", "1h", snapshot("m", "1h", full_metrics(1.0)), history=2)
    client = TestClient(create_exporter_app(settings, store))
    assert client.get("/readyz").status_code == 200
    assert "collapse_nc1_cdnv{" in client.get("/metrics").text

    redis_server.stop()
    started = time.monotonic()
    response = client.get("/metrics")
    assert time.monotonic() - started < 3.0
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = parse(response.text)
    assert list(families) == ["collapse_build_info", "collapse_store_up"]
    assert series(families, "collapse_store_up") == {(): 0.0}
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()["status"]) == (503, "unavailable")
    assert client.get("/healthz").status_code == 200


def test_store_that_never_answers_is_bounded(tmp_path: Path) -> None:
    """A socket that accepts but never replies: the scrape gives up within its budget."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = Settings(redis_url=url, models=MODELS, windows=WINDOWS)
        collector = CollapseCollector.for_settings(exporter_store(settings), settings)
        started = time.monotonic()
        families = parse(scrape_text(collector))
        assert time.monotonic() - started < 3.0
    assert series(families, "collapse_store_up") == {(): 0.0}


def test_secrets_never_reach_metrics_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password, token = "pw-Zq81-secret-redis", "tok-Yx72-secret-api"
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        caplog.set_level(logging.DEBUG)
        settings = settings_for(server, redis_password=password, api_token=token)
        store = exporter_store(settings)
        store.put_snapshot("m", "1h", snapshot("m", "1h", full_metrics(1.0)), history=2)
        client = TestClient(create_exporter_app(settings, store))
        pages = [client.get("/metrics").text, client.get("/readyz").text]
        assert "collapse_store_up 1.0" in pages[0]
        wrong = settings_for(server, redis_password="wrong-" + password, api_token=token)
        bad = TestClient(create_exporter_app(wrong))
        pages += [bad.get("/metrics").text, bad.get("/readyz").text]
        assert "collapse_store_up 0.0" in pages[2]
        server.stop()
        pages += [client.get("/metrics").text, client.get("/readyz").text]
        assert "collapse_store_up 0.0" in pages[4]
    finally:
        server.stop()
    assert any("store unreadable" in r.getMessage() for r in caplog.records)
    for text in [*pages, caplog.text]:
        assert password not in text
        assert token not in text


def test_cli_refuses_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COLLAPSE_REDIS_URL", "COLLAPSE_CONFIG_FILE", "COLLAPSE_MODELS"):
        monkeypatch.delenv(name, raising=False)
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Test root."""

    register(app)
    result = CliRunner().invoke(app, ["exporter", "--port", "9999"])
    assert result.exit_code == 2
    assert "COLLAPSE_REDIS_URL" in result.output


def test_any_store_works_and_non_redis_has_no_queue_depth() -> None:
    settings = Settings(models=MODELS, windows=WINDOWS)
    store = MemoryStore(bucket_policy(settings))
    store.put_snapshot("m", "1h", snapshot("m", "1h", full_metrics(1.0)), history=2)
    client = TestClient(create_exporter_app(settings, store))
    families = parse(client.get("/metrics").text)
    assert series(families, "collapse_store_up") == {(): 1.0}
    assert series(families, "collapse_nc1_cdnv") == {labels(model="m", window="1h"): 1.0}
    assert "collapse_queue_depth" not in families
    assert client.get("/readyz").json() == {"status": "ready"}


def test_serve_answers_on_a_real_port(
    redis_server: RedisServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    exporter_store(settings_for(redis_server)).put_snapshot(
        "m", "1h", snapshot("m", "1h", full_metrics(1.0)), history=2
    )
    port = free_port()
    env = service_env(redis_server.url, json.dumps(MODELS), COLLAPSE_WINDOWS=json.dumps(WINDOWS))
    code = "from monitor.config import Settings; from monitor.exporter.server import serve; "
    code += f"serve(Settings(), '127.0.0.1', {port})"
    with open(tmp_path / "exporter.log", "ab") as log:  # the child keeps its own descriptor
        command = [sys.executable, "-c", code]
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True
        )
    processes.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: urllib.request.urlopen(f"{url}/healthz", timeout=2).status == 200, 30, "exporter"
    )
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = parse(response.read().decode())
    assert series(families, "collapse_nc1_cdnv") == {labels(model="m", window="1h"): 1.0}
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ready"}
