"""Usage by tenant and hour (service.usage), in the process and in a real Redis: what workers
record is what a report over a window sums, a failed write is retried and applied once, and
reports see only the tenants asked for."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemErrorBody, ItemResult, Timing, Usage
from rmserve.service.queue import InProcessQueue, QueueUnavailableError
from rmserve.service.usage import HOUR_S, MemoryUsage, RedisUsage, UsageLedger
from rmserve.wire.trajectory import Trajectory
from tests.e2e.test_cli import rmserve
from tests.service.test_gateway_auth import bearer, serving
from tests.service.test_tenants import KEYS, SHARED, TEAM

ITEM = Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}]})


def job(tenant: str, model: str = "rm") -> Job:
    now = time.time()
    return Job(id="j", model=model, index=0, item=ITEM, enqueued_at=now, deadline=now + 60,
               tenant=tenant)  # fmt: skip


def result(prompt: int, completion: int = 0, error: bool = False) -> ItemResult:
    return ItemResult(
        index=0,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        timing=Timing(queue_s=0.5, compute_s=0.25),
        error=ItemErrorBody(type="timeout", message="late") if error else None,
    )


def record_some(ledger: UsageLedger) -> None:
    ledger.record(job("a"), result(100))
    ledger.record(job("a"), result(50, error=True))
    ledger.record(job("a", "judge"), result(10, completion=30))
    ledger.record(job("b"), result(7))


async def check_report(ledger: UsageLedger) -> None:
    now = time.time()
    report = await ledger.report(now - 60, now + 1, None)
    assert report.start <= now - 60 and report.end >= now and report.start % HOUR_S == 0
    by_tenant = {t.tenant: {m.model: m for m in t.models} for t in report.tenants}
    assert sorted(by_tenant) == ["a", "b"]
    rm = by_tenant["a"]["rm"]
    assert (rm.items, rm.errors, rm.prompt_tokens, rm.completion_tokens) == (2, 1, 150, 0)
    assert rm.queue_s == pytest.approx(1.0) and rm.compute_s == pytest.approx(0.5)
    assert by_tenant["a"]["judge"].completion_tokens == 30
    only_b = await ledger.report(now - 60, now + 1, ["b"])
    assert [t.tenant for t in only_b.tenants] == ["b"]
    earlier = await ledger.report(now - 10 * HOUR_S, now - 5 * HOUR_S, None)
    assert earlier.tenants == []


async def test_usage_in_the_process() -> None:
    ledger = MemoryUsage(retention_days=1)
    record_some(ledger)
    await check_report(ledger)


async def test_usage_in_redis(redis_url: str) -> None:
    writer = RedisUsage(aioredis.Redis.from_url(redis_url), retention_days=1)
    record_some(writer)
    await writer.close()  # writes what is left
    reader = RedisUsage(aioredis.Redis.from_url(redis_url), retention_days=1)
    await check_report(reader)
    await reader.close()


async def test_a_failed_write_is_kept_and_applied_once(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    ledger = RedisUsage(client, retention_days=1)
    ledger.record(job("c"), result(100))
    await ledger.flush()
    ledger.record(job("c"), result(1))
    # The next write fails after Redis applied it (its reply lost): retried, applied once.
    script = ledger._add_once
    calls = 0

    async def applied_then_lost(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        reply = await script(*args, **kwargs)
        if calls == 1:
            raise aioredis.ConnectionError("reply lost")
        return reply

    ledger._add_once = applied_then_lost  # type: ignore[assignment]
    with pytest.raises(QueueUnavailableError):
        await ledger.flush()
    await ledger.flush()
    assert calls == 2
    now = time.time()
    (c,) = (await ledger.report(now - 60, now + 1, ["c"])).tenants
    assert c.models[0].items == 2 and c.models[0].prompt_tokens == 101
    await ledger.close()


def test_the_usage_endpoint_shows_a_key_its_tenants(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    settings = Settings(api_keys_file=keys)
    usage = MemoryUsage(settings.usage_retention_days)
    for tenant in ("rl-team", "evals", "team-a", "other"):
        usage.record(job(tenant), result(10))
    directory = ModelDirectory([])
    app = create_app(settings, InProcessQueue(10), directory, Metrics(), usage=usage)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        seen = http.get("/v1/usage", headers=bearer(SHARED))
        assert seen.status_code == 200, seen.text
        assert [t["tenant"] for t in seen.json()["tenants"]] == ["evals", "rl-team"]
        own = http.get("/v1/usage", headers=bearer(TEAM)).json()
        assert [t["tenant"] for t in own["tenants"]] == ["team-a"]
        assert own["tenants"][0]["models"][0]["prompt_tokens"] == 10
        one = http.get("/v1/usage", params={"tenant": "evals"}, headers=bearer(SHARED)).json()
        assert [t["tenant"] for t in one["tenants"]] == ["evals"]
        refused = http.get("/v1/usage", params={"tenant": "other"}, headers=bearer(SHARED))
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "tenant"
        backwards = http.get("/v1/usage", params={"start": 10, "end": 5}, headers=bearer(TEAM))
        assert backwards.status_code == 422 and backwards.json()["error"]["param"] == "start"
        assert http.get("/v1/usage").status_code == 401


async def test_rmserve_usage_reads_every_tenant_from_redis(redis_url: str) -> None:
    ledger = RedisUsage(aioredis.Redis.from_url(redis_url), retention_days=1)
    record_some(ledger)
    await ledger.close()
    done = await asyncio.to_thread(rmserve, "usage", "--redis-url", redis_url, "--hours", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"a", "b"} <= {t["tenant"] for t in report["tenants"]}
    done = await asyncio.to_thread(rmserve, "usage", "--redis-url", redis_url, "--tenant", "b")
    assert [t["tenant"] for t in json.loads(done.stdout)["tenants"]] == ["b"]
