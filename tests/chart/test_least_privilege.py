"""Least privilege in the chart: secrets per component, network policies, a bounded Redis.

Each component gets only the secrets it uses: every one talks to Redis (store and broker
credentials); only the API checks the API token; only a worker on the maintenance queue, where
the evaluator pushes its verdicts to Alertmanager, gets the Alertmanager credentials. Ingress
is admitted only from the peers named in values (checked with a small evaluator of NetworkPolicy
semantics over pods in and out of the named namespaces). The chart's Redis gets a maxmemory
below its memory limit, and the rendered Redis command, run as a real redis-server, refuses
writes at the bound instead of growing past it. Components started as real processes with
exactly their rendered environment (and nothing else) come up and serve.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from render_rules import ROOT
from test_chart import (
    FULLNAME,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    find,
    one,
    rendered,
    run_helm,
    template,
    value_args,
)

REDIS_SECRETS = {
    "REDIS_USERNAME",  # from a Secret only with redis.external.usernameKey
    "COLLAPSE_REDIS_PASSWORD",
    "COLLAPSE_REDIS_SENTINEL_PASSWORD",
    "COLLAPSE_BROKER_PASSWORD",
}
API_SECRETS = {"COLLAPSE_API_TOKEN"}
ALERT_SECRETS = {"COLLAPSE_ALERTMANAGER_PASSWORD", "COLLAPSE_ALERTMANAGER_TOKEN"}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def secret_env(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["name"]).removeprefix(f"{FULLNAME}-")


# --- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_each_component_gets_only_the_secrets_it_uses(value_set: str) -> None:
    docs = template(*value_args(value_set))
    alerting = value_set == "alerting"
    deployments = find(docs, "Deployment")
    assert deployments
    store = None
    for doc in deployments:
        name = component(doc)
        spec = doc["spec"]["template"]["spec"]
        assert not [v for v in spec.get("volumes", []) if "secret" in v or "projected" in v], name
        for c in containers(doc):
            assert not [e for e in c.get("envFrom", []) if "secretRef" in e], name
        (main,) = spec["containers"]
        found = secret_env(main)
        redis_part = found & REDIS_SECRETS
        store = redis_part if store is None else store
        assert redis_part == store, f"{name}: every component reaches Redis the same way"
        queues = next((a.split("=", 1)[1] for a in main["args"] if a.startswith("--queues=")), "")
        expected = set(redis_part)
        if name == "api":
            expected |= API_SECRETS
        if alerting and "maintenance" in queues.split(","):
            expected |= ALERT_SECRETS
        assert found == expected, f"{name} in {value_set}: {sorted(found ^ expected)}"
    assert store, "the Redis password reaches the components"
    if alerting:  # the one component that sends alerts is there, with its credentials
        worker = one(docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
        assert secret_env(worker) >= ALERT_SECRETS
        gpu = one(docs, "Deployment", "gpu-worker")["spec"]["template"]["spec"]["containers"][0]
        assert not ALERT_SECRETS & secret_env(gpu)


def test_alert_credentials_follow_the_maintenance_queue() -> None:
    docs = template(*value_args("alerting"), "--set", "worker.queues=ingest",
                    "--set", "gpuWorker.queues=embed\\,maintenance")  # fmt: skip
    env = {component(d): secret_env(d["spec"]["template"]["spec"]["containers"][0])
           for d in find(docs, "Deployment")}  # fmt: skip
    assert [name for name, found in env.items() if found >= ALERT_SECRETS] == ["gpu-worker"]
    assert not [name for name, found in env.items() if found & ALERT_SECRETS and
                name != "gpu-worker"]  # fmt: skip
    # No alertmanager_url: the evaluator sends nothing, so nobody gets the credentials.
    docs = template("--set", "auth.alertmanagerPassword=x")
    assert not [
        d
        for d in find(docs, "Deployment")
        if secret_env(d["spec"]["template"]["spec"]["containers"][0]) & ALERT_SECRETS
    ]


# --- network policies ------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admits(policies: list[dict[str, Any]], target: dict[str, str], port: int,
           source_ns: str, source: dict[str, str]) -> bool:  # fmt: skip
    """Whether ingress from a pod (namespace, labels) to `target` pods on `port` is allowed."""
    applying = [p for p in policies if selects(p["spec"]["podSelector"], target)]
    assert applying, f"no policy selects {target}: all ingress would be open"
    ns_labels = {"kubernetes.io/metadata.name": source_ns}
    for policy in applying:
        for rule in policy["spec"].get("ingress") or []:
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", [{"namespaceSelector": {}}]):
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    in_ns = selects(peer["namespaceSelector"], ns_labels)
                else:
                    in_ns = source_ns == NAMESPACE  # a bare podSelector: the policy's namespace
                if in_ns and selects(peer.get("podSelector", {}), source):
                    return True
    return False


def pod_labels(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


GATEWAY = {"app": "gateway", "collapse-monitor/ingest-client": "true"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack"}
KEDA = {"app": "keda-operator"}
STRANGER = {"app": "anything"}


def test_default_policies_admit_only_labelled_ingest_clients_and_prometheus() -> None:
    docs = rendered("default")
    policies = find(docs, "NetworkPolicy")
    api, exporter = (
        pod_labels(docs, "Deployment", "api"),
        pod_labels(docs, "Deployment", "exporter"),
    )
    store = pod_labels(docs, "StatefulSet", "redis")
    own_worker = pod_labels(docs, "Deployment", "worker")
    # The API: pods of the release's namespace labelled as ingest clients, nothing else.
    assert admits(policies, api, 8000, NAMESPACE, GATEWAY)
    assert not admits(policies, api, 8000, NAMESPACE, STRANGER)
    assert not admits(policies, api, 8000, "serving", GATEWAY)  # another namespace: name it
    assert not admits(policies, api, 8000, "monitoring", PROMETHEUS)
    assert not admits(policies, api, 9464, NAMESPACE, GATEWAY)  # only its own port
    # The exporter: Prometheus in the monitoring namespace.
    assert admits(policies, exporter, 9464, "monitoring", PROMETHEUS)
    assert not admits(policies, exporter, 9464, "default", PROMETHEUS)
    assert not admits(policies, exporter, 9464, "monitoring", STRANGER)
    assert not admits(policies, exporter, 9464, NAMESPACE, GATEWAY)
    # Redis: the release's own pods; nobody else, KEDA only when it scales on the queues.
    assert admits(policies, store, 6379, NAMESPACE, own_worker)
    for ns, labels in ((NAMESPACE, GATEWAY), ("monitoring", PROMETHEUS), ("keda", KEDA)):
        assert not admits(policies, store, 6379, ns, labels)
    # Workers and beat: nobody.
    for name in ("worker", "beat"):
        target = pod_labels(docs, "Deployment", name)
        for ns, labels in ((NAMESPACE, GATEWAY), ("monitoring", PROMETHEUS), (NAMESPACE, api)):
            assert not admits(policies, target, 8000, ns, labels), name


def test_named_peers_replace_the_defaults_and_an_empty_list_admits_nobody() -> None:
    docs = rendered("alerting")
    policies = find(docs, "NetworkPolicy")
    api, exporter = (
        pod_labels(docs, "Deployment", "api"),
        pod_labels(docs, "Deployment", "exporter"),
    )
    assert admits(policies, api, 8000, "serving", {"app": "vllm-gateway"})
    assert not admits(policies, api, 8000, NAMESPACE, GATEWAY)  # the default is replaced
    assert not admits(policies, api, 8000, "other", {"app": "vllm-gateway"})
    assert admits(policies, exporter, 9464, "observability", PROMETHEUS)
    assert not admits(policies, exporter, 9464, "monitoring", PROMETHEUS)
    policy = one(docs, "NetworkPolicy", "exporter")
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in policy["spec"]["ingress"][0]["from"]
    docs = template("--set-json", "networkPolicy.apiFrom=[]",
                    "--set-json", "networkPolicy.metricsFrom=[]")  # fmt: skip
    for name in ("api", "exporter"):
        assert one(docs, "NetworkPolicy", name)["spec"]["ingress"] == [], name
    policies = find(docs, "NetworkPolicy")
    assert not admits(policies, pod_labels(docs, "Deployment", "api"), 8000, NAMESPACE, GATEWAY)


def test_keda_operator_reaches_redis_only_when_keda_scales() -> None:
    docs = rendered("keda")
    policies = find(docs, "NetworkPolicy")
    store = pod_labels(docs, "StatefulSet", "redis")
    assert admits(policies, store, 6379, "keda", KEDA)
    assert not admits(policies, store, 6379, "keda", STRANGER)
    assert not admits(policies, store, 6379, NAMESPACE, KEDA)


# --- Redis maxmemory ---------------------------------------------------------------------------


def redis_script(docs: list[dict[str, Any]]) -> str:
    container = one(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["sh", "-c"]
    script: str = container["command"][2]
    return script


def maxmemory_of(script: str) -> str:
    match = re.search(r"--maxmemory (\S+)", script)
    assert match, script
    assert "--maxmemory-policy noeviction" in script
    return match.group(1)


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], str(int(2 * 1024**3 * 0.8))),  # the default 2Gi limit, 80 %
        (["redis.resources.limits.memory=512Mi", "redis.maxmemoryPercent=75"],
         str(int(512 * 1024**2 * 0.75))),
        (["redis.resources.limits.memory=3G"], str(int(3e9 * 0.8))),
        (["redis.resources.limits.memory=1.5Gi"], str(int(1.5 * 1024**3 * 0.8))),
        (["redis.maxmemory=1gb"], "1gb"),  # explicit, in Redis's own units
    ],
)  # fmt: skip
def test_redis_maxmemory_is_derived_from_its_memory_limit(sets: list[str], expected: str) -> None:
    args = [arg for s in sets for arg in ("--set", s)]
    assert maxmemory_of(redis_script(template(*args))) == expected


def test_redis_without_a_memory_limit_or_maxmemory_fails_the_render() -> None:
    result = run_helm("template", RELEASE, "--set", "redis.resources.limits=null")
    assert result.returncode != 0
    assert "redis.resources.limits.memory is required" in result.stderr, result.stderr
    result = run_helm("template", RELEASE, "--set", "redis.resources.limits=null",
                      "--set", "redis.maxmemory=100mb")  # fmt: skip
    assert result.returncode == 0, result.stderr


# --- real processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(args, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: the process exited with {proc.returncode}"
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def pod_env(docs: list[dict[str, Any]], name: str, redis_url: str, home: Path) -> dict[str, str]:
    """A pod's environment as Kubernetes would build it: the settings ConfigMap, then the env
    list with secretKeyRefs resolved from the rendered Secret (an optional key it lacks stays
    unset). Nothing from the test's own environment leaks in but PATH and the interpreter's."""
    secret = {
        k: base64.b64decode(v).decode() for k, v in one(docs, "Secret", "auth")["data"].items()
    }
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    env.update(one(docs, "ConfigMap", "settings")["data"])
    container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[item["name"]] = item["value"]
        elif ref["key"] in secret:
            env[item["name"]] = secret[ref["key"]]
        else:
            assert ref.get("optional"), f"{name}: {ref} is missing and not optional"
    env["COLLAPSE_REDIS_URL"] = redis_url  # the Service name, resolved here to loopback
    env["HOME"] = env["HF_HOME"] = str(home)  # /home/app in the pod
    return env


@pytest.mark.slow
def test_rendered_redis_refuses_writes_at_maxmemory_and_components_run_on_their_secrets(
    tmp_path: Path,
) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: apt-get install redis-server provides it")
    port = free_port()
    docs = template(
        "--set", f"redis.port={port}", "--set", "redis.resources.limits.memory=64Mi",
        "--set-json", 'settings.models=[{"name":"m","vocab_size":50,"dim":8}]',
    )  # fmt: skip
    script = redis_script(docs)
    limit = int(maxmemory_of(script))
    assert limit == int(64 * 1024**2 * 0.8)
    data = tmp_path / "data"
    data.mkdir()
    # The container's own command, with its two paths moved here and bound to loopback.
    script = script.replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
    script = script.replace("--dir /data", f"--dir {data}").rstrip() + " --bind 127.0.0.1\n"
    password = base64.b64decode(one(docs, "Secret", "auth")["data"]["redis-password"]).decode()
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    server = start(["sh", "-c", script], env, tmp_path / "redis.log")
    procs = [server]
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        wait_until(client.ping, 15, "redis-server", server)
        assert int(client.config_get("maxmemory")["maxmemory"]) == limit
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        chunk = b"x" * (1 << 20)
        written = 0
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):  # noqa: PT012
            for i in range(200):  # 200 MiB: far past the bound, and past the 64Mi limit
                client.set(f"fill:{i}", chunk)
                written += 1
        assert written > 0
        assert server.poll() is None, "Redis must refuse writes, not die"
        memory = client.info("memory")
        # Refused at the bound (not before), the last write taken a chunk over at most:
        # well under the container's 64Mi, where the kernel would have killed it.
        assert limit - 3 * len(chunk) <= int(memory["used_memory"]) <= limit + 3 * len(chunk)
        assert int(memory["used_memory"]) < 64 * 1024**2
        assert client.get("fill:0") == chunk  # what was written stays readable
        client.delete(*[f"fill:{i}" for i in range(200)])
        client.set("after", b"ok")  # and writes resume once memory is freed

        url = f"redis://127.0.0.1:{port}/0"
        exporter_port = free_port()
        exporter_env = pod_env(docs, "exporter", url, tmp_path)
        assert not set(exporter_env) & (API_SECRETS | ALERT_SECRETS)
        exporter = start(
            [sys.executable, "-m", "monitor.cli", "exporter",
             "--host", "127.0.0.1", "--port", str(exporter_port)],
            exporter_env, tmp_path / "exporter.log",
        )  # fmt: skip
        procs.append(exporter)
        worker_env = pod_env(docs, "worker", url, tmp_path)
        assert not set(worker_env) & (API_SECRETS | ALERT_SECRETS)
        worker = start([sys.executable, "-m", "monitor.cli", "worker", "--queues",
                        "ingest,maintenance", "--concurrency", "1", "--pool", "solo"],
                       worker_env, tmp_path / "worker.log")  # fmt: skip
        procs.append(worker)
        api_port = free_port()
        api = start(
            [sys.executable, "-m", "monitor.cli", "api",
             "--host", "127.0.0.1", "--port", str(api_port)],
            pod_env(docs, "api", url, tmp_path), tmp_path / "api.log",
        )  # fmt: skip
        procs.append(api)

        def metrics() -> str:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{exporter_port}/metrics", timeout=5
            ) as r:
                return str(r.read().decode())

        wait_until(lambda: "collapse_store_up 1.0" in metrics(), 90, "exporter", exporter)
        wait_until(lambda: b"ready." in (tmp_path / "worker.log").read_bytes(), 120, "worker",
                   worker)  # fmt: skip
        ready = f"http://127.0.0.1:{api_port}/readyz"
        wait_until(lambda: urllib.request.urlopen(ready, timeout=5).status == 200, 90, "api", api)
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_the_direct_alerts_carry_the_labels_prometheus_gives_the_rule_alerts() -> None:
    """COLLAPSE_ALERT_LABELS on the sender: the exporter series' namespace and job (the job of a
    ServiceMonitor target is its Service's name), Prometheus's external labels and the static
    rule labels, so Alertmanager merges a direct alert with the rule's."""
    import json

    docs = template(*value_args("alerting"),
                    "--set", "prometheusRule.externalLabels.cluster=eu-1",
                    "--set", "prometheusRule.additionalRuleLabels.team=ml")  # fmt: skip
    service = one(docs, "Service", "exporter")["metadata"]["name"]
    worker = one(docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    values = {e["name"]: e.get("value") for e in worker.get("env", [])}
    labels = json.loads(values["COLLAPSE_ALERT_LABELS"])
    assert labels == {"namespace": NAMESPACE, "job": service, "cluster": "eu-1", "team": "ml"}
    others = [component(d) for d in find(docs, "Deployment") if component(d) != "worker"]
    for name in others:  # only the sender of alerts gets them
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert "COLLAPSE_ALERT_LABELS" not in {e["name"] for e in container.get("env", [])}
