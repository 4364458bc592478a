"""Real servers for integration tests: redis-server and celery workers on loopback.

Each helper binds 127.0.0.1 on a free port, waits until the server answers, and stops it
(SIGTERM, then SIGKILL after a bound) so no test can leave a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited in `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


class RedisServer:
    """A redis-server with AOF on (appendfsync always), restartable on the same port and data."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> None:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: bool(self.client().ping()), 15, "redis-server")

    def kill(self) -> None:
        """SIGKILL: what survives is exactly what the AOF holds."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def service_env(redis_url: str, models_json: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAPSE_")}
    env.update(
        {
            "COLLAPSE_REDIS_URL": redis_url,
            "COLLAPSE_MODELS": models_json,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **extra,
        }
    )
    return env


def worker_ready(log: Path, times: int = 1) -> bool:
    """The worker writing to `log` said "ready." (`times` times: once per (re)start)."""
    return log.exists() and log.read_text(errors="replace").count("ready.") >= times


def start_worker(
    env: dict[str, str], logfile: Path, queues: str = "ingest"
) -> subprocess.Popen[bytes]:
    """`collapse-monitor worker` in its own process group (so SIGKILL takes its pool too)."""
    log = open(logfile, "ab")  # noqa: SIM115 - lives as long as the worker
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "worker",
            "--queues",
            queues,
            "--concurrency",
            "1",
            "--loglevel",
            "info",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


class PrometheusServer:
    """prometheus on loopback scraping `targets` every second, with `rule_files` loaded."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        rule_files: list[Path],
        alertmanager: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "collapse", "static_configs": [{"targets": targets}]}],
        }
        if alertmanager:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
            }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.config}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: _http_ok(f"{self.url}/-/ready"), 30, "prometheus")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class AlertmanagerServer:
    """prometheus-alertmanager on loopback, no clustering, a null receiver."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "alertmanager.yml"
        self.config.write_text(
            json.dumps(
                {
                    "route": {
                        "receiver": "null",
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [{"name": "null"}],
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.workdir / "alertmanager.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "prometheus-alertmanager",
                f"--config.file={self.config}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.path={self.workdir / 'am-data'}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: _http_ok(f"{self.url}/-/ready"), 30, "alertmanager")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class RedisClusterServers:
    """A Redis Cluster of `masters` redis-servers on loopback (no replicas, no persistence).

    Each node gets a free client port and a free cluster-bus port (`--cluster-port`, Redis 7),
    `redis-cli --cluster create` assigns the 16384 slots evenly, and `start` returns once every
    node reports `cluster_state:ok`; `stop` ends every node, whatever happened.
    """

    def __init__(self, workdir: Path, masters: int = 3, password: str | None = None) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed (apt-get install redis)")
        self.binary, self.cli = server, cli
        self.workdir = workdir
        self.password = password
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A startup node's URL (clients discover the others from it)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password)

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node = self.workdir / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            args = [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", str(node / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--dir", str(node),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ]  # fmt: skip
            if self.password:
                args += ["--requirepass", self.password, "--masterauth", self.password]
            log = open(node / "redis.log", "ab")  # noqa: SIM115 - lives as long as the node
            self.procs.append(
                subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
            )
        for port in self.ports:
            wait_for(lambda p=port: bool(self.node_client(p).ping()), 15, f"cluster node {port}")  # type: ignore[misc]
        create = [self.cli, "--cluster", "create"]
        create += [f"127.0.0.1:{port}" for port in self.ports]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not on the command line (ps shows it)
        result = subprocess.run(
            create,
            capture_output=True,
            text=True,
            env=env,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout}{result.stderr}")
        wait_for(self._ok, max(1.0, deadline - time.monotonic()), "redis cluster_state:ok")

    def _ok(self) -> bool:
        for port in self.ports:
            info = self.node_client(port).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


class RedisSentinelServer:
    """One redis-sentinel on loopback watching `master` (a started `RedisServer`) as `name`.

    Quorum 1 and short timeouts, so a failover to a replica takes seconds. `sentinel_password`
    makes the sentinel itself require AUTH; the master's password reaches it via auth-pass.
    """

    def __init__(
        self,
        workdir: Path,
        master: RedisServer,
        name: str = "mymaster",
        sentinel_password: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.master = master
        self.name = name
        self.sentinel_password = sentinel_password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.sentinel_password)

    def start(self) -> None:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {self.name} 1000",
            f"sentinel failover-timeout {self.name} 5000",
            f"sentinel parallel-syncs {self.name} 1",
        ]
        if self.master.password:
            lines.append(f"sentinel auth-pass {self.name} {self.master.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        config = self.workdir / f"sentinel-{self.port}.conf"  # sentinel rewrites its config
        config.write_text("\n".join(lines) + "\n")
        log = open(self.workdir / f"sentinel-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: self.master_address() is not None, 15, "redis-sentinel")

    def master_address(self) -> tuple[str, int] | None:
        found = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        if not found:
            return None
        host, port = found
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
