"""One frozen settings object per process: pydantic-settings, env prefix HELORA_, nested with __.

Built once in the CLI from flags + environment + an optional TOML file (HELORA_CONFIG=path;
flags win, then the environment, then the file) and passed down; nothing else reads os.environ.
Examples: HELORA_AMQP_URL, HELORA_FEDERATION, HELORA_AGGREGATOR__BUFFER_SIZE=8,
HELORA_WORKER__LR=0.001.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

from helora.shared.errors import ConfigError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(_Frozen):
    model: str = "packaged"  # the packaged all-MiniLM-L6-v2; or a local path / hub id
    max_rank: int = Field(8, ge=1, le=1024)  # R
    lora_alpha: float = Field(16.0, gt=0)  # alpha at rank R; every client uses scale alpha/R
    target_modules: tuple[str, ...] = ("query", "value")
    max_length: int = Field(64, ge=8, le=4096)
    seed: int = 0  # seed of the version-0 global (LoRA A init and classifier head)


class AggregatorSettings(_Frozen):
    method: Literal["pad", "zeropad", "fedavg", "hetlora", "flexlora", "kd"] = "pad"
    # HeLoRA-KD: one slot per rank level (empty: allowed_ranks, else every client rank 1..R is
    # not allowed: set it), and mutual distillation on a public set that no client trains on:
    # the public split of kd_data (load_federated_data carves it disjoint from the train pool;
    # workers must use the same data seed and max_train so their pool excludes it).
    rank_levels: tuple[int, ...] = ()
    kd_data: str | None = None
    kd_public_size: int = Field(500, ge=1)
    kd_steps: int = Field(30, ge=1)
    kd_batch_size: int = Field(32, ge=1)
    kd_lr: float = Field(1e-3, gt=0)
    kd_temperature: float = Field(1.0, gt=0)
    checkpoint_dir: Path = Path("checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    padding: Literal["zero", "mean", "context", "adjacent"] = "zero"
    weighting: Literal["data", "rank", "coverage"] = "rank"
    beta: float = Field(1.0, ge=0)
    staleness: Literal["polynomial", "hinge", "constant"] = "polynomial"
    staleness_a: float = Field(0.5, ge=0)
    hinge_b: int = Field(4, ge=0)
    max_staleness: int = Field(8, ge=0)
    buffer_size: int = Field(4, ge=1)
    buffer_timeout: float = Field(60.0, gt=0)  # seconds: apply a partial buffer after this
    server_lr: float = Field(1.0, gt=0)
    allowed_ranks: tuple[int, ...] = ()  # empty: any rank 1..R
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_message_mb: float = Field(64.0, gt=0)  # larger updates are rejected (too_large)
    # An update whose norm exceeds max_norm_ratio x the median norm of the last norm_window
    # accepted updates (once min_norm_history were accepted), or max_update_norm, is rejected.
    max_norm_ratio: float = Field(50.0, gt=1)
    norm_window: int = Field(50, ge=1)
    min_norm_history: int = Field(5, ge=1)
    max_update_norm: float = Field(1e6, gt=0)
    # Testing only: SIGKILL the process at a named point (after_decode, after_buffer,
    # after_checkpoint, after_publish), the Nth time it is reached ("after_checkpoint:3").
    failpoint: str = ""
    # Reject updates whose AMQP user_id is missing (per-client credentials in production).
    require_user_id: bool = False
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics; None: off
    prefetch: int = Field(64, ge=1)  # unacked deliveries: >= K x chunks per update, with room
    chunk_timeout: float = Field(120.0, gt=0)  # seconds before an incomplete chunk set fails
    reassembly_max_mb: float = Field(1024.0, gt=0)  # bytes held across open chunk sets
    metrics_host: str = "127.0.0.1"


class WorkerSettings(_Frozen):
    client_id: str = "client-0"
    rank: int = Field(4, ge=1)
    data: str = "../shared/data/sst2"
    partition: str = "0/1"  # I/N
    scheme: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    max_train: int | None = Field(None, ge=1)  # cap on the training pool before partitioning
    steps: int = Field(20, ge=1)  # E local steps per update
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    slowness: float = Field(1.0, ge=1.0)  # 2.0 = takes twice as long as it trains
    max_updates: int = Field(0, ge=0)  # 0: until a signal
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    outbox_dir: Path = Path("outbox")
    chunk_mb: float = Field(8.0, gt=0)  # larger updates travel in chunks of this size
    data_seed: int = 0

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("client id: 1-64 of letters, digits, '_', '.', '-'")
        return v


class TlsSettings(_Frozen):
    """Client TLS for amqps:// URLs (the URL's query may carry the same: cacertfile, certfile,
    keyfile, verify, server_name_indication). Env: HELORA_TLS__CA, HELORA_TLS__CERT, ..."""

    ca: Path | None = None  # CA bundle that signed the broker's certificate
    cert: Path | None = None  # client certificate (brokers with fail_if_no_peer_cert)
    key: Path | None = None  # its private key (unencrypted)
    verify: bool = True  # verify the broker's certificate and host name
    server_name: str | None = None  # SNI / the host name to verify, if not the URL's

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "tls_ca": str(self.ca) if self.ca else None,
            "tls_cert": str(self.cert) if self.cert else None,
            "tls_key": str(self.key) if self.key else None,
            "tls_verify": self.verify,
            "tls_server_name": self.server_name,
        }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HELORA_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # flags > environment > config file (HELORA_CONFIG=path.toml) > defaults
        sources = [init_settings, env_settings]
        path = os.environ.get("HELORA_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    amqp_url: SecretStr = SecretStr(DEFAULT_AMQP_URL)
    federation: str = "default"  # every exchange and queue name derives from it
    heartbeat: int = Field(30, ge=0)  # seconds
    connect_attempts: int = Field(10, ge=1)
    torch_threads: int = Field(1, ge=0)  # 0: torch's default
    tls: TlsSettings = TlsSettings()
    model: ModelSettings = ModelSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    worker: WorkerSettings = WorkerSettings()

    @field_validator("federation")
    @classmethod
    def _federation(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("federation: 1-64 of letters, digits, '_', '.', '-'")
        return v


def load_settings(**overrides: Any) -> Settings:
    """Flags > environment > the TOML file named by HELORA_CONFIG > defaults.

    None values are ignored, so unset CLI flags fall through to the environment."""
    clean = _drop_none(overrides)
    config = os.environ.get("HELORA_CONFIG")
    if config and not Path(config).is_file():
        raise ConfigError(f"HELORA_CONFIG={config} is not a file")
    try:
        return Settings(**clean)
    except ValueError as exc:  # pydantic.ValidationError (and TOML errors) are ValueErrors
        raise ConfigError(f"invalid settings: {exc}") from exc


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
