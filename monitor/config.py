"""`Settings`: every configurable value of the service, from env vars (`COLLAPSE_*`) or a file.

Precedence: explicit arguments, then environment variables, then the TOML file named by
`COLLAPSE_CONFIG_FILE`, then the defaults below. docs/configuration.md is generated from this
class (`python -m monitor.config`) and a test keeps the two equal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from monitor.alerts.thresholds import AlertingSettings, default_alerting
from monitor.metrics.options import (
    DEFAULT_MAX_EXACT_CLASSES,
    DEFAULT_MIN_COUNT,
    DEFAULT_NC4_MAX_SAMPLES,
    DEFAULT_PAIR_SAMPLES,
    DEFAULT_TILE_SIZE,
    MetricOptions,
)
from monitor.store.base import DEFAULT_DECAY_MIN_WEIGHT
from monitor.store.keys import MODEL_NAME

ENV_PREFIX = "COLLAPSE_"
CONFIG_FILE_ENV = "COLLAPSE_CONFIG_FILE"
NO_CLUSTER_BROKER = (
    "the Celery broker cannot be a Redis Cluster (Celery's Redis transport does not support "
    "cluster mode): set broker_url to a standalone or Sentinel-managed Redis"
)


class ModelSpec(BaseModel):
    """A model to watch: a checkpoint (vocabulary and width read from it) or explicit sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_NAME.pattern, description="Label in keys and gauges.")
    checkpoint: str | None = Field(None, description="Local directory or hub id.")
    vocab_size: int | None = Field(None, ge=2, description="Vocabulary size (features-only).")
    dim: int | None = Field(None, ge=1, description="Hidden width (features-only).")
    device: str = Field("cpu", description="Device of the mirror forward pass.")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16.")
    second_moment: bool = Field(
        False, description="Keep the d x d second moment (trace ratio, effective rank)."
    )
    classifier_path: str | None = Field(
        None, description="(V, d) head weights, .npy or .safetensors, for a features-only model."
    )
    bias_path: str | None = Field(None, description="(V,) head bias for a features-only model.")
    baseline: str | None = Field(
        None, description="Baseline that drift compares against (default: the newest pinned)."
    )
    rff_features: int = Field(
        256, ge=0, description="Random Fourier features for drift MMD (0 turns MMD off)."
    )
    rff_bandwidth: float | None = Field(
        None, gt=0, description="Kernel bandwidth; default: median heuristic on the first batch."
    )
    max_tracked_classes: int | None = Field(
        None,
        ge=1,
        description="Keep statistics for at most this many classes, the most frequent by "
        "decayed count; samples of other classes are counted as untracked_samples and left "
        "out (docs/architecture.md, 'Tracked classes'). None: every class (the default).",
    )

    @model_validator(mode="after")
    def _sizes(self) -> ModelSpec:
        if self.checkpoint is None and (self.vocab_size is None or self.dim is None):
            raise ValueError(f"model {self.name!r}: give a checkpoint, or vocab_size and dim")
        return self


