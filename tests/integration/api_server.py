"""A real `collapse-monitor api` process, raw HTTP over sockets, and a pausable TCP proxy.

The API runs as the deployed command (uvicorn, its own event loop and thread pools), so body
deadlines, byte budgets and rate bounds are tested where they act. Raw sockets let a test be
the slow or greedy client that `urllib` would never be. `PausableProxy` sits between the API
and the broker: paused, it holds the bytes a client sent (a broker gone silent mid-send), and
on resume delivers them, so a send the API gave up on still reaches the queue.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import ROOT, free_port, stop_process, wait_for

TOKEN = "tok-hardening-0123456789abcdef"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ApiProcess:
    """`python -m monitor.cli api` on a free loopback port; stopped with its process group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = {**env, "COLLAPSE_API_TOKEN": TOKEN}
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiProcess:
        out = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "api", "--port", str(self.port)],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        wait_for(lambda: self.request("GET", "/healthz").status == 200, 60, "api process")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def connect(self, source: str = "127.0.0.1", timeout: float = 30.0) -> socket.socket:
        """A connection from `source` (any 127.x.y.z: a distinct client address on loopback)."""
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=timeout, source_address=(source, 0)
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        token: str | None = TOKEN,
        content_type: str = "application/json",
        source: str = "127.0.0.1",
        timeout: float = 30.0,
    ) -> Answer:
        with self.connect(source, timeout) as sock:
            sock.sendall(head(method, path, len(body), token, content_type) + body)
            return read_answer(sock)

    def post(self, document: Any, model: str = "m", **kwargs: Any) -> Answer:
        data = json.dumps(document).encode()
        return self.request("POST", f"/v1/models/{model}/samples", data, **kwargs)


def head(
    method: str,
    path: str,
    length: int | None,
    token: str | None = TOKEN,
    content_type: str = "application/json",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines.append(framing)
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response (Content-Length framed, as uvicorn sends JSON)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before an answer: {data!r}")
        data += chunk
    raw_head, rest = data.split(b"\r\n\r\n", 1)
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Answer(status, headers, rest[:length])


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection within `timeout` (reads drain any data)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


class PausableProxy:
    """TCP forwarder 127.0.0.1:port -> 127.0.0.1:target; `pause()` holds traffic both ways."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.running = threading.Event()
        self.running.set()
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            self.sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes while running; while paused, leave them in the kernel's buffers."""
        try:
            while not self.stopped.is_set():
                if not self.running.wait(0.1):
                    continue
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable or not self.running.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopped.set()
        self.running.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self.threads:
            thread.join(timeout=2)
