"""The Redis Streams queue against a real redis-server: sharing, reclaim, dead letters,
idempotent redelivery, capacity, heartbeats, and Redis going away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rmserve.service.jobs import Job
from rmserve.service.launcher import RedisServer
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue import QueueFullError, QueueUnavailableError
from rmserve.service.queue.base import Depth
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
from rmserve.wire.trajectory import Trajectory

ITEM = Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}]})
FAST = StreamSettings(capacity=1000, max_deliveries=2, reclaim_idle_s=0.3, sweep_s=0.5)


def jobs(request: str, n: int, timeout: float = 30) -> list[Job]:
    now = time.time()
    return [
        Job(id=f"{request}:{i}", model="m", index=i, item=ITEM, enqueued_at=now,
            deadline=now + timeout)
        for i in range(n)
    ]  # fmt: skip


async def gather(gateway: StreamQueue, batch: list[Job], within_s: float = 10) -> Counter[str]:
    got: Counter[str] = Counter()
    async for job_id, result in gateway.results([j.id for j in batch], time.time() + within_s):
        assert result.index == int(job_id.split(":")[1])
        got[job_id] += 1
    return got


async def serve(worker: StreamQueue, taken: Counter[str], stop: asyncio.Event) -> None:
    """A worker answering every job with its index as the score."""
    while not stop.is_set():
        for job in await worker.fetch("m", 16, wait_s=0.05):
            taken[worker.name] += 1
            await worker.complete(job, ItemResult(index=job.index, score=float(job.index)))


@contextlib.asynccontextmanager
async def serving(*workers: StreamQueue) -> AsyncIterator[Counter[str]]:
    """Run `serve` for each worker; yield how many jobs each took; stop and close them."""
    taken: Counter[str] = Counter()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve(worker, taken, stop)) for worker in workers]
    try:
        yield taken
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for worker in workers:
            await worker.close()


async def test_two_workers_share_a_batch_and_every_item_is_answered_once(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    workers = [StreamQueue.from_url(redis_url, FAST, name=f"w{i}") for i in range(2)]
    batch = jobs("a", 200)
    await gateway.enqueue(batch)
    async with serving(*workers) as taken:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    assert taken["w0"] > 0 and taken["w1"] > 0 and sum(taken.values()) == 200
    await gateway.close()


def counted(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"rmserve_jobs_{name}_total", {"model": "m"}) or 0


async def test_depth_and_job_events_follow_the_jobs(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    assert await gateway.depth("m") == Depth(pending=0, lag=0)  # no stream yet
    batch = jobs("a", 10)
    await gateway.enqueue(batch)
    assert await gateway.depth("m") == Depth(pending=0, lag=10)
    first = Metrics("worker")
    worker = StreamQueue.from_url(redis_url, FAST, name="first", events=first)
    held = await worker.fetch("m", 4, wait_s=0.1)
    assert await gateway.depth("m") == Depth(pending=4, lag=6)
    for job in held[:3]:
        await worker.complete(job, ItemResult(index=job.index, score=1.0))
    assert await gateway.depth("m") == Depth(pending=1, lag=6)
    assert counted(first, "acked") == 3 and counted(first, "redelivered") == 0
    await worker.close()  # like a crash: the fourth job stays pending
    await asyncio.sleep(FAST.reclaim_idle_s + 0.05)
    second = Metrics("worker")
    async with serving(StreamQueue.from_url(redis_url, FAST, name="second", events=second)):
        got = await gather(gateway, batch[3:])
    assert sum(got.values()) == 7
    assert counted(second, "acked") == 7 and counted(second, "redelivered") == 1
    assert counted(second, "dead_lettered") == 0
    assert await gateway.depth("m") == Depth(pending=0, lag=0)
    await gateway.close()


async def test_jobs_of_a_dead_consumer_are_reclaimed(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    batch = jobs("a", 20)
    await gateway.enqueue(batch)
    dead = StreamQueue.from_url(redis_url, FAST, name="dead")
    assert len(await dead.fetch("m", 5, wait_s=0.1)) == 5
    await dead.close()  # like kill -9: the 5 entries stay pending, unacknowledged
    started = time.monotonic()
    async with serving(StreamQueue.from_url(redis_url, FAST, name="survivor")) as taken:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    assert taken["survivor"] == 20
    assert time.monotonic() - started < FAST.reclaim_idle_s + 3
    await gateway.close()


async def test_a_poison_job_goes_to_the_dead_letter_stream(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    batch = jobs("a", 3)
    await gateway.enqueue(batch)
    # Each crashing consumer takes the poison job (index 0) and dies without acknowledging.
    for attempt in range(FAST.max_deliveries):
        crashing = StreamQueue.from_url(redis_url, FAST, name=f"crash{attempt}")
        await asyncio.sleep(FAST.reclaim_idle_s + 0.05)
        fetched = await crashing.fetch("m", 1, wait_s=0.1)
        assert [job.index for job in fetched] == [0]
        await crashing.close()
    await asyncio.sleep(FAST.reclaim_idle_s + 0.05)
    results = {}
    metrics = Metrics("worker")
    async with serving(StreamQueue.from_url(redis_url, FAST, name="healthy", events=metrics)):
        async for job_id, result in gateway.results([j.id for j in batch], time.time() + 10):
            results[job_id] = result
    assert counted(metrics, "dead_lettered") == 1 and counted(metrics, "acked") == 3
    assert set(results) == {job.id for job in batch}
    poisoned = results["a:0"]
    assert poisoned.error is not None and poisoned.error.type == "dead_lettered"
    assert "max_deliveries 2" in poisoned.error.message
    assert results["a:1"].error is None and results["a:2"].error is None
    (letter,) = await gateway.dead_letters("m")
    assert '"id":"a:0"' in letter["job"] and "delivered 3 times" in letter["reason"]
    await gateway.close()
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rmserve.service.cli", "dead-letters", "m",
         "--redis-url", redis_url],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    (line,) = [json.loads(text) for text in listed.stdout.splitlines()]
    assert line["job"] == "a:0" and line["index"] == 0 and "delivered 3 times" in line["reason"]


async def test_a_redelivered_job_with_a_stored_result_is_not_scored_again(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    batch = jobs("a", 1)
    await gateway.enqueue(batch)
    first = StreamQueue.from_url(redis_url, FAST, name="first")
    (job,) = await first.fetch("m", 1, wait_s=0.1)
    # The worker stored the result and died before acknowledging it.
    await first._redis.set(
        f"rmserve:result:{job.id}", ItemResult(index=0, score=7.0).model_dump_json()
    )
    await first.close()
    await asyncio.sleep(FAST.reclaim_idle_s + 0.05)
    second = StreamQueue.from_url(redis_url, FAST, name="second")
    assert await second.fetch("m", 1, wait_s=0.1) == []  # answered from the store, not handed out
    got = [result async for _, result in gateway.results([job.id], time.time() + 5)]
    assert [r.score for r in got] == [7.0]
    await gateway.close()
    await second.close()


async def test_in_flight_jobs_are_not_stolen_while_their_worker_lives(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    await gateway.enqueue(jobs("a", 1))
    slow = StreamQueue.from_url(redis_url, FAST, name="slow")
    (job,) = await slow.fetch("m", 1, wait_s=0.1)
    other = StreamQueue.from_url(redis_url, FAST, name="other")
    for _ in range(6):  # well past reclaim_idle_s, while slow's heartbeat runs
        await asyncio.sleep(FAST.reclaim_idle_s / 2)
        assert await other.fetch("m", 1, wait_s=0.01) == []
    await slow.complete(job, ItemResult(index=0, score=1.0))
    for queue in (gateway, slow, other):
        await queue.close()


async def test_a_full_queue_refuses_the_request(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, StreamSettings(capacity=10))
    await gateway.enqueue(jobs("a", 8))
    with pytest.raises(QueueFullError) as caught:
        await gateway.enqueue(jobs("b", 3))
    assert caught.value.retry_after_s >= 1
    await gateway.enqueue(jobs("c", 2))
    await gateway.close()


async def test_unreachable_redis_is_reported_quickly() -> None:
    from rmserve.service.launcher import free_port

    gateway = StreamQueue.from_url(f"redis://127.0.0.1:{free_port()}/0", FAST)
    started = time.monotonic()
    with pytest.raises(QueueUnavailableError):
        await gateway.ping()
    with pytest.raises(QueueUnavailableError):
        await gateway.enqueue(jobs("a", 1))
    assert time.monotonic() - started < 5
    await gateway.close()


async def test_redis_restart_is_survived_and_accepted_jobs_persist(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    gateway = StreamQueue.from_url(server.url, FAST)
    batch = jobs("a", 5)
    await gateway.enqueue(batch)
    server.stop()
    started = time.monotonic()
    with pytest.raises(QueueUnavailableError):
        await gateway.ping()
    with pytest.raises(QueueUnavailableError):
        await gateway.enqueue(jobs("b", 1))
    assert time.monotonic() - started < 5  # no hang while Redis is away
    server.start()  # same port and directory: the append-only file brings the jobs back
    try:
        await gateway.ping()
        worker = StreamQueue.from_url(server.url, FAST, name="after-restart")
        fetched = await worker.fetch("m", 10, wait_s=0.2)
        assert sorted(job.id for job in fetched) == sorted(job.id for job in batch)
        for job in fetched:
            await worker.complete(job, ItemResult(index=job.index, score=1.0))
        assert await gather(gateway, batch) == Counter({job.id: 1 for job in batch})
        await worker.close()
    finally:
        await gateway.close()
        server.stop()
