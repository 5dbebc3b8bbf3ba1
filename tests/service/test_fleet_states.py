"""Worker states through a real Redis: announced by workers, read by gateways, stale ones gone."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rmserve.models.spec import DiscriminativeSpec
from rmserve.service import fleet
from rmserve.service.directory import ModelDirectory, ModelEntry
from rmserve.service.fleet import WorkerAnnouncer, model_state, watch_workers, workers_key
from rmserve.service.launcher import RedisServer
from rmserve.service.queue.redis_streams import worker_stream_key

SPECS = [DiscriminativeSpec(name=n, kind="discriminative", weights=f"org/{n}") for n in "ab"]


def test_a_model_is_as_good_as_its_best_worker() -> None:
    ready, loading = {"status": "ready", "reason": None}, {"status": "loading", "reason": None}
    broken = {"status": "unavailable", "reason": "out of memory"}
    assert model_state({"w1": broken, "w2": ready}, "a") == ("ready", None)
    assert model_state({"w1": broken, "w2": loading}, "a") == ("loading", None)
    status, reason = model_state({"w1": broken}, "a")
    assert status == "unavailable" and reason is not None and "out of memory" in reason
    status, reason = model_state({}, "a")
    assert status == "unavailable" and "rmserve worker --model a" in (reason or "")


async def wait_until(check: Callable[[], bool], timeout_s: float = 5) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check(), "condition not met in time"


async def test_gateways_see_what_workers_announce(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    directory = ModelDirectory(SPECS)

    def entry(name: str) -> ModelEntry:
        found = directory.get(name)
        assert found is not None
        return found

    announcer = WorkerAnnouncer(client, "a", "a@host:1")
    tasks = [asyncio.create_task(watch_workers(client, directory)),
             asyncio.create_task(announcer.run())]  # fmt: skip
    try:
        await wait_until(lambda: entry("b").status == "unavailable")
        await wait_until(lambda: entry("a").status == "loading")
        announcer.set("ready")
        await wait_until(lambda: entry("a").status == "ready")
        assert entry("a").workers == 1

        # A worker that stopped reporting long ago (by Redis time) is dropped.
        seconds, _ = await client.time()
        gone = {"status": "ready", "reason": None, "at": seconds - fleet.STALE_S - 1}
        await client.hset(workers_key("b"), "b@host:2", json.dumps(gone))
        await asyncio.sleep(fleet.REFRESH_S * 2)
        assert entry("b").status == "unavailable"
        assert await client.hkeys(workers_key("b")) == []

        tasks[1].cancel()
        await asyncio.gather(tasks[1], return_exceptions=True)
        await announcer.withdraw()
        await wait_until(lambda: entry("a").workers == 0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


async def test_a_worker_announces_the_stream_it_takes_routed_jobs_from(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    announcer = WorkerAnnouncer(client, "a", "a@host:1")
    task = asyncio.create_task(announcer.run())
    try:

        async def state() -> dict[str, object]:
            raw = await client.hget(workers_key("a"), "a@host:1")
            return json.loads(raw) if raw else {}

        for _ in range(100):
            if await state():
                break
            await asyncio.sleep(0.05)
        assert "stream" not in await state()  # loading: nothing is routed to it yet
        announcer.take_jobs(16, worker_stream_key("a", "a@host:1"))
        announcer.set("ready")
        for _ in range(100):
            if (await state()).get("status") == "ready":
                break
            await asyncio.sleep(0.05)
        announced = await state()
        assert announced["stream"] == worker_stream_key("a", "a@host:1")
        assert announced["concurrency"] == 16 and announced["status"] == "ready"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_a_withdrawn_worker_is_never_announced_again(redis_url: str) -> None:
    """A draining worker withdraws while its announcer still runs (issue: it re-announced
    itself ready every HEARTBEAT_S until the drain ended)."""
    client = aioredis.Redis.from_url(redis_url)
    announcer = WorkerAnnouncer(client, "a", "a@host:1")
    announcer.set("ready")
    task = asyncio.create_task(announcer.run())
    try:
        for _ in range(100):
            if await client.hget(workers_key("a"), "a@host:1"):
                break
            await asyncio.sleep(0.05)
        await announcer.withdraw()
        announcer.set("ready")  # a change after the withdrawal publishes nothing either
        await asyncio.sleep(fleet.HEARTBEAT_S * 1.5)
        assert await client.hkeys(workers_key("a")) == []
        await asyncio.wait_for(task, 1)  # the announcer has stopped
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_workers_are_not_dropped_after_a_redis_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis frozen longer than STALE_S (SIGSTOP): when it answers again every announcement
    looks old, but nobody could report meanwhile. The gateway keeps the workers while they
    report again (issue 25.2: it dropped them all and answered 503 "no worker is running")."""
    monkeypatch.setattr(fleet, "STALE_S", 2.0)
    monkeypatch.setattr(fleet, "HEARTBEAT_S", 0.5)
    server = RedisServer(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url)
    directory = ModelDirectory(SPECS)
    announcer = WorkerAnnouncer(client, "a", "a@host:1")
    announcer.set("ready")
    tasks = [asyncio.create_task(watch_workers(client, directory)),
             asyncio.create_task(announcer.run())]  # fmt: skip
    seen: list[str] = []
    try:
        entry = directory.get("a")
        assert entry is not None
        await wait_until(lambda: entry.status == "ready")
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(fleet.STALE_S + 1.5)
        server.process.send_signal(signal.SIGCONT)
        for _ in range(int(3 * fleet.HEARTBEAT_S / 0.05)):
            seen.append(entry.status)
            await asyncio.sleep(0.05)
        assert set(seen) == {"ready"}, seen
        assert await client.hkeys(workers_key("a")) == [b"a@host:1"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        server.stop()
