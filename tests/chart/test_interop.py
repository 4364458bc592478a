"""The chart among others: a subchart of an umbrella chart, kube-prometheus-stack's ServiceMonitor
knobs, Redis ACL users, GitOps renders (Argo CD runs `helm template`), the GPU image, probes.

Rendered with the helm the other chart tests use (tests/chart/tools.py); manifests validated as
in test_chart.py (kubernetes-validate, the CRD schemas in tests/chart/schemas).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_chart import (
    CHART,
    CRD_SCHEMAS,
    K8S_VERSION,
    KUBE,
    SCHEMAS,
    env_of,
    find,
    helm,
    one,
    pod_specs,
    rendered,
    run_helm,
    template,
    value_args,
)

from monitor.config import Settings

EXTERNAL = ["--set", "redis.enabled=false", "--set", "auth.existingSecret=cm-auth"]


def validate(doc: dict[str, Any]) -> None:
    """One manifest against its CRD schema or Kubernetes's own (strict), as test_chart does."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is not None:
        schema = json.loads((SCHEMAS / schema_file).read_text())
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        assert not errors, f"{name}: " + "; ".join(e.message for e in errors)
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found: dict[str, Any] = one(docs, "Deployment", component)["spec"]["template"]["spec"]
    return dict(found["containers"][0])


def failure(*args: str) -> str:
    """helm's error text for a render that must fail."""
    result = run_helm("template", "cm", *args)
    assert result.returncode != 0, "rendered, but should have failed"
    return result.stderr


# --- umbrella chart -----------------------------------------------------------------------


