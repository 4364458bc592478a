"""`Settings`: every configurable value of the service, from env vars (`COLLAPSE_*`) or a file.

Precedence: explicit arguments, then environment variables, then the TOML file named by
`COLLAPSE_CONFIG_FILE`, then the defaults below. docs/configuration.md is generated from this
class (`python -m monitor.config`) and a test keeps the two equal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from monitor.metrics.engine import (
    DEFAULT_MAX_EXACT_CLASSES,
    DEFAULT_MIN_COUNT,
    DEFAULT_NC4_MAX_SAMPLES,
    DEFAULT_PAIR_SAMPLES,
    DEFAULT_TILE_SIZE,
)

ENV_PREFIX = "COLLAPSE_"
CONFIG_FILE_ENV = "COLLAPSE_CONFIG_FILE"


class Settings(BaseSettings):
    """Service settings; each field's description is its documentation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    min_count: int = Field(
        DEFAULT_MIN_COUNT,
        ge=1,
        description="Classes need at least this many samples in a window to enter the metrics.",
    )
    max_exact_classes: int = Field(
        DEFAULT_MAX_EXACT_CLASSES,
        ge=2,
        description="Pairwise metrics are exact up to this many classes and sampled above it.",
    )
    pair_samples: int = Field(
        DEFAULT_PAIR_SAMPLES,
        ge=100,
        description="Class pairs drawn for the sampled estimates (stderr ~ 1/sqrt of this).",
    )
    nc4_max_samples: int = Field(
        DEFAULT_NC4_MAX_SAMPLES,
        ge=1,
        description="NC4 agreement on an evaluation set uses a uniform subsample of this size.",
    )
    tile_size: int = Field(
        DEFAULT_TILE_SIZE,
        ge=16,
        description="Rows per Gram tile in exact pairwise metrics: memory O(tile^2).",
    )
    seed: int = Field(0, description="Seed of sampled pairs and NC4 subsamples.")
    device: str = Field("cpu", description="Torch device of the metric engine: cpu or cuda[:N].")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={path}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def settings_markdown() -> str:
    """docs/configuration.md: one row per setting with its env var, default and meaning."""
    lines = [
        "# Configuration",
        "",
        "Every setting is read from an environment variable (`COLLAPSE_<NAME>`) or from a TOML",
        f"file named by `{CONFIG_FILE_ENV}` (keys are the lower-case names). Environment",
        "variables win over the file. This page is generated from `monitor.config.Settings`",
        "(`python -m monitor.config > docs/configuration.md`); a test keeps it current.",
        "",
        "| setting | env var | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in Settings.model_fields.items():
        default = info.default
        lines.append(
            f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | `{default!r}` | {info.description} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
