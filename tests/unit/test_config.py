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