class Settings(BaseSettings):
    """Service settings; each field's description is its documentation."""

    # Errors never echo the input: it holds the passwords.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    redis_url: str | None = Field(
        None,
        description="Redis for store and broker (unless broker_url), e.g. redis://host:6379/0, "
        "rediss:// for TLS, redis://user@host/0 for an ACL user. Unset: embedded mode "
        "(in-memory store, tasks run in-process).",
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis AUTH password (kept out of URLs and logs)."
    )
    redis_tls_ca_file: str | None = Field(None, description="CA bundle for rediss:// URLs.")
    redis_tls_cert_file: str | None = Field(None, description="Client certificate for TLS.")
    redis_tls_key_file: str | None = Field(None, description="Client key for TLS.")
    redis_cluster: bool = Field(
        False,
        description="The store is a Redis Cluster: redis_url names one of its nodes (or a "
        "service in front of them; the client discovers the rest), database 0. Each model's "
        "keys share the slot of its hash tag {model}, so models spread over the nodes. Needs "
        "broker_url: Celery cannot use a cluster as its broker.",
    )
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Sentinels that name the store's master, as host:port (comma-separated or "
        "a JSON list). With them redis_url gives only the scheme (rediss:// for TLS to the "
        "master and the sentinels), ACL username and database, e.g. redis://mymaster/0; its "
        "host and port are not used.",
    )
    redis_sentinel_master: str | None = Field(
        None, description="Name the sentinels monitor the store's master under (with sentinels)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="AUTH password of the sentinels themselves, if they require one (the "
        "master's is redis_password); also used for a sentinel:// broker_url.",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker when it is not the store's Redis: redis://, rediss:// or "
        "Celery's sentinel://host:port/db;sentinel://host2:port/db (with broker_sentinel_master), "
        "without password. Unset: the store's Redis, through its sentinels if it has them.",
    )
    broker_password: SecretStr | None = Field(
        None, description="AUTH password of the broker_url Redis (the store's is redis_password)."
    )
    broker_sentinel_master: str | None = Field(
        None, description="Master name for a sentinel:// broker_url."
    )
    redis_key_prefix: str = Field(
        "cm", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Prefix of every Redis key."
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Models to watch, as a JSON list of {name, checkpoint | vocab_size + dim, "
        "device, dtype, second_moment, max_tracked_classes}. Samples for other models are "
        "refused.",
    )
    bucket_seconds: int = Field(300, ge=1, description="Length of fine time buckets.")
    coarse_bucket_seconds: int = Field(
        10800, ge=1, description="Length of coarse buckets (a multiple of bucket_seconds)."
    )
    fine_retention_seconds: int = Field(
        3600, ge=1, description="Fine buckets are kept this long; longer windows read coarse."
    )
    windows: dict[str, int] = Field(
        default_factory=lambda: {"15m": 900, "1h": 3600, "24h": 86400},
        description="Rolling windows: label -> seconds.",
    )
    window_mode: Literal["exact", "decayed"] = Field(
        "exact",
        description="exact: sliding windows of exactly their span, kept with buckets of class "
        "rows (traffic standard errors); decayed: exponentially decayed windows (tau = span / 2) "
        "and no bucket rows, so memory is about windows x classes x row (docs/architecture.md). "
        "Switching restarts the windows.",
    )
    decay_min_weight: float = Field(
        DEFAULT_DECAY_MIN_WEIGHT,
        gt=0,
        lt=1,
        description="Decayed mode: a class leaves a window when its weight falls below this "
        "(default exp(-2): one sample as old as the window's span).",
    )
    tracked_half_life_seconds: float = Field(
        86400.0,
        gt=0,
        description="Models with max_tracked_classes: their class frequencies halve once per "
        "this many seconds (maintenance), so the tracked set follows the traffic.",
    )
    tracked_refresh_seconds: float = Field(
        30.0,
        ge=0,
        description="Models with max_tracked_classes: each worker process reads the tracked "
        "set (top classes by frequency) from the store this often.",
    )
    partial_ttl_seconds: int = Field(
        86400, ge=60, description="Uncompacted per-batch partials expire after this."
    )
    max_batch_samples: int = Field(
        65536, ge=1, description="Largest batch one submission may carry."
    )
    max_payload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest encoded submission accepted."
    )
    max_clock_skew_seconds: float = Field(
        300.0,
        ge=0,
        description="Samples stamped further than this in the future are refused "
        "(future_timestamp); samples older than the longest window's first bucket are refused "
        "as stale_timestamp, since no window could hold them.",
    )
    task_visibility_timeout: int = Field(
        3600,
        ge=1,
        description="Seconds before an unacknowledged task (its worker died) is redelivered.",
    )
    worker_shutdown_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a busy worker given SIGTERM waits for running tasks before it "
        "requeues the rest and exits (Celery's soft shutdown: it waits the whole time; keep it "
        "below the pod's terminationGracePeriodSeconds).",
    )
    task_max_retries: int = Field(
        10,
        ge=0,
        description="Retries of an ingest or embed task that failed on infrastructure (Redis "
        "out of memory, connection lost, timeout) before it is dead-lettered.",
    )
    task_retry_backoff: float = Field(
        1.0, gt=0, description="Seconds before the first such retry; doubled on each next one."
    )
    task_retry_backoff_max: float = Field(
        120.0,
        gt=0,
        description="Longest wait between retries (at most half of task_visibility_timeout).",
    )
    dead_letter_limit: int = Field(
        1000,
        ge=1,
        description="Dead letters kept on the broker (list `<redis_key_prefix>:dead_letters`, "
        "newest first); older ones are trimmed, their counters stay.",
    )
    dead_letter_body_bytes: int = Field(
        65536,
        ge=256,
        description="Bytes of a dead letter's message kept for inspection (the rest is cut).",
    )
    compaction_interval: float = Field(
        30.0, gt=0, description="Seconds between compaction runs of beat."
    )
    evaluation_interval: float = Field(
        60.0, gt=0, description="Seconds between evaluations of every model and window."
    )
    drift_quantile: float = Field(
        0.99, gt=0.5, lt=1.0, description="Quantile of the null MMD that calibrates its threshold."
    )
    drift_max_mean_noise: float = Field(
        0.05,
        gt=0,
        description="Ratios of metrics without a volume-robust form (equiangularity std, NC4 "
        "agreement) are computed only when, in both the window and the baseline, at most this "
        "fraction of the class means' spread is estimation noise (key mean_noise_ratio).",
    )
    drift_min_samples_per_dim: float = Field(
        10.0,
        ge=0,
        description="The effective-rank ratio is computed only when the window and the "
        "baseline each hold at least this many samples per dimension (its bias falls with N/d).",
    )
    stderr_groups: int = Field(
        8,
        ge=0,
        le=64,
        description="Groups of a window's buckets for the delete-a-group jackknife behind the "
        "*_traffic_stderr keys (each group costs one more evaluation of the alerting metrics); "
        "0 turns the standard errors off.",
    )
    stderr_interval: float = Field(
        600.0,
        ge=0,
        description="Seconds between jackknifes of a window: in between, each evaluation carries "
        "the last jackknife's relative errors, scaled by sqrt(N_then / N_now) (alerts change "
        "slowly, and a jackknife computes the alerting metrics stderr_groups more times); 0 = "
        "every evaluation.",
    )
    stderr_pair_samples: int = Field(
        DEFAULT_PAIR_SAMPLES,
        ge=100,
        description="Class pairs the jackknife's replicates share (drawn once per jackknife, by "
        "class id) when the window's pairs are sampled (at most pair_samples). Fewer make a "
        "jackknife cheaper at large d but overstate nc2_equiangularity_std's error, by up to "
        "sqrt(pair_samples / this) (docs/benchmarks.md).",
    )
    top_drift_classes: int = Field(
        20, ge=0, le=100, description="Most drifted classes kept per snapshot (bounded labels)."
    )
    custom_metrics: list[str] = Field(
        default_factory=list,
        description="Extra metric functions as dotted paths 'package.module:function' (entry "
        "points of group collapse_monitor.metrics are found without this).",
    )
    snapshot_history: int = Field(
        288, ge=1, description="Metric snapshots kept per model and window."
    )
    alerting: AlertingSettings = Field(
        default_factory=default_alerting,
        description="Alert thresholds (absolute, relative to baseline, predictive, drift, "
        "pipeline); rendered by `rules render`; see docs/operations.md.",
    )
    alertmanager_url: str | None = Field(
        None, description="Alertmanager for the evaluator's direct alerts (no rule engine)."
    )
    alertmanager_username: str | None = Field(None, description="Basic-auth user.")
    alertmanager_password: SecretStr | None = Field(None, description="Basic-auth password.")
    alertmanager_token: SecretStr | None = Field(None, description="Bearer token instead.")
    alert_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels the direct Alertmanager client adds to each alert (JSON object): "
        "set these to your Prometheus external_labels plus the namespace and job (and cluster, "
        "if relabelled) of the exporter's series, so rule alerts and direct alerts have one "
        "label set and Alertmanager deduplicates them; the chart sets them.",
    )

    @field_validator("alert_labels")
    @classmethod
    def _alert_labels(cls, value: dict[str, str]) -> dict[str, str]:
        return AlertingSettings.check_labels(value)

    api_token: SecretStr | None = Field(
        None, description="Bearer token the HTTP API requires (required outside embedded mode)."
    )
    api_body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds the HTTP API waits for a request's head (else the connection is "
        "closed) and again for its whole body (else 408 and the connection is closed).",
    )
    api_max_inflight_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Bytes of request bodies the HTTP API holds at once (reading, parsing, "
        "sending); past it a request gets 503 with Retry-After. At least max_payload_bytes.",
    )
    api_max_texts: int = Field(
        256, ge=1, description="Texts or token-id sequences one HTTP request may carry (413)."
    )
    api_max_text_tokens: int = Field(
        65536,
        ge=1,
        description="Token ids, or UTF-8 bytes of texts (a bound on their tokens), one HTTP "
        "request may carry (413): bounds the embed work a request can cause.",
    )
    api_client_rate: float = Field(
        20.0,
        ge=0,
        description="Requests per second the HTTP API admits from one client address, after "
        "a burst of api_client_burst (429 with Retry-After past it); 0 turns the bound off.",
    )
    api_client_burst: int = Field(
        40, ge=1, description="Requests one client address may send at once before the rate."
    )

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
    device: str = Field(
        "auto",
        description="Torch device of the metric engine: auto (CUDA when present), cpu, cuda[:N].",
    )

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

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        if isinstance(value, str):  # env var: comma-separated, or a JSON list
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            sentinel_address(address)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.coarse_bucket_seconds % self.bucket_seconds:
            raise ValueError("coarse_bucket_seconds must be a multiple of bucket_seconds")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self._check_redis()
        return self

    def _check_redis(self) -> None:
        """Store and broker topology: every contradiction is refused here, before any connect."""
        if self.redis_url is None:
            extra = [
                n for n in ("redis_cluster", "redis_sentinels", "broker_url") if getattr(self, n)
            ]
            if extra:
                raise ValueError(f"{', '.join(extra)} set without redis_url (embedded: no Redis)")
            return
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.redis_cluster:
            if self.redis_sentinels:
                raise ValueError("redis_cluster and redis_sentinels exclude each other")
            if url.scheme == "unix" or url.path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster redis_url is redis:// or rediss://, database 0")
            if self.broker_url is None:
                raise ValueError(NO_CLUSTER_BROKER)
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError("redis_sentinels and redis_sentinel_master go together")
        if self.redis_sentinels and url.scheme == "unix":
            raise ValueError("with redis_sentinels, redis_url is redis:// or rediss://")
        broker = urlsplit(self.broker_url) if self.broker_url else None
        if broker is not None and broker.scheme not in ("redis", "rediss", "sentinel"):
            raise ValueError("broker_url must start with redis://, rediss:// or sentinel://")
        if (broker is not None and broker.scheme == "sentinel") != bool(
            self.broker_sentinel_master
        ):
            raise ValueError("a sentinel:// broker_url and broker_sentinel_master go together")
        if broker is not None and broker.scheme == "sentinel":
            parts = [urlsplit(part) for part in (self.broker_url or "").split(";") if part]
            if any(p.scheme != "sentinel" or not p.hostname for p in parts):
                raise ValueError("broker_url: sentinel://host:port parts joined by ';'")
            if len({p.path.strip("/") or "0" for p in parts}) > 1:
                raise ValueError("broker_url: every sentinel:// part names the same database")
        if self.broker_password is not None and broker is None:
            raise ValueError("broker_password is for broker_url (the store uses redis_password)")

    @property
    def redis_mode(self) -> str:
        """How the store is reached: embedded (no Redis), standalone, cluster or sentinel."""
        if self.redis_url is None:
            return "embedded"
        if self.redis_cluster:
            return "cluster"
        return "sentinel" if self.redis_sentinels else "standalone"

    @property
    def embedded(self) -> bool:
        """No Redis configured: one process, in-memory store, tasks run eagerly."""
        return self.redis_url is None

    def secret_values(self) -> list[str]:
        """The value of every secret setting (passwords, tokens), for redacting error texts."""
        secrets = (getattr(self, name) for name in type(self).model_fields)
        return [s.get_secret_value() for s in secrets if isinstance(s, SecretStr) and s]

    def alert_thresholds(self) -> AlertingSettings:
        """The thresholds with the evaluation interval the staleness alert must assume."""
        return self.alerting.model_copy(
            update={
                "evaluation_interval_seconds": self.evaluation_interval,
                "client_labels": {**self.alerting.client_labels, **self.alert_labels},
            }
        )

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def metric_options(self) -> MetricOptions:
        """The `compute_metrics` options these settings choose (one mapping for every caller)."""
        return MetricOptions(
            min_count=self.min_count,
            max_exact_classes=self.max_exact_classes,
            pair_samples=self.pair_samples,
            nc4_max_samples=self.nc4_max_samples,
            seed=self.seed,
            device=self.device,
            tile_size=self.tile_size,
        )


def sentinel_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:26379`) of a sentinel; ValueError when malformed."""
    host, sep, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sentinel address {address!r} is not host:port")
    return host, int(port)


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
        default = info.get_default(call_default_factory=True)
        shown = "see docs/operations.md" if isinstance(default, BaseModel) else f"`{default!r}`"
        lines.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {shown} | {info.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
