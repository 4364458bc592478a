"""deploy/: the Dockerfiles, compose.yaml and the Prometheus, Alertmanager and Grafana configs.

Docker cannot run in CI, so these files are kept honest by test: compose.yaml parses and has
every service, every file it mounts exists, the app containers run non-root on a read-only root
filesystem, the configs pass the real `promtool check config`, `promtool check rules` and
`amtool check-config` (Debian packages `prometheus` and `prometheus-alertmanager`; without them
the tests FAIL, they do not skip), and the rules file equals a fresh render of the defaults.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml  # type: ignore[import-untyped]

from monitor.alerts.rules import render_rules, to_yaml
from monitor.alerts.thresholds import default_alerting
from monitor.config import ModelSpec, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DATASOURCES_YML = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS_YML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "collapse.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"

APP_SERVICES = {"worker", "embed-worker", "beat", "exporter", "api"}
SERVICES = APP_SERVICES | {"redis", "prometheus", "alertmanager", "grafana"}
# The processes of README "Running the pipeline", as compose runs them.
COMMANDS = {
    "worker": ["worker", "--queues", "ingest,maintenance"],
    "embed-worker": ["worker", "--queues", "embed", "--pool", "solo"],
    "beat": ["beat"],
    "exporter": ["exporter", "--host", "0.0.0.0", "--port", "9464"],
    "api": ["api", "--host", "0.0.0.0", "--port", "8000"],
}
PLACEHOLDER = "change-me"


# ---------------------------------------------------------------------------------- helpers


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install the Debian package `{package}` (.ci/run)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _yaml(COMPOSE)
    assert isinstance(doc, dict), "compose.yaml is not a mapping"
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every bind mount; named volumes are left out."""
    binds = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                binds.append((source, target))
        elif volume.get("type") == "bind":
            binds.append((volume["source"], volume["target"]))
    return binds


def _named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                names.append(source)
        elif volume.get("type") == "volume":
            names.append(volume["source"])
    return names


def _env_file_entries(service: dict[str, Any]) -> list[tuple[str, bool]]:
    """(path, required) of each env_file entry, short or long syntax."""
    raw = service.get("env_file", [])
    entries = [raw] if isinstance(raw, str | dict) else raw
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, True))
        else:
            out.append((entry["path"], bool(entry.get("required", True))))
    return out


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    out = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _instructions(path: Path, name: str) -> list[str]:
    return [rest for instruction, rest in _dockerfile(path) if instruction == name]


def _build_args(path: Path) -> dict[str, str]:
    args = {}
    for rest in _instructions(path, "ARG"):
        key, _, value = rest.partition("=")
        args[key] = value
    return args


def _env_example() -> dict[str, str]:
    values = {}
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _cli_port(command: str) -> int:
    from monitor.cli import app

    click_app = typer.main.get_command(app)
    params = {p.name: p.default for p in click_app.commands[command].params}  # type: ignore[attr-defined]
    return int(params["port"])


