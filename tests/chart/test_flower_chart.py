"""Flower in the chart (flower.enabled; tests/chart/values/flower.yaml): worker metrics, safely.

The generic checks of test_chart.py (lint, manifests validated, labels, locked-down pods, home
and settings) run on the `flower` value set too; then what is Flower's own: off by default,
basic auth from a Secret and never on the command line, read-only, no persistent mode, probes
and ServiceMonitor on the paths Flower serves, the NetworkPolicy, the refused options. The slow
test starts Flower exactly as rendered (arguments, ConfigMap and Secret environment) against a
real redis-server and checks what each path answers with and without the credentials.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import test_chart
from test_chart import FULLNAME, NAMESPACE, find, one, rendered, run_helm, template, value_args
from test_least_privilege import (
    REDIS_SECRETS,
    admits,
    free_port,
    redis_script,
    secret_env,
    start,
    stop,
    wait_until,
)

VALUE_SET = "flower"
GENERIC_CHECKS = (
    test_chart.test_helm_lint_strict,
    test_chart.test_every_manifest_validates,
    test_chart.test_resources_carry_standard_labels_and_unique_names,
    test_chart.test_every_pod_is_locked_down,
    test_chart.test_app_pods_have_writable_home_and_settings,
    test_chart.test_beat_is_exactly_one_and_never_two,
    test_chart.test_services_select_pods_with_their_ports,
)


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(docs, "Deployment", "flower")["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    return dict(main)


@pytest.mark.parametrize("check", GENERIC_CHECKS, ids=lambda f: f.__name__)
def test_generic_chart_checks_pass_with_flower(check: Any) -> None:
    check(VALUE_SET)


def test_flower_is_off_by_default() -> None:
    docs = rendered("default")
    names = [d["metadata"]["name"] for d in docs if d["kind"] != "ConfigMap"]
    assert not [n for n in names if "flower" in n]


def test_flower_runs_read_only_without_persistence_and_with_auth_from_a_secret() -> None:
    docs = rendered(VALUE_SET)
    main = container(docs)
    assert main["command"] == ["celery"]
    args = main["args"]
    assert args[:2] == ["--app=monitor.worker.flower", "flower"]
    assert "--read_only=true" in args
    assert "--persistent=false" in args
    assert "--purge_offline_workers=300" in args
    assert "--url_prefix=flower" in args
    assert not [a for a in args if "basic_auth" in a or "password" in a.lower()]
    env = {e["name"]: e for e in main["env"]}
    ref = env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{FULLNAME}-flower-auth", "key": "basic-auth"}
    assert env["FLOWER_UNAUTHENTICATED_API"]["value"] == "false"
    secret = one(docs, "Secret", "flower-auth")
    user, password = base64.b64decode(secret["data"]["basic-auth"]).decode().split(":")
    assert user == "admin"
    assert len(password) == 32
    assert password.isalnum()
    # Redis as every component reaches it, plus Flower's own credentials; no API token.
    found = secret_env(main)
    assert found - REDIS_SECRETS == {"FLOWER_BASIC_AUTH"}
    assert found & REDIS_SECRETS
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/flower/healthcheck", "port": "http"}


def test_flower_service_monitor_follows_the_exporter_conventions() -> None:
    docs = template(*value_args(VALUE_SET), "--set", "serviceMonitor.labels.team=ml",
                    "--set", "monitoring.labels.tier=obs",
                    "--set-json", 'serviceMonitor.relabelings=[{"targetLabel":"cluster",'
                    '"replacement":"prod"}]')  # fmt: skip
    monitors = {d["metadata"]["name"]: d for d in find(docs, "ServiceMonitor")}
    exporter, flower = monitors[FULLNAME], monitors[f"{FULLNAME}-flower"]
    for key in ("release", "team", "tier", "app.kubernetes.io/part-of"):
        assert flower["metadata"]["labels"][key] == exporter["metadata"]["labels"][key], key
    (endpoint,) = flower["spec"]["endpoints"]
    assert endpoint["path"] == "/flower/metrics"
    assert endpoint["port"] == "http"
    assert "basicAuth" not in endpoint  # Flower serves /metrics outside its auth
    assert endpoint["relabelings"] == exporter["spec"]["endpoints"][0]["relabelings"]
    assert flower["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = one(docs, "Service", "flower")
    assert (
        flower["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    off = template(*value_args(VALUE_SET), "--set", "flower.serviceMonitor.enabled=false")
    assert not find(off, "ServiceMonitor", "-flower")


def test_flower_network_policy_admits_ui_users_and_scrapers_only() -> None:
    docs = rendered(VALUE_SET)
    policies = find(docs, "NetworkPolicy")
    pod = {"app.kubernetes.io/name": "collapse-monitor", "app.kubernetes.io/instance": "cm",
           "app.kubernetes.io/component": "flower"}  # fmt: skip
    user = (NAMESPACE, {"collapse-monitor/flower-user": "true"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    stranger = (NAMESPACE, {"app": "other"})
    assert admits(policies, pod, 5555, *user)
    assert admits(policies, pod, 5555, *prometheus)
    assert not admits(policies, pod, 5555, *stranger)
    none = template(*value_args(VALUE_SET), "--set-json", "flower.uiFrom=[]",
                    "--set-json", "networkPolicy.metricsFrom=[]")  # fmt: skip
    assert not admits(find(none, "NetworkPolicy"), pod, 5555, *user)


def test_flower_existing_secret_and_refused_values() -> None:
    docs = template("--set", "flower.enabled=true", "--set", "flower.basicAuth.existingSecret=ops",
                    "--set", "flower.basicAuth.secretKey=creds")  # fmt: skip
    assert not find(docs, "Secret", "flower-auth")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "ops", "key": "creds"}
    for arg in ("--persistent", "--persistent=true", "--db=/tmp/f", "--debug",
                "--basic_auth=a:b", "--port=1"):  # fmt: skip
        result = run_helm("template", "--set", "flower.enabled=true",
                          "--set", f"flower.extraArgs[0]={arg}")  # fmt: skip
        assert result.returncode != 0, arg
        assert "is refused" in result.stderr, result.stderr
    gitops = run_helm("template", "--set", "flower.enabled=true", "--set", "auth.generate=false",
                      "--set", "auth.apiToken=t", "--set", "auth.redisPassword=p")  # fmt: skip
    assert gitops.returncode != 0
    assert "flower.basicAuth.existingSecret or flower.basicAuth.password" in gitops.stderr
    given = template("--set", "flower.enabled=true", "--set", "flower.basicAuth.password=pw",
                     "--set", "auth.generate=false", "--set", "auth.apiToken=t",
                     "--set", "auth.redisPassword=p")  # fmt: skip
    data = one(given, "Secret", "flower-auth")["data"]["basic-auth"]
    assert base64.b64decode(data) == b"admin:pw"
    bad = run_helm(
        "template", "--set", "flower.enabled=true", "--set", "flower.basicAuth.password=a\\,b"
    )
    assert "values don't meet the specifications of the schema" in bad.stderr


def _get(url: str, auth: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.slow
def test_flower_runs_as_rendered_and_guards_its_ui(tmp_path: Path) -> None:
    """Flower with the rendered arguments and environment (Secrets resolved), against the
    rendered Redis with its password: /metrics and /healthcheck answer anyone, the UI and API
    only the credentials, control commands are refused (read-only), nothing is written to the
    working directory, and neither password reaches the log."""
    assert shutil.which("redis-server"), "redis-server not found: apt-get install redis-server"
    redis_port, port = free_port(), free_port()
    models = '[{"name":"m","vocab_size":50,"dim":8}]'
    docs = template(*value_args(VALUE_SET), "--set", f"redis.port={redis_port}",
                    "--set", f"flower.port={port}",
                    "--set-json", f"settings.models={models}")  # fmt: skip
    secrets = {
        (d["metadata"]["name"], k): base64.b64decode(v).decode()
        for d in find(docs, "Secret")
        for k, v in d["data"].items()
    }
    redis_password = secrets[(f"{FULLNAME}-auth", "redis-password")]
    credentials = secrets[(f"{FULLNAME}-flower-auth", "basic-auth")]
    data = tmp_path / "data"
    data.mkdir()
    script = redis_script(docs).replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
    script = script.replace("--dir /data", f"--dir {data}").rstrip() + " --bind 127.0.0.1\n"
    server = start(
        ["sh", "-c", script],
        {"PATH": os.environ["PATH"], "REDIS_PASSWORD": redis_password},
        tmp_path / "r.log",
    )
    procs = [server]
    try:
        client = redis.Redis(host="127.0.0.1", port=redis_port, password=redis_password)
        wait_until(client.ping, 15, "redis-server", server)
        main = container(docs)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(test_chart.ROOT)}
        env.update(one(docs, "ConfigMap", "settings")["data"])
        for item in main["env"]:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            env[item["name"]] = item["value"] if ref is None else secrets[(ref["name"], ref["key"])]
        env["COLLAPSE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        env["HOME"] = env["HF_HOME"] = str(tmp_path)
        args = [a.replace("--address=0.0.0.0", "--address=127.0.0.1") for a in main["args"]]
        workdir = tmp_path / "cwd"
        workdir.mkdir()
        log = tmp_path / "flower.log"
        with open(log, "ab") as handle:
            flower = subprocess.Popen([sys.executable, "-m", "celery", *args], env=env,
                                      cwd=workdir, stdout=handle, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
        procs.append(flower)
        base = f"http://127.0.0.1:{port}/flower"
        wait_until(lambda: _get(f"{base}/healthcheck") == 200, 60, "flower", flower)
        assert _get(f"{base}/metrics") == 200
        assert _get(f"{base}/") == 401
        assert _get(f"{base}/", "admin:wrong") == 401
        assert _get(f"{base}/", credentials) == 200
        assert _get(f"{base}/api/workers?refresh=0") == 401
        assert _get(f"{base}/api/workers?refresh=0", credentials) == 200
        shutdown = f"{base}/api/worker/shutdown/celery@nowhere"
        assert _get(shutdown, method="POST") == 401
        assert _get(shutdown, credentials, method="POST") == 403  # read-only mode
        assert _get(f"{base}/api/task/revoke/x", credentials, method="POST") == 403
    finally:
        for proc in reversed(procs):
            stop(proc)
    assert list(workdir.iterdir()) == []  # no state file (persistent mode is off)
    text = log.read_text(errors="replace")
    assert "Visit me at" in text
    assert redis_password not in text
    assert credentials.split(":", 1)[1] not in text
