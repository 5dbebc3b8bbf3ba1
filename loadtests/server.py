"""The server side of a load test: an `rmserve serve` the suite starts, and what the client asks
any server (its models, whether its queues are empty)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.launcher import ServerProcess

TINY_MODELS_VAR = "RMSERVE_TINY_MODELS"
# The suite's server: no result cache (repeated items would be answered from it), quiet vLLM.
SERVER_ENV = {"RMSERVE_RESULT_CACHE_TTL_S": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
_QUEUE_GAUGES = ("rmserve_queue_pending", "rmserve_queue_lag")


@contextmanager
def tiny_models(registry: Path) -> Iterator[str | None]:
    """$RMSERVE_TINY_MODELS for a registry that names it: the variable's value when set, else
    tiny models generated into a temporary directory for the duration (None: not needed)."""
    if "${" + TINY_MODELS_VAR + "}" not in registry.read_text():
        yield None
    elif os.environ.get(TINY_MODELS_VAR):
        yield os.environ[TINY_MODELS_VAR]
    else:
        from rmserve.models.tiny import make_tiny_models  # imports torch: only when needed

        with tempfile.TemporaryDirectory(prefix="rmserve-tiny-") as out:
            make_tiny_models(Path(out))
            yield out


@contextmanager
def serve(
    registry: Path, workdir: Path, env: dict[str, str], ready_timeout_s: float
) -> Iterator[tuple[ServerProcess, float]]:
    """`rmserve serve` on a free loopback port, every model settled; yields it and the seconds
    it took. Stopped with SIGTERM (drain) at the end."""
    started = time.monotonic()
    server = ServerProcess(registry, workdir / "server.log", env={**SERVER_ENV, **env})
    try:
        server.wait_settled(ready_timeout_s)
        yield server, time.monotonic() - started
    finally:
        server.stop(grace_s=60)


def model_list(base_url: str) -> list[dict[str, Any]]:
    """GET /v1/models data; empty when the server cannot be asked."""
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10)
        data = response.json()["data"] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []
    return [m for m in data if isinstance(m, dict) and "name" in m]


async def queued_jobs(http: httpx.AsyncClient) -> int | None:
    """Jobs queued or held by a worker, over all models (GET /metrics); None if unknown."""
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        if family.name in _QUEUE_GAUGES:
            total += sum(sample.value for sample in family.samples)
    return int(total)


async def wait_idle(base_url: str, timeout_s: float) -> tuple[float, bool | None]:
    """Wait until the server's queues are empty (the last phase's leftovers are done, so they do
    not load the next one); return the seconds waited and whether they emptied (None: the
    server's /metrics could not tell)."""
    began = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while True:
            jobs = await queued_jobs(http)
            waited = time.monotonic() - began
            if jobs is None:
                return waited, None
            if jobs == 0 or waited >= timeout_s:
                return waited, jobs == 0
            await asyncio.sleep(0.25)
