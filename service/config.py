"""One Settings object: built once (env prefix RMSERVE_, CLI flags override), passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_", extra="forbid")

    registry: Path = Field(
        default=Path("deploy/registry.example.yaml"), description="model registry YAML file"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Request limits: beyond them a request is refused with 413, before any work is done.
    max_items_per_request: int = Field(default=1024, ge=1)
    max_request_bytes: int = Field(default=64 << 20, ge=1024)
    # How long the gateway waits for an item's result when the request names no timeout_s.
    default_timeout_s: float = Field(default=600.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)

    # Async batches (POST /v1/jobs): items per batch, and how long results are kept once done.
    max_items_per_batch: int = Field(default=100_000, ge=1)
    batch_result_ttl_s: float = Field(default=3600.0, gt=0)

    # Jobs waiting per model before the gateway answers 429 (queue full).
    queue_capacity: int = Field(default=100_000, ge=1)
    # Jobs a worker hands to its engine at once; vLLM batches them continuously.
    worker_concurrency: int = Field(default=512, ge=1)
    # On SIGTERM, how long in-flight jobs may take to finish before the engines stop. Keep it
    # below Kubernetes' terminationGracePeriodSeconds.
    drain_grace_s: float = Field(default=30.0, ge=0)

    # When set, /v1/* requires `Authorization: Bearer <key>` (comma-separated in the env var).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Result cache: seconds a result is kept (0: off) and, in embedded mode, how many.
    result_cache_ttl_s: float = Field(default=0.0, ge=0)
    result_cache_max_entries: int = Field(default=100_000, ge=1)

    # Distributed mode (`rmserve gateway`, `rmserve worker`): the Redis that joins them, e.g.
    # redis://:password@redis:6379/0 (rediss:// for TLS). `rmserve serve` ignores it.
    redis_url: str | None = None
    # A job delivered this many times without a result (its workers died) is dead-lettered.
    max_deliveries: int = Field(default=3, ge=1)
    # A job held this long by a worker that stopped renewing it (it died) goes to another.
    reclaim_idle_s: float = Field(default=60.0, gt=0)

    # Agentic judges: the tool sandbox (`rmserve sandbox`), e.g. http://127.0.0.1:8002. Unset:
    # embedded mode runs the tools in its own process tree (code still only in bubblewrap),
    # and a worker uses the sidecar at its default address.
    sandbox_url: str | None = None

    # OpenRLHF compatibility (POST /get_reward): the model that scores its queries.
    openrlhf_model: str | None = None

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s}) exceeds max_timeout_s "
                f"({self.max_timeout_s})"
            )
        if any(len(key) < 16 for key in self.api_keys):
            raise ValueError("api_keys must be at least 16 characters each")
        return self