def test_renders_as_a_dependency_of_an_umbrella_chart(tmp_path: Path) -> None:
    """Helm hands `global` to every subchart, so a schema without it refuses to be one."""
    umbrella = tmp_path / "platform"
    umbrella.mkdir()
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    (umbrella / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "platform",
                "version": "1.0.0",
                "dependencies": [
                    {"name": "collapse-monitor", "version": version,
                     "repository": f"file://{CHART}"},
                ],
            }
        )
    )  # fmt: skip
    (umbrella / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "global": {"imageRegistry": "registry.example", "storageClass": "fast"},
                "collapse-monitor": {
                    "settings": {"models": [{"name": "small", "vocab_size": 100, "dim": 8}]},
                    "serviceMonitor": {"labels": {"team": "ml"}},
                },
            }
        )
    )
    built = subprocess.run(
        [helm(), "dependency", "build", str(umbrella)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert (umbrella / "charts" / f"collapse-monitor-{version}.tgz").is_file()
    lint = subprocess.run([helm(), "lint", "--strict", str(umbrella)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = template(chart=umbrella)
    assert docs
    for doc in docs:
        validate(doc)
    # The subchart's values arrive under its name, next to the umbrella's globals.
    assert one(docs, "ServiceMonitor", "")["metadata"]["labels"]["team"] == "ml"
    data = one(docs, "ConfigMap", "settings")["data"]
    assert json.loads(data["COLLAPSE_MODELS"]) == [{"name": "small", "vocab_size": 100, "dim": 8}]
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Secret", "Service"}


def test_global_is_accepted_at_the_top_level_too() -> None:
    docs = template("--set", "global.imageRegistry=registry.example")
    assert find(docs, "Deployment")


# --- ServiceMonitor -----------------------------------------------------------------------


def test_service_monitor_takes_relabelings_metric_relabelings_and_labels(tmp_path: Path) -> None:
    values = {
        "monitoring": {"labels": {"shared": "both"}},
        "serviceMonitor": {
            "labels": {"prometheus": "platform"},
            "relabelings": [
                {"targetLabel": "cluster", "replacement": "prod-eu"},
                {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"},
            ],
            "metricRelabelings": [
                {"sourceLabels": ["__name__"], "regex": "collapse_pair_.*", "action": "drop"},
            ],
        },
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = template("-f", str(path))
    monitor = one(docs, "ServiceMonitor", "")
    validate(monitor)
    labels = monitor["metadata"]["labels"]
    assert (labels["prometheus"], labels["shared"], labels["release"]) == (
        "platform", "both", "kube-prometheus-stack",
    )  # fmt: skip
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["relabelings"] == values["serviceMonitor"]["relabelings"]
    assert endpoint["metricRelabelings"] == values["serviceMonitor"]["metricRelabelings"]
    # Only the ServiceMonitor gets serviceMonitor.labels; monitoring.labels go on both.
    rule = one(docs, "PrometheusRule", "")["metadata"]["labels"]
    assert "prometheus" not in rule
    assert rule["shared"] == "both"
    default = one(rendered("default"), "ServiceMonitor", "")["spec"]["endpoints"][0]
    assert "relabelings" not in default
    assert "metricRelabelings" not in default


@pytest.mark.parametrize(
    "bad",
    [
        "serviceMonitor.relabelings[0].action=rename",
        "serviceMonitor.metricRelabelings[0].sourceLabels[0]=not-a-label",
        "serviceMonitor.relabelings[0].target=x",
        "serviceMonitor.labels.team=null",
    ],
)
def test_service_monitor_values_are_checked_by_the_schema(bad: str) -> None:
    assert "values don't meet the specifications of the schema" in failure("--set", bad)


# --- Redis ACL users ----------------------------------------------------------------------


def expand(env: list[dict[str, Any]], secrets: dict[str, str]) -> dict[str, str]:
    """A container's env as the kubelet builds it: secretKeyRefs from `secrets` (key -> value),
    `$(NAME)` expanded from the variables defined earlier in the list only."""
    out: dict[str, str] = {}
    for item in env:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            if ref["key"] in secrets:
                out[item["name"]] = secrets[ref["key"]]
            continue
        value = str(item["value"])
        for name, known in out.items():
            value = value.replace(f"$({name})", known)
        out[item["name"]] = value
    return out


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("COLLAPSE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("COLLAPSE_"):
            monkeypatch.setenv(key, value)
    return Settings()


def test_acl_user_as_a_value_reaches_the_url_and_keda(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = template(
        *EXTERNAL, "--set", "redis.external.url=rediss://redis.example:6380/1",
        "--set", "redis.external.username=collapse", "--set", "worker.keda.enabled=true",
        "--set", "redis.external.existingSecret=redis", "--set", "redis.external.passwordKey=pw",
    )  # fmt: skip
    for name, spec in pod_specs(docs):
        env = expand(spec["containers"][0]["env"], {"pw": "secret"})
        assert env["COLLAPSE_REDIS_URL"] == "rediss://collapse@redis.example:6380/1", name
        assert env["REDIS_USERNAME"] == "collapse", name
        assert settings_from(env, monkeypatch).redis_url == env["COLLAPSE_REDIS_URL"]
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    # KEDA's redis scaler takes the user from an env var of the scaled container.
    assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"
    assert trigger["metadata"]["address"] == "redis.example:6380"
    assert trigger["metadata"]["enableTLS"] == "true"
    for doc in docs:
        validate(doc)


def test_acl_user_in_the_url_reaches_keda_too() -> None:
    docs = template(*EXTERNAL, "--set", "redis.external.url=rediss://collapse@redis.example/0",
                    "--set", "worker.keda.enabled=true")  # fmt: skip
    env = env_of(container(docs, "worker"))
    assert env["COLLAPSE_REDIS_URL"] == "rediss://collapse@redis.example/0"
    assert env["REDIS_USERNAME"] == "collapse"
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"
    assert trigger["metadata"]["address"] == "redis.example:6379"


def test_acl_user_from_a_secret_key_is_expanded_into_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = template(
        *EXTERNAL, "--set", "redis.external.url=redis://mymaster/2",
        "--set", "redis.external.existingSecret=redis-ha",
        "--set", "redis.external.usernameKey=username",
        "--set", "redis.external.sentinel.addresses={s-0:26379,s-1:26379}",
        "--set", "redis.external.sentinel.masterName=mymaster", "--set", "worker.keda.enabled=true",
    )  # fmt: skip
    secrets = {"username": "svc-collapse", "redis-password": "pw"}
    for name, spec in pod_specs(docs):
        items = spec["containers"][0]["env"]
        names = [e["name"] for e in items]
        # Kubernetes expands $(REDIS_USERNAME) only from variables defined before it.
        assert names.index("REDIS_USERNAME") < names.index("COLLAPSE_REDIS_URL"), name
        ref = next(e for e in items if e["name"] == "REDIS_USERNAME")["valueFrom"]
        assert ref["secretKeyRef"] == {"name": "redis-ha", "key": "username"}, name
        env = expand(items, secrets)
        assert env["COLLAPSE_REDIS_URL"] == "redis://svc-collapse@mymaster/2", name
        settings = settings_from(env, monkeypatch)
        assert settings.redis_mode == "sentinel"
        assert settings.redis_url == "redis://svc-collapse@mymaster/2"
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"
    for doc in docs:
        validate(doc)


def test_broker_user_reaches_keda() -> None:
    docs = template(*value_args("external-cluster"),
                    "--set", "broker.url=redis://celery@celery-broker.data.svc:6379/1")  # fmt: skip
    env = env_of(container(docs, "worker"))
    assert env["BROKER_USERNAME"] == "celery"
    (trigger,) = one(docs, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["metadata"]["usernameFromEnv"] == "BROKER_USERNAME"
    assert trigger["metadata"]["address"] == "celery-broker.data.svc:6379"
    # Without users, no username variables and no usernameFromEnv.
    # KEDA reads the broker, whose url names no user: the store's user (in its url) is not it.
    plain = rendered("external-cluster")
    assert "BROKER_USERNAME" not in env_of(container(plain, "worker"))
    assert env_of(container(plain, "worker"))["REDIS_USERNAME"] == "collapse"
    (trigger,) = one(plain, "ScaledObject", "worker")["spec"]["triggers"]
    assert "usernameFromEnv" not in trigger["metadata"]
    default = rendered("keda")
    (trigger,) = one(default, "ScaledObject", "worker")["spec"]["triggers"]
    assert "usernameFromEnv" not in trigger["metadata"]
    assert "REDIS_USERNAME" not in env_of(container(default, "worker"))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["redis.external.url=redis://a@r:6379/0", "redis.external.username=b"], "given twice"),
        (["redis.external.url=redis://r:6379/0", "redis.external.usernameKey=user"],
         "set that too"),
    ],
)  # fmt: skip
def test_contradictory_acl_users_fail(sets: list[str], message: str) -> None:
    assert message in failure(*EXTERNAL, *[a for s in sets for a in ("--set", s)])


def test_schema_refuses_a_username_that_breaks_the_url() -> None:
    stderr = failure(*EXTERNAL, "--set", "redis.external.url=redis://r:6379/0",
                     "--set", "redis.external.username=a@b")  # fmt: skip
    assert "values don't meet the specifications of the schema" in stderr


# --- GitOps: the same values render the same manifests ------------------------------------


def secret_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret", "auth")["data"].items()}


def test_generated_secrets_change_on_every_template_run() -> None:
    """Why the GitOps mode exists: `helm template` has no cluster to read the old values from."""
    first, second = secret_data(template()), secret_data(template())
    assert first["api-token"] != second["api-token"]
    assert first["redis-password"] != second["redis-password"]


def test_gitops_renders_are_identical_and_refuse_to_invent_secrets(tmp_path: Path) -> None:
    values = tmp_path / "gitops.yaml"
    values.write_text(yaml.safe_dump({"auth": {
        "generate": False, "apiToken": "token-from-sops", "redisPassword": "pw-from-sops",
    }}))  # fmt: skip

    def render() -> str:
        result = subprocess.run(
            [helm(), "template", "cm", str(CHART), "-n", "ml", "--kube-version", KUBE,
             "-f", str(values), *value_args("gpu")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = render()
    assert render() == first, "two renders of the same values differ"
    docs = [d for d in yaml.safe_load_all(first) if d]
    assert secret_data(docs) == {"api-token": "token-from-sops", "redis-password": "pw-from-sops"}

    base = ["--set", "auth.generate=false"]
    assert "auth.apiToken (api.enabled is true)" in failure(*base)
    assert "auth.existingSecret" in failure(*base)
    assert "auth.redisPassword" in failure(*base, "--set", "auth.apiToken=t")
    # What is not needed is not required: no API, an external Redis without the auth password.
    docs = template(*base, "--set", "api.enabled=false", "--set", "redis.enabled=false",
                    "--set", "redis.external.url=redis://r:6379/0")  # fmt: skip
    assert secret_data(docs) == {}
    # An existing Secret: the chart makes none, and needs nothing.
    docs = template(*base, "--set", "auth.existingSecret=from-external-secrets")
    assert not find(docs, "Secret")
    env = env_of(container(docs, "worker"))
    assert env["COLLAPSE_REDIS_PASSWORD"]["secretKeyRef"]["name"] == "from-external-secrets"


# --- GPU workers ----------------------------------------------------------------------------


def test_gpu_workers_on_the_cpu_image_fail_the_render() -> None:
    stderr = failure("--set", "gpuWorker.enabled=true")
    assert "gpuWorker.enabled=true needs a CUDA image" in stderr
    assert "gpuWorker.image.repository" in stderr
    docs = template("--set", "gpuWorker.enabled=true", "--set",
                    "gpuWorker.image.repository=registry.example/cm-cuda")  # fmt: skip
    assert container(docs, "gpu-worker")["image"] == "registry.example/cm-cuda:0.1.0"
    assert container(docs, "gpu-worker")["resources"]["limits"]["nvidia.com/gpu"] == 1


# --- probes ---------------------------------------------------------------------------------


HEARTBEAT_ARG = "--heartbeat-file=/tmp/heartbeat"


@pytest.mark.parametrize("component", ["worker", "gpu-worker", "beat"])
def test_celery_processes_have_heartbeat_liveness_probes(component: str) -> None:
    docs = rendered("gpu")
    main = container(docs, component)
    assert HEARTBEAT_ARG in main["args"]
    for probe in ("startupProbe", "livenessProbe"):
        command = main[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        assert "/tmp/heartbeat" in command[2]
        assert "-lt 120" in command[2]  # maxAgeSeconds
    assert main["startupProbe"]["failureThreshold"] * main["startupProbe"]["periodSeconds"] >= 300
    assert "readinessProbe" not in main  # nothing routes to them
    # The heartbeat lives on the pod's writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]


def test_liveness_can_be_tuned_or_turned_off() -> None:
    values = "worker.liveness.maxAgeSeconds=300"
    main = container(template("--set", values), "worker")
    assert "-lt 300" in main["livenessProbe"]["exec"]["command"][2]
    main = container(template("--set", "beat.liveness.enabled=false"), "beat")
    assert "livenessProbe" not in main
    assert "startupProbe" not in main
    assert not [a for a in main["args"] if a.startswith("--heartbeat-file")]
    assert "values don't meet" in failure("--set", "worker.liveness.maxAgeSeconds=5")


def test_redis_probes_accept_loading() -> None:
    (sts,) = find(rendered("default"), "StatefulSet")
    main = sts["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        script = main[probe]["exec"]["command"][2]
        assert "PONG|LOADING*) exit 0" in script, probe
    # The behaviour against a real loading Redis: test_probes.py.


def test_values_file_documents_every_new_key() -> None:
    text = (CHART / "values.yaml").read_text()
    keys = ["global:", "generate:", "username:", "usernameKey:", "relabelings:",
            "metricRelabelings:", "liveness:", "maxAgeSeconds:", "startupSeconds:"]  # fmt: skip
    for key in keys:
        assert key in text, key
    assert "GitOps" in text


def test_the_exporter_and_the_api_run_the_slim_image_when_one_is_given() -> None:
    """slimImage (deploy/Dockerfile.slim, no torch) for the two components that import none;
    the workers and beat keep the main image; without it every pod runs the main image."""

    def images(docs: list[dict[str, Any]]) -> dict[str, str]:
        return {
            d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"][
                "containers"
            ][0]["image"]
            for d in find(docs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/name") == "collapse-monitor"
        }

    plain = images(template("--set", "image.tag=1.2"))
    assert set(plain.values()) == {"collapse-monitor:1.2"}
    slim = images(template("--set", "image.tag=1.2", "--set", "slimImage.repository=cm-slim"))
    assert {c for c, image in slim.items() if image == "cm-slim:1.2"} == {"exporter", "api"}
    assert {c: i for c, i in slim.items() if c not in ("exporter", "api")} == {
        c: i for c, i in plain.items() if c not in ("exporter", "api")
    }
    tagged = images(
        template("--set", "slimImage.repository=cm-slim", "--set-string", "slimImage.tag=9")
    )
    assert tagged["exporter"] == "cm-slim:9"
