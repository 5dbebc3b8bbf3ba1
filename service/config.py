"""One Settings object: built once (env prefix RMSERVE_, CLI flags override), passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    # Jobs waiting per model before the gateway answers 429 (queue full).
    queue_capacity: int = Field(default=100_000, ge=1)
    # Jobs a worker hands to its engine at once; vLLM batches them continuously.
    worker_concurrency: int = Field(default=512, ge=1)

    log_level: str = "INFO"
    log_json: bool = False
