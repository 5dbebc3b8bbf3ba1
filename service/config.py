"""One Settings object: built once (env prefix RMSERVE_, CLI flags override), passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rmserve import examples


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_", extra="forbid")

    # A path, or the name of a registry shipped with rmserve (default, tiny: rmserve.examples).
    registry: Path = Field(default=examples.DEFAULT_REGISTRY, description="model registry YAML")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Request limits: beyond them a request is refused with 413, before any work is done.
    max_items_per_request: int = Field(default=1024, ge=1)
    max_request_bytes: int = Field(default=64 << 20, ge=1024)
    # Per item (413 naming the item beyond them): messages (with candidates'), characters of
    # text, images, an image's encoded bytes and decoded pixels (read from its header).
    max_messages_per_item: int = Field(default=1024, ge=1)
    max_chars_per_item: int = Field(default=4_000_000, ge=1)
    max_images_per_item: int = Field(default=16, ge=0)
    max_image_bytes: int = Field(default=20 << 20, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Images are data: URLs. An http(s) image URL starting with one of these prefixes (comma-
    # separated in the env var, e.g. https://images.example.com/) is fetched by the gateway;
    # any other URL is refused. Empty: no server-side fetches at all.
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Overload: requests handled at once, and bytes of request bodies held at once, by one
    # gateway process; beyond either it answers 429 at once instead of queueing.
    max_concurrent_requests: int = Field(default=512, ge=1)
    max_inflight_bytes: int = Field(default=1 << 30, ge=1024)
    # How long the gateway waits for an item's result when the request names no timeout_s.
    default_timeout_s: float = Field(default=600.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)

    # Async batches (POST /v1/jobs): items per batch, and how long results are kept once done.
    max_items_per_batch: int = Field(default=100_000, ge=1)
    batch_result_ttl_s: float = Field(default=3600.0, gt=0)

    # Jobs waiting per model before the gateway answers 429 (queue full).
    queue_capacity: int = Field(default=100_000, ge=1)
    # Jobs a worker hands to its model at once (vLLM batches them continuously). Unset: twice
    # what the model's engine runs at once (2 x max_num_seqs), or 512 for a model without one.
    worker_concurrency: int | None = Field(default=None, ge=1)
    # On SIGTERM, how long in-flight jobs may take to finish before the engines stop. Keep it
    # below Kubernetes' terminationGracePeriodSeconds.
    drain_grace_s: float = Field(default=30.0, ge=0)

    # API keys (SHA-256 digests), the models and quotas of each: a YAML file (service/auth.py).
    # When set, /v1/* and /get_reward need `Authorization: Bearer <key>` (or Basic with the key
    # as the password); unset: open (local use).
    api_keys_file: FilePath | None = None
    # A request holds its key's concurrent-items quota by a lease, renewed while it lives; a
    # gateway that dies stops renewing, and its leases stop counting after this long.
    quota_lease_ttl_s: float = Field(default=30.0, gt=0)

    # The order in which a model's workers take waiting jobs: `fair` (tenant shares, priority
    # classes, deadlines: service.scheduling) or `fifo` (arrival order, the old behaviour).
    scheduling: Literal["fair", "fifo"] = "fair"
    # Usage by tenant and hour (GET /v1/usage, `rmserve usage`) is kept this long.
    usage_retention_days: float = Field(default=90.0, gt=0)

    # Result cache: seconds a result is kept (0: off) and, in embedded mode, how many.
    result_cache_ttl_s: float = Field(default=0.0, ge=0)
    result_cache_max_entries: int = Field(default=100_000, ge=1)

    # Distributed mode (`rmserve gateway`, `rmserve worker`): the Redis that joins them, e.g.
    # redis://:password@redis:6379/0 (rediss:// for TLS). `rmserve serve` ignores it.
    redis_url: str | None = None
    # A Redis command unanswered this long (a frozen or partitioned Redis) fails: the request
    # gets 503, a worker retries. Connecting has its own 2 s limit.
    redis_timeout_s: float = Field(default=5.0, ge=2, le=60)
    # High availability: a primary with replicas behind Sentinel. The sentinels (host:port,
    # comma-separated) name the primary of `redis_sentinel_service`; gateways and workers follow
    # a failover to the promoted replica without restarts. redis_url then gives only the
    # credentials, database and TLS (rediss://); its host and port are the sentinels' to say.
    redis_sentinels: str | None = None
    redis_sentinel_service: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None  # when the sentinels require one
    # Redis Cluster: redis_url names any node (the client discovers the others and follows
    # slot moves and failovers). Every key carries its model as hash tag, so a model's keys
    # live on one slot and scale out by model. Not with redis_sentinels, nor with
    # redis_wait_replicas (WAIT would not reach the node that took the writes).
    redis_cluster: bool = False
    # What "accepted" means across a failover: a request is admitted (202 for /v1/jobs, scoring
    # begins) and a worker's result announced only once this many replicas have it (WAIT);
    # when fewer confirm within redis_wait_timeout_s, the request gets 503 (its jobs may still
    # be scored). 0: off (asynchronous replication: a failover can lose the last writes, which
    # the client then sees as a timeout or a 503, never a wrong score).
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    redis_wait_timeout_s: float = Field(default=1.0, gt=0, le=30)
    # A job delivered this many times without a result (its workers died) is dead-lettered.
    max_deliveries: int = Field(default=3, ge=1)
    # A job held this long by a worker that stopped renewing it (it died) goes to another.
    reclaim_idle_s: float = Field(default=60.0, gt=0)
    # How gateways route jobs to workers: prefix sends the items of one prompt to the same
    # worker while it has room (its engine computes the prompt once), the others to any free
    # worker; shared gives every job to whichever worker is free; round_robin sends each job to
    # the next worker in turn (a baseline that ignores prompts and load). Gateways and workers
    # both read it; mixing is safe (a shared worker is never routed to).
    routing: Literal["prefix", "round_robin", "shared"] = "prefix"

    # Agentic judges: the tool sandbox (`rmserve sandbox`), e.g. http://127.0.0.1:8002. Unset:
    # embedded mode runs the tools in its own process tree (code still only in bubblewrap),
    # and a worker uses the sidecar at its default address.
    sandbox_url: str | None = None

    # GRPO groups sent in pieces (items with `group` and `group_size`, fewer in a request than
    # the size): how long the first item of a group waits for the rest before a listwise judge
    # gives up on it (options.group_wait_s overrides it per request); what then happens to the
    # items: `error` (each gets group_incomplete) or `judge` (the partial group is judged, its
    # results flagged `partial_group`). See service/cohorts.py.
    # Keep it below the trainer's HTTP timeout (OpenRLHF: 180 s), so that a request is answered
    # before its client gives up and resends it.
    group_wait_s: float = Field(default=120.0, gt=0)
    partial_groups: Literal["error", "judge"] = "error"

    # OpenRLHF compatibility (POST /get_reward): the model that scores its queries, and how a
    # query (the actor's decoded prompt + response) becomes an item (`?query_format=` overrides
    # it): auto parses a known chat template's turns back into messages (plain text when there
    # is none), plain splits the text at the prompt, raw scores the text as is (discriminative
    # models; see service/openrlhf.py).
    openrlhf_model: str | None = None
    openrlhf_query_format: Literal["auto", "plain", "raw"] = "auto"
    # OpenRLHF's n_samples_per_prompt (`?group_size=` overrides it): a listwise judge then gets
    # each prompt's samples, sent one per request, as one group (service.cohorts).
    openrlhf_group_size: int | None = Field(default=None, ge=2, le=4096)

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("registry", mode="before")
    @classmethod
    def _shipped_registry(cls, value: Any) -> Any:
        return examples.registry_path(value) if isinstance(value, str | Path) else value

    @field_validator("api_keys_file")
    @classmethod
    def _valid_keys_file(cls, path: Path | None) -> Path | None:
        if path is not None:  # imported here: the client CLI needs no server modules
            from rmserve.service.auth import load_keys

            load_keys(path)  # KeysFileError (a ValueError) names the entry and field
        return path

    @field_validator("image_url_allowlist", mode="before")
    @classmethod
    def _split_prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [prefix.strip() for prefix in value.split(",") if prefix.strip()]
        return value

    @field_validator("image_url_allowlist")
    @classmethod
    def _whole_hosts(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path:
                raise ValueError(
                    f"{prefix!r}: give scheme, host and a path, e.g. https://images.example.com/ "
                    "(without the path, https://images.example.com.evil.org would match too)"
                )
        return prefixes

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s}) exceeds max_timeout_s "
                f"({self.max_timeout_s})"
            )
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError(
                "RMSERVE_REDIS_CLUSTER and RMSERVE_REDIS_SENTINELS exclude each other: a Redis "
                "Cluster fails over by itself (set RMSERVE_REDIS_URL to any of its nodes)"
            )
        if self.redis_cluster and self.redis_wait_replicas:
            raise ValueError(
                "RMSERVE_REDIS_WAIT_REPLICAS is not supported with RMSERVE_REDIS_CLUSTER: the "
                "cluster client sends WAIT to a node of its own choosing, on another connection "
                "than the writes, so it would confirm nothing (set it to 0)"
            )
        if "RMSERVE_API_KEYS" in os.environ:  # ignored otherwise: the gateway would be open
            raise ValueError(
                "RMSERVE_API_KEYS is no longer read: keys are stored hashed in a keys file, "
                "RMSERVE_API_KEYS_FILE (`rmserve api-key NAME` prints an entry)"
            )
        return self
