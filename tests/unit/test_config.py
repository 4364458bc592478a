"""Settings: env vars and the TOML file reach the class; docs/configuration.md stays current."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from monitor.config import Settings, settings_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_docs_configuration_matches_settings() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == settings_markdown(), (
        "docs/configuration.md is stale: run `python -m monitor.config > docs/configuration.md`"
    )
    for name in Settings.model_fields:
        assert f"`COLLAPSE_{name.upper()}`" in documented


def test_env_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAPSE_MIN_COUNT", "7")
    assert Settings().min_count == 7


def test_toml_file_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "collapse.toml"
    path.write_text("min_count = 5\npair_samples = 1234\n")
    monkeypatch.setenv("COLLAPSE_CONFIG_FILE", str(path))
    monkeypatch.setenv("COLLAPSE_PAIR_SAMPLES", "4321")
    settings = Settings()
    assert settings.min_count == 5
    assert settings.pair_samples == 4321


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAPSE_CONFIG_FILE", "/nonexistent/collapse.toml")
    with pytest.raises(FileNotFoundError, match="COLLAPSE_CONFIG_FILE"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"), [("min_count", "0"), ("max_exact_classes", "1"), ("min_count", "x")]
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"COLLAPSE_{name.upper()}", value)
    with pytest.raises(ValidationError):
        Settings()


# --- Redis topology: cluster, sentinel, a separate broker ---------------------------------

CLUSTER = {"redis_url": "redis://node-0:6379", "redis_cluster": True}
SENTINEL = {
    "redis_url": "rediss://collapse@mymaster/2",
    "redis_sentinels": ["s1:26379", "s2:26379"],
    "redis_sentinel_master": "mymaster",
    "redis_password": "master pw",
    "redis_sentinel_password": "sentinel-pw",
}


def test_a_cluster_store_needs_a_broker_of_its_own() -> None:
    with pytest.raises(ValidationError, match="broker cannot be a Redis Cluster"):
        Settings(**CLUSTER)  # type: ignore[arg-type]
    settings = Settings(**CLUSTER, broker_url="redis://broker:6379/1")  # type: ignore[arg-type]
    assert settings.redis_mode == "cluster"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({**CLUSTER, "redis_url": "redis://node-0:6379/3"}, "database 0"),
        ({**CLUSTER, **SENTINEL, "broker_url": "redis://b"}, "exclude each other"),
        ({"redis_url": "redis://m/0", "redis_sentinels": ["s:1"]}, "go together"),
        ({"redis_url": "redis://m/0", "redis_sentinels": ["s"]}, "not host:port"),
        ({"redis_url": "redis://h", "broker_url": "sentinel://s:1/0"}, "go together"),
        ({"redis_url": "redis://h", "broker_url": "amqp://rabbit"}, "broker_url must start"),
        (
            {
                "redis_url": "redis://h",
                "broker_url": "sentinel://a:1/0;sentinel://b:1/1",
                "broker_sentinel_master": "m",
            },
            "same database",
        ),
        ({"redis_url": "redis://h", "broker_password": "x"}, "broker_password is for"),
        ({"broker_url": "redis://b"}, "without redis_url"),
        ({"redis_url": "http://h"}, "redis_url must start"),
    ],
)
def test_contradictory_redis_topologies_are_refused(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["s1:26379, s2:26379", '["s1:26379", "s2:26379"]'])
def test_sentinels_from_env_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("COLLAPSE_REDIS_URL", "redis://mymaster/0")
    monkeypatch.setenv("COLLAPSE_REDIS_SENTINELS", value)
    monkeypatch.setenv("COLLAPSE_REDIS_SENTINEL_MASTER", "mymaster")
    settings = Settings()
    assert settings.redis_sentinels == ["s1:26379", "s2:26379"]
    assert settings.redis_mode == "sentinel"


def test_validation_errors_never_show_passwords() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{**SENTINEL, "redis_sentinel_master": None})  # type: ignore[arg-type]
    assert "master pw" not in str(caught.value)
    assert "sentinel-pw" not in str(caught.value)
    settings = Settings(**SENTINEL, api_token="tok")  # type: ignore[arg-type]
    assert sorted(settings.secret_values()) == ["master pw", "sentinel-pw", "tok"]


def test_celery_broker_follows_the_topology() -> None:
    from monitor.worker.app import celery_config

    conf = celery_config(Settings(**SENTINEL))  # type: ignore[arg-type]
    assert conf["broker_url"] == (
        "sentinel://collapse:master%20pw@s1:26379/2;sentinel://collapse:master%20pw@s2:26379/2"
    )
    options = conf["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert options["sentinel_kwargs"]["ssl"] is True  # rediss://: TLS to the sentinels too
    assert "ssl_cert_reqs" in conf["broker_use_ssl"]
    conf = celery_config(
        Settings(**CLUSTER, broker_url="redis://b:6379/1", broker_password="p@ss")  # type: ignore[arg-type]
    )
    assert conf["broker_url"] == "redis://:p%40ss@b:6379/1"
    assert "master_name" not in conf["broker_transport_options"]
    assert "broker_use_ssl" not in conf


def test_sentinel_clients_are_built_without_connecting() -> None:
    from redis.sentinel import SentinelConnectionPool

    from monitor.pipeline.runtime import broker_client, redis_client

    settings = Settings(**SENTINEL)  # type: ignore[arg-type]
    client = redis_client(settings)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["username"] == "collapse"
    assert pool.connection_kwargs["db"] == 2
    broker = broker_client(settings, io_timeout=1.0)
    assert broker is not None
    assert broker.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    assert broker_client(Settings(redis_url=None)) is None
