"""The chart's exec probes, run as the kubelet would against real processes.

- Redis: the rendered container command replays a real AOF slowly (`--key-load-delay`), and the
  rendered probes must pass while `PING` answers LOADING (a failing liveness probe would restart
  the replay forever), and fail when Redis is down or the password is wrong.
- worker and beat, started with their rendered arguments and environment: the rendered startup
  and liveness checks pass once the heartbeat file exists, the file is refreshed by the
  processes' own loops, and it stops being refreshed while the worker is frozen (SIGSTOP).
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from test_chart import one, template
from test_least_privilege import free_port, pod_env, redis_script, start, stop, wait_until

pytestmark = pytest.mark.slow
MODELS = '[{"name":"m","vocab_size":50,"dim":8}]'


def probe(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert command[:2] == ["sh", "-c"], command
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip


def local_script(docs: list[dict[str, Any]], tmp_path: Path, *extra: str) -> str:
    """The Redis container's command with its two paths moved under tmp_path, on loopback."""
    script = redis_script(docs).replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    script = script.replace("--dir /data", f"--dir {data}")
    return script.rstrip() + " --bind 127.0.0.1 " + " ".join(extra) + "\n"


def redis_probes(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    container = one(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    return {p: container[p]["exec"]["command"] for p in ("livenessProbe", "readinessProbe")}


def test_redis_probes_pass_while_the_aof_loads_and_fail_when_redis_does(tmp_path: Path) -> None:
    port = free_port()
    docs = template("--set", f"redis.port={port}")
    password = base64.b64decode(one(docs, "Secret", "auth")["data"]["redis-password"]).decode()
    server_env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    probe_env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}  # as the pod sets it
    probes = redis_probes(docs)
    client = redis.Redis(host="127.0.0.1", port=port, password=password)

    server = start(["sh", "-c", local_script(docs, tmp_path)], server_env, tmp_path / "a.log")
    try:
        wait_until(client.ping, 15, "redis-server", server)
        pipe = client.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"k{i}", b"v")
        pipe.execute()
        for name, command in probes.items():
            assert probe(command, probe_env).returncode == 0, name
        wrong = {**probe_env, "REDISCLI_AUTH": "wrong"}
        assert probe(probes["livenessProbe"], wrong).returncode != 0
        with contextlib.suppress(redis.ConnectionError):  # the connection drops
            client.shutdown()  # writes the AOF out
        server.wait(timeout=30)
    finally:
        stop(server)
    for name, command in probes.items():  # nobody listening
        assert probe(command, probe_env).returncode != 0, name

    # 20,000 keys at 300 us each: a replay of about 6 s, during which PING answers LOADING.
    slow = local_script(docs, tmp_path, "--key-load-delay", "300")
    server = start(["sh", "-c", slow], server_env, tmp_path / "b.log")
    try:
        ping = ["sh", "-c", f"redis-cli -p {port} ping"]  # what the probes see, unfiltered
        deadline = time.monotonic() + 15
        while not probe(ping, probe_env).stdout.startswith("LOADING"):
            assert time.monotonic() < deadline, "Redis was never seen loading its AOF"
            assert server.poll() is None, "redis-server exited"
            time.sleep(0.05)
        for name, command in probes.items():
            result = probe(command, probe_env)
            assert result.returncode == 0, f"{name} failed while loading: {result.stdout}"
        raw = probe(ping, probe_env).stdout
        assert raw.startswith("LOADING"), f"the replay ended before the probes ran: {raw!r}"
        wait_until(client.ping, 60, "the AOF replay", server)
        assert client.dbsize() == 20_000
        for name, command in probes.items():
            assert probe(command, probe_env).returncode == 0, name
    finally:
        stop(server)


def mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def moved(items: list[str], heartbeat: Path) -> list[str]:
    """Arguments or a probe command with the pod's heartbeat path moved to `heartbeat`."""
    return [item.replace("/tmp/heartbeat", str(heartbeat)) for item in items]


def test_worker_and_beat_keep_their_heartbeats_fresh(tmp_path: Path) -> None:
    port = free_port()
    docs = template("--set", f"redis.port={port}", "--set-json", f"settings.models={MODELS}")
    password = base64.b64decode(one(docs, "Secret", "auth")["data"]["redis-password"]).decode()
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    path_only = {"PATH": os.environ["PATH"]}
    server = start(["sh", "-c", local_script(docs, tmp_path)], env, tmp_path / "redis.log")
    procs = [server]
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        wait_until(client.ping, 15, "redis-server", server)
        url = f"redis://127.0.0.1:{port}/0"
        running: dict[str, tuple[subprocess.Popen[bytes], Path, dict[str, Any]]] = {}
        for component in ("worker", "beat"):
            pod = one(docs, "Deployment", component)["spec"]["template"]["spec"]
            container = pod["containers"][0]
            heartbeat = tmp_path / f"{component}.heartbeat"
            args = moved(container["args"], heartbeat)
            assert f"--heartbeat-file={heartbeat}" in args
            if component == "worker":  # one pool process is enough here
                args = [a for a in args if not a.startswith("--concurrency")]
                args.append("--concurrency=1")
            check = moved(container["livenessProbe"]["exec"]["command"], heartbeat)
            assert probe(check, path_only).returncode != 0  # no heartbeat yet
            home = tmp_path / component
            home.mkdir()
            log = tmp_path / f"{component}.log"
            proc = start([sys.executable, "-m", "monitor.cli", *args],
                         pod_env(docs, component, url, home), log)  # fmt: skip
            procs.append(proc)
            running[component] = (proc, heartbeat, container)

        for component, (proc, heartbeat, container) in running.items():
            startup = moved(container["startupProbe"]["exec"]["command"], heartbeat)
            live = moved(container["livenessProbe"]["exec"]["command"], heartbeat)
            wait_until(lambda c=startup: probe(c, path_only).returncode == 0, 90,
                       f"{component} heartbeat", proc)  # fmt: skip
            assert probe(live, path_only).returncode == 0
            first = mtime(heartbeat)
            # Touched again by the process's own loop (every 10 s).
            wait_until(lambda f=heartbeat, t=first: mtime(f) > t, 25, f"{component} refresh", proc)

        worker, heartbeat, _ = running["worker"]
        os.killpg(worker.pid, signal.SIGSTOP)  # a hung worker: its loop stops turning
        try:
            frozen = mtime(heartbeat)
            time.sleep(12)
            assert mtime(heartbeat) == frozen, "a frozen worker's heartbeat moved"
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        wait_until(lambda: mtime(heartbeat) > frozen, 25, "worker refresh after SIGCONT", worker)
    finally:
        for proc in reversed(procs):
            stop(proc)
