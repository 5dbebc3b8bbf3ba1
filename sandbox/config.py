"""Settings of the sandbox sidecar (env prefix RMSERVE_SANDBOX_, CLI flags override)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SandboxSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_SANDBOX_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8002, ge=0, le=65535)
    # Tools served (a subset of: crop, search, code_run, calculator, instruction_check).
    tools: list[str] = Field(
        default_factory=lambda: ["crop", "search", "code_run", "calculator", "instruction_check"]
    )

    # code_run: sandboxes running at once, and calls waiting for one (beyond: 429).
    code_concurrency: int = Field(default=4, ge=1)
    code_max_queued: int = Field(default=64, ge=0)
    # The most a call may ask for; calls may ask for less.
    code_cpu_s: float = Field(default=10.0, gt=0)
    code_wall_s: float = Field(default=20.0, gt=0)
    code_memory_mb: int = Field(default=512, ge=16)
    code_processes: int = Field(default=32, ge=1)
    code_file_size_mb: int = Field(default=16, ge=1)
    code_output_bytes: int = Field(default=65536, ge=256)
    # Development only: run code without bubblewrap (rlimits and a temp dir only) when
    # bubblewrap does not work. Never in production: the code can then read the host.
    allow_unsafe_code: bool = False
    bwrap: str = "bwrap"
    # Mount a fresh /proc in each code sandbox. Turn off in containers (Docker, Kubernetes):
    # their runtimes mask parts of /proc, and the kernel then refuses to mount a new one. The
    # code then sees no /proc at all.
    mount_proc: bool = True
    # A cgroup (path like /rmserve, or its directory) under which each code run gets its own
    # cgroup bounding its memory and processes. Unset: found automatically where the host
    # allows (root, or a delegated cgroup v2 subtree); else memory is bounded per process.
    cgroup_parent: str | None = None

    # crop: the largest image accepted (pixels, checked before decoding).
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # search: a JSON lines file of {"id", "text", "title"?} searched when an item brings no
    # documents of its own.
    corpus: Path | None = None
    # calculator and instruction checks: seconds before a call is abandoned.
    quick_tool_timeout_s: float = Field(default=2.0, gt=0)

    log_level: str = "INFO"
    log_json: bool = False
