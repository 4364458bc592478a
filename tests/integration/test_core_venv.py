"""The core install (`pip install collapse-monitor`, no extras) in a fresh venv, without torch.

It must run what a cluster runs beside the workers: `--help`, `rules render`, `dashboards`, the
exporter's scrape, the HTTP API (validating and queueing) and `status`, against a real Redis that
this test fills through the worker path of the project's own venv (which has every extra).

The venv is built from a copy of the sources with the machine's pip configuration and cache, as
`make` installs; the core dependencies are what pyproject.toml lists, nothing added by hand.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ROOT, RedisServer, free_port, stop_process, wait_for

from monitor.config import Settings
from monitor.evaluate.evaluator import Evaluator
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.runtime import Runtime
from monitor.pipeline.windows import compact_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODELS = [{"name": "m", "vocab_size": 64, "dim": 8}]
WINDOWS = {"15m": 900}
TOKEN = "tok-light-install-0123456789abcdef"
EXTRAS_PACKAGES = ("torch", "transformers", "tokenizers", "matplotlib")
EXPORTER_RSS_LIMIT_MB = 100  # issue 17: the exporter under 100 MB (it measures about 60)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the package installed from a copy of the sources, core dependencies only."""
    root = tmp_path_factory.mktemp("light")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("monitor", "dashboards"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(src)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def run(
    venv: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`collapse-monitor ARGS` of the venv, from a directory outside the sources."""
    return subprocess.run(
        [str(venv / "bin" / "collapse-monitor"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(),
        cwd=venv.parent,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COLLAPSE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return {**env, **extra}


def service_env(server: RedisServer, **extra: str) -> dict[str, str]:
    return clean_env(
        COLLAPSE_REDIS_URL=server.url,
        COLLAPSE_MODELS=json.dumps(MODELS),
        COLLAPSE_WINDOWS=json.dumps(WINDOWS),
        **extra,
    )


def test_the_core_dependencies_name_no_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert not [p for p in EXTRAS_PACKAGES if p in core]
    extras = project["optional-dependencies"]
    assert "torch" in " ".join(extras["worker"])
    assert "transformers" in " ".join(extras["worker"])
    assert "matplotlib" in " ".join(extras["report"])
    assert extras["all"] == ["collapse-monitor[worker,capture,report,flower]"]
    assert "flower" in " ".join(extras["flower"])


def test_core_venv_has_no_torch_and_runs_the_offline_commands(core_venv: Path) -> None:
    python = str(core_venv / "bin" / "python")
    code = f"import importlib.util as u; print([p for p in {EXTRAS_PACKAGES!r} if u.find_spec(p)])"
    probe = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, cwd=core_venv.parent
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"

    helped = run(core_venv, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "exporter" in helped.stdout
    assert "status" in helped.stdout

    rules = run(core_venv, "rules", "render")
    assert rules.returncode == 0, rules.stderr
    assert rules.stdout.startswith("groups:")
    assert "alert: Collapse" in rules.stdout

    # The wheel ships the dashboards: a push reads all of them and then fails on the network
    # (nothing listens on the port), not on "no dashboard JSON files".
    port = free_port()
    pushed = run(core_venv, "dashboards", "push", "--url", f"http://127.0.0.1:{port}",
                 "--token", "t")  # fmt: skip
    assert pushed.returncode != 0
    assert "no dashboard JSON files" not in pushed.stderr
    shipped = core_venv / "share" / "collapse-monitor" / "dashboards"
    assert sorted(p.name for p in shipped.glob("*.json")) == sorted(
        p.name for p in (ROOT / "dashboards").glob("*.json")
    )

    # A command that needs an extra says which one, in one line.
    features = core_venv.parent / "x.npy"
    np.save(features, np.zeros((4, 8), dtype=np.float32))
    analyzed = run(core_venv, "analyze", "--features", str(features), "--labels", str(features))
    assert analyzed.returncode == 1
    assert "collapse-monitor[worker]" in analyzed.stderr
    assert len(analyzed.stderr.strip().splitlines()) == 1
    # The embedded API (no Redis) computes statistics in-process: refused at start, not at the
    # first request.
    embedded = run(core_venv, "api", "--port", str(free_port()))
    assert embedded.returncode == 2, embedded.stderr
    assert "collapse-monitor[worker]" in embedded.stderr


def fill_store(server: RedisServer) -> dict[str, Any]:
    """Three batches through the worker path, compacted and evaluated (this venv has torch)."""
    runtime = Runtime(Settings(redis_url=server.url, models=MODELS, windows=WINDOWS))
    rng = np.random.default_rng(0)
    for i in range(3):
        y = rng.integers(0, 16, size=200)
        x = (rng.normal(size=(200, 8)) + y[:, None] * 0.5).astype(np.float32)
        runtime.ingestor.ingest(encode_batch("m", x, y, batch_id=f"b{i}"))
    compact_model(runtime.store, "m")
    Evaluator(runtime).evaluate_model("m")
    document = runtime.store.snapshot("m", "15m")
    assert document is not None
    snapshot: dict[str, Any] = json.loads(document)
    return snapshot


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def start(venv: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [str(venv / "bin" / "collapse-monitor"), *args],
        env=env, cwd=venv.parent, stdout=out, stderr=out, start_new_session=True,
    )  # fmt: skip


def http(url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples_body(features: np.ndarray, labels: np.ndarray) -> bytes:
    def spec(dtype: str, a: np.ndarray) -> dict[str, Any]:
        return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a).decode()}

    return json.dumps(
        {"features": spec("float32", features), "labels": spec("int64", labels)}
    ).encode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, page = http(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.decode())
        for s in family.samples
    }


def test_status_exporter_and_api_run_without_torch(
    core_venv: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    snapshot = fill_store(redis_server)
    env = service_env(redis_server)

    status = run(core_venv, "status", "--format", "json", env=env)
    assert status.returncode == 0, status.stderr
    (model,) = json.loads(status.stdout)["models"]
    (window,) = model["windows"]
    assert (model["model"], window["window"], window["sample_count"]) == ("m", "15m", 600)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        procs.append(start(core_venv, env, tmp_path / "x.log", "exporter", "--port", str(port)))
        wait_for(lambda: http(f"http://127.0.0.1:{port}/healthz")[0] == 200, 60, "exporter")
        samples = scrape(port)
        assert samples[("collapse_store_up", ())] == 1
        labels = (("model", "m"), ("window", "15m"))
        for key in ("nc1_cdnv", "nc2_equinorm_cv", "anisotropy_mean_cos"):
            assert snapshot["metrics"][key] is not None
            assert samples[(f"collapse_{key}", labels)] == pytest.approx(snapshot["metrics"][key])
        assert rss_mb(procs[0].pid) < EXPORTER_RSS_LIMIT_MB

        api_port = free_port()
        api_env = {**env, "COLLAPSE_API_TOKEN": TOKEN}
        procs.append(start(core_venv, api_env, tmp_path / "a.log", "api", "--port", str(api_port)))
        wait_for(lambda: http(f"http://127.0.0.1:{api_port}/healthz")[0] == 200, 60, "api")
        url = f"http://127.0.0.1:{api_port}/v1/models/m/samples"
        x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
        y = np.arange(5, dtype=np.int64)
        accepted, _ = http(url, samples_body(x, y), TOKEN)
        assert accepted == 202
        assert redis_server.client().llen("ingest") == 1  # queued for a worker
        x[2, 3] = np.nan  # refused by the numpy checks, before the queue
        refused, answer = http(url, samples_body(x, y), TOKEN)
        assert refused == 400
        assert b"non_finite" in answer
        assert redis_server.client().llen("ingest") == 1
    finally:
        for proc in procs:
            stop_process(proc)