# ---------------------------------------------------------------------------------- compose


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES, f"missing services: {sorted(SERVICES - set(services))}"
    for name, command in COMMANDS.items():
        assert services[name]["command"] == command, name
    assert services["embed-worker"].get("profiles") == ["gpu"]
    devices = services["embed-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)


def test_every_mounted_path_exists(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    dashboards_target = None
    for name, service in services.items():
        for source, target in _bind_sources(service):
            path = (DEPLOY / source).resolve()
            if path == ROOT / "dashboards":
                dashboards_target = target
                if not path.exists():  # written by the dashboards work; checked below instead
                    continue
            assert path.exists(), f"{name} mounts {source}, which does not exist under deploy/"
        for volume in _named_volumes(service):
            assert volume in declared, f"{name} uses volume {volume!r}, not declared"
        for env_file, required in _env_file_entries(service):
            if required:
                assert (DEPLOY / env_file).is_file(), f"{name}: env_file {env_file} missing"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: Dockerfile missing"
    # Grafana loads the repository's dashboards/ from where compose mounts it.
    assert dashboards_target is not None, "grafana must mount ../dashboards"
    provider = _yaml(DASHBOARDS_YML)["providers"]
    assert [p["options"]["path"] for p in provider] == [dashboards_target]
    assert all(p["type"] == "file" for p in provider)


def test_prometheus_mounts_config_and_rules_side_by_side(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = dict(_bind_sources(services["prometheus"]))
    config = mounts["./prometheus/prometheus.yml"]
    rules = mounts["./prometheus/rules.yml"]
    assert Path(config).parent == Path(rules).parent, "rule_files resolve next to the config"
    assert f"--config.file={config}" in services["prometheus"]["command"]
    am = dict(_bind_sources(services["alertmanager"]))["./alertmanager/alertmanager.yml"]
    assert f"--config.file={am}" in services["alertmanager"]["command"]
    grafana = dict(_bind_sources(services["grafana"]))
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_app_services_run_non_root_read_only(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        service = services[name]
        uid = str(service.get("user", "")).split(":")[0]
        assert uid.isdigit(), f"{name}: user must be a numeric uid"
        assert int(uid) != 0, f"{name}: user must not be root"
        assert service.get("read_only") is True, f"{name}: read_only: true"
        tmpfs = service.get("tmpfs", [])
        tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
        assert any(t.split(":")[0] == "/tmp" for t in tmpfs), f"{name}: tmpfs /tmp"
        assert "ALL" in service.get("cap_drop", []), f"{name}: cap_drop ALL"


def test_app_services_reach_redis_with_a_password(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["COLLAPSE_REDIS_URL"].startswith("redis://redis:6379/"), name
        assert "@" not in env["COLLAPSE_REDIS_URL"], f"{name}: password belongs in the env file"
        assert any(path == ".env.example" for path, _ in _env_file_entries(services[name]))
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert '--requirepass "$$COLLAPSE_REDIS_PASSWORD"' in redis
    assert any(path == ".env.example" for path, _ in _env_file_entries(services["redis"]))


def test_published_ports_match_the_cli_commands(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "exporter"):
        command = services[name]["command"]
        port = int(command[command.index("--port") + 1])
        assert port == _cli_port(name), f"{name}: compose port differs from the CLI default"
        published = [str(p).rsplit(":", 1)[-1] for p in services[name].get("ports", [])]
        assert published == [str(port)], name


# ---------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_non_root(path: Path) -> None:
    users = _instructions(path, "USER")
    assert users, f"{path.name}: no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"{path.name}: USER must be numeric (runAsNonRoot can verify it)"
    assert int(user) != 0, f"{path.name}: USER must not be root"
    runs = " ".join(_instructions(path, "RUN"))
    assert f"useradd --system --uid {user}" in runs, f"{path.name}: uid {user} needs a user"
    assert _instructions(path, "ENTRYPOINT") == ['["collapse-monitor"]']
    assert not _instructions(path, "HEALTHCHECK"), "probes belong to Kubernetes/compose"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_make(path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    assert match, "Makefile: TORCH_SPEC not found"
    args = _build_args(path)
    assert args.get("TORCH_VERSION") == match.group(1), "torch pin differs from the Makefile"
    runs = _instructions(path, "RUN")
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 2, f"{path.name}: torch, then the package"
    torch_step, package_step = pip
    assert '"torch==${TORCH_VERSION}"' in torch_step
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_step
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    assert "pip install --no-cache-dir /src" in package_step
    for run in runs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-cache-dir" in command, f"{path.name}: {command.strip()}"
    env = " ".join(_instructions(path, "ENV"))
    assert "HF_HOME=/tmp/" in env, "caches must live under /tmp (read-only root FS)"
    assert "HOME=/tmp " in env, "HOME must be writable (read-only root FS)"


def test_dockerfile_bases() -> None:
    cpu, cuda = DOCKERFILES
    assert _build_args(cpu)["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert _instructions(cpu, "FROM") == ["python:${PYTHON_VERSION}-slim"]
    assert _build_args(cpu)["PYTHON_VERSION"] == "3.11"
    assert re.fullmatch(
        r"/whl/cu\d+", "/whl/" + _build_args(cuda)["TORCH_INDEX_URL"].split("/")[-1]
    )
    assert _instructions(cuda, "FROM") == ["${CUDA_IMAGE}"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-\S+", _build_args(cuda)["CUDA_IMAGE"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_exposed_ports_match_compose(path: Path, services: dict[str, dict[str, Any]]) -> None:
    exposed = {int(p) for rest in _instructions(path, "EXPOSE") for p in rest.split()}
    used = set()
    for name in ("api", "exporter"):
        command = services[name]["command"]
        used.add(int(command[command.index("--port") + 1]))
    assert exposed == used == {_cli_port("api"), _cli_port("exporter")}


def test_compose_builds_the_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    built = {Path(s["build"]["dockerfile"]).name for s in services.values() if "build" in s}
    assert built == {p.name for p in DOCKERFILES}
    assert services["embed-worker"]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    wanted = {".venv", "build", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    assert wanted <= patterns, f"missing: {sorted(wanted - patterns)}"
    assert "deploy/.env" in patterns
    for needed in ("monitor", "pyproject.toml", "README.md"):
        assert needed not in patterns, f"the image build needs {needed}"


# ---------------------------------------------------------------------------------- secrets


def test_env_example_holds_placeholders_only() -> None:
    values = _env_example()
    secrets = [k for k in values if re.search(r"PASSWORD|TOKEN|SECRET|_KEY$", k)]
    assert {"COLLAPSE_REDIS_PASSWORD", "COLLAPSE_API_TOKEN"} <= set(secrets)
    for key in secrets:
        assert values[key] in ("", PLACEHOLDER), f"{key}: use the placeholder {PLACEHOLDER!r}"
    for key, value in values.items():
        # Nothing that looks generated: long hex, base64 or known token prefixes.
        assert not re.search(r"[0-9a-fA-F]{24,}|[A-Za-z0-9+/=_-]{32,}", value), key
        assert not re.match(r"(ghp_|glpat-|sk-|xox[abp]-|AKIA)", value), key
    fields = set(Settings.model_fields)
    for key in values:
        if key.startswith("COLLAPSE_"):
            assert key.removeprefix("COLLAPSE_").lower() in fields, f"{key}: no such setting"
    for model in json.loads(values["COLLAPSE_MODELS"]):
        ModelSpec.model_validate(model)


def test_env_example_is_not_a_real_env_file_in_git() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = _run(git, "-C", str(ROOT), "ls-files", "deploy/.env")
    assert done.returncode != 0 or not done.stdout.strip(), "deploy/.env must never be committed"


# ---------------------------------------------------------------------------------- Prometheus


def test_rules_file_is_a_fresh_render() -> None:
    fresh = to_yaml(render_rules(default_alerting()))
    assert RULES_YML.read_text(encoding="utf-8") == fresh, (
        "deploy/prometheus/rules.yml is stale: regenerate it with "
        "`collapse-monitor rules render --out deploy/prometheus/rules.yml`"
    )


def test_promtool_check_rules() -> None:
    done = _run(_tool("promtool", "prometheus"), "check", "rules", str(RULES_YML))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_config() -> None:
    # promtool also loads rule_files, resolved next to the config, so rules.yml must be there.
    done = _run(_tool("promtool", "prometheus"), "check", "config", str(PROMETHEUS_YML))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_prometheus_scrapes_the_exporter_and_alerts(services: dict[str, dict[str, Any]]) -> None:
    config = _yaml(PROMETHEUS_YML)
    assert config["rule_files"] == ["rules.yml"]
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert f"exporter:{_cli_port('exporter')}" in targets
    am = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["alertmanager:9093"]
    # External labels would give rule alerts labels the direct client's alerts lack.
    assert "external_labels" not in config.get("global", {})
    datasources = _yaml(DATASOURCES_YML)["datasources"]
    prom = [d for d in datasources if d["type"] == "prometheus"]
    assert [d["url"] for d in prom] == ["http://prometheus:9090"]
    assert any("9090:9090" in str(p) for p in services["prometheus"]["ports"])


# ---------------------------------------------------------------------------------- Alertmanager


def test_amtool_check_config() -> None:
    done = _run(_tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER_YML))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alertmanager_has_the_documented_inhibit_rule() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(\s*inhibit_rules:.*?)```", operations, re.S)
    assert match, "docs/operations.md: inhibit rule example not found"
    documented = yaml.safe_load(textwrap.dedent(match.group(1)))["inhibit_rules"]
    config = _yaml(ALERTMANAGER_YML)
    assert config["inhibit_rules"] == documented
    # One notification per alert, model and window in each cluster and namespace (the scope
    # labels the rules keep; absent labels group as empty).
    assert config["route"]["group_by"] == ["alertname", "cluster", "namespace", "model", "window"]
    names = {r["name"] for r in config["receivers"]}
    assert "null" in names
    assert any("webhook_configs" in r for r in config["receivers"])
