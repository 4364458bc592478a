"""The direct Alertmanager client against a real prometheus-alertmanager on loopback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from servers import AlertmanagerServer, free_port, http_json, wait_for

from monitor.alerts.alertmanager import Alert, AlertmanagerClient

LABELS = {"alertname": "CollapseTest", "severity": "warning", "model": "m", "window": "1h"}


def _active(server: AlertmanagerServer) -> list[dict[str, object]]:
    alerts = http_json(f"{server.url}/api/v2/alerts?active=true&silenced=false&inhibited=false")
    return [a for a in alerts if a["labels"].get("alertname") == "CollapseTest"]


def test_fires_then_resolves(tmp_path: Path) -> None:
    server = AlertmanagerServer(tmp_path)
    server.start()
    try:
        client = AlertmanagerClient(server.url)
        alert = Alert(LABELS, {"summary": "test"})
        assert client.update([alert])
        wait_for(lambda: len(_active(server)) == 1, 15, "alert active")
        assert client.update([alert])  # a refresh, not a second alert
        assert len(_active(server)) == 1
        assert client.update([])  # no longer firing: resolved
        wait_for(lambda: not _active(server), 15, "alert resolved")
    finally:
        server.stop()


def test_alerts_are_retried_until_alertmanager_is_back(tmp_path: Path) -> None:
    port = free_port()
    now = [1000.0]
    client = AlertmanagerClient(f"http://127.0.0.1:{port}", timeout=1.0, clock=lambda: now[0])
    alert = Alert(LABELS, {"summary": "while down"})
    assert not client.update([alert])
    assert client.pending == 1
    now[0] += 1.0
    assert not client.flush()  # still inside the backoff: no attempt, no hang
    server = AlertmanagerServer(tmp_path)
    server.port = port
    server.start()
    try:
        now[0] += 600.0  # past the backoff
        assert client.flush()
        assert client.pending == 0
        wait_for(lambda: len(_active(server)) == 1, 15, "alert delivered after the outage")
    finally:
        server.stop()


def test_credentials_never_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pydantic import SecretStr

    token, password = "tok-9f8e7d6c5b4a", "pw-1a2b3c4d5e6f"
    port = free_port()  # nothing listens: every post fails and is logged
    for client in (
        AlertmanagerClient(f"http://127.0.0.1:{port}", bearer_token=SecretStr(token)),
        AlertmanagerClient(
            f"http://127.0.0.1:{port}", username="ops", password=SecretStr(password)
        ),
    ):
        with caplog.at_level(logging.DEBUG):
            assert not client.update([Alert(LABELS)])
    assert "alertmanager unreachable" in caplog.text
    assert token not in caplog.text
    assert password not in caplog.text
