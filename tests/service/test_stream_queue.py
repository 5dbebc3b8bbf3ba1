"""The Redis Streams queue against a real redis-server: sharing, reclaim, dead letters,
idempotent redelivery, capacity, heartbeats, Redis going away, and prefix routing (a prompt's
items to the worker its key prefers, fallback under load, streams of dead workers taken over)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rmserve.service.jobs import Job
from rmserve.service.launcher import RedisServer
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue import QueueFullError, QueueUnavailableError, redis_streams
from rmserve.service.queue.base import Depth
from rmserve.service.queue.redis_streams import (
    StreamQueue,
    StreamSettings,
    jobs_key,
    result_key,
    streams_key,
    worker_stream_key,
    workers_key,
)
from rmserve.wire.trajectory import Trajectory

# Lua run before each script of this module: it refuses a command on a key the script did not
# declare in KEYS (Redis Cluster needs every key declared; a standalone Redis does not check).
# Key positions are those of the commands the scripts use.
KEY_CHECK = """
local real_redis = redis
local declared_keys = {}
for _, key in ipairs(KEYS) do declared_keys[key] = true end
local function check(...)
  local args = {...}
  local command = string.upper(args[1])
  local keys = {}
  if command == 'XINFO' or command == 'XGROUP' then
    keys = {args[3]}
  elseif command == 'XREADGROUP' then
    for i = 2, #args do
      if string.upper(args[i]) == 'STREAMS' then
        for j = i + 1, i + (#args - i) / 2 do keys[#keys + 1] = args[j] end
        break
      end
    end
  elseif command ~= 'TIME' then
    keys = {args[2]}
  end
  for _, key in ipairs(keys) do
    if not declared_keys[key] then error('undeclared key ' .. key .. ' for ' .. command) end
  end
end
local redis = setmetatable({
  call = function(...) check(...) return real_redis.call(...) end,
  pcall = function(...) check(...) return real_redis.pcall(...) end,
}, {__index = real_redis})
"""


@pytest.fixture(autouse=True)
def scripts_declare_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every queue made in these tests runs its scripts with KEY_CHECK."""
    monkeypatch.setattr(redis_streams, "LUA", redis_streams.LUA + KEY_CHECK)


ITEM = Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}]})
FAST = StreamSettings(capacity=1000, max_deliveries=2, reclaim_idle_s=0.3, sweep_s=0.5)
# Where admission puts jobs, seen in the streams at once: fifo scheduling, which routes them at
# admission (fair scheduling routes them the same way as it releases them from the waiting
# room: tests/service/test_redis_scheduling.py).
ROUTED = replace(FAST, scheduling="fifo")


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
        result_key("m", job.id), ItemResult(index=0, score=7.0).model_dump_json()
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


async def test_a_request_is_admitted_while_the_backlog_is_below_capacity(redis_url: str) -> None:
    """All or none, by the backlog: a request larger than the capacity gets in on an idle
    queue (it is not a 429 forever), and a large request is not starved by small ones."""
    gateway = StreamQueue.from_url(redis_url, StreamSettings(capacity=10))
    await gateway.enqueue(jobs("big", 12))
    with pytest.raises(QueueFullError) as caught:
        await gateway.enqueue(jobs("b", 1))
    assert caught.value.retry_after_s >= 1
    assert await gateway.depth("m") == Depth(pending=0, lag=12)
    worker = StreamQueue.from_url(redis_url, StreamSettings(capacity=10), name="w")
    for job in await worker.fetch("m", 3, wait_s=0.1):
        await worker.complete(job, ItemResult(index=job.index, score=0.0))
    await gateway.enqueue(jobs("c", 5))  # 9 left: below capacity
    with pytest.raises(QueueFullError):
        await gateway.enqueue(jobs("d", 1))
    for queue in (gateway, worker):
        await queue.close()


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


# -- prefix routing ----------------------------------------------------------------------------


def keyed(request: str, prompts: int, per_prompt: int) -> list[Job]:
    """`per_prompt` items (a GRPO group) of each of `prompts` prompts, keyed by prompt."""
    batch = jobs(request, prompts * per_prompt)
    return [
        job.model_copy(update={"prefix_key": f"{request}-p{job.index // per_prompt}"})
        for job in batch
    ]


async def announce(
    redis: aioredis.Redis, name: str, concurrency: int, status: str = "ready", age: float = 0.0
) -> None:
    """What a worker's WorkerAnnouncer writes (service.fleet), `age` seconds old."""
    seconds, micros = await redis.time()
    state = {"status": status, "reason": None, "at": seconds + micros / 1e6 - age,
             "stream": worker_stream_key("m", name), "concurrency": concurrency}  # fmt: skip
    await redis.hset(workers_key("m"), name, json.dumps(state))


def preferred(prefix_key: str, names: list[str]) -> list[str]:
    """Rendezvous order: the highest sha1(prefix key, worker name) first."""

    def weight(name: str) -> int:
        return int(hashlib.sha1(f"{prefix_key}\n{name}".encode()).hexdigest()[:12], 16)

    return sorted(names, key=lambda name: (-weight(name), name))


async def serve_recording(worker: StreamQueue, took: dict[str, str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for job in await worker.fetch("m", 16, wait_s=0.05):
            took[job.id] = worker.name
            await worker.complete(job, ItemResult(index=job.index, score=float(job.index)))


@contextlib.asynccontextmanager
async def recording(*workers: StreamQueue) -> AsyncIterator[dict[str, str]]:
    """Run the workers; yield which worker took each job id; stop and close them."""
    took: dict[str, str] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve_recording(worker, took, stop)) for worker in workers]
    try:
        yield took
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for worker in workers:
            await worker.close()


def routed(metrics: Metrics, route: str) -> float:
    sample = metrics.registry.get_sample_value(
        "rmserve_routed_jobs_total", {"model": "m", "route": route}
    )
    return sample or 0


async def test_the_items_of_a_prompt_go_to_the_worker_its_key_prefers(redis_url: str) -> None:
    metrics = Metrics("gateway")
    gateway = StreamQueue.from_url(redis_url, FAST, events=metrics)
    names = ["w0", "w1", "w2"]
    for name in names:
        await announce(gateway.client, name, concurrency=1000)
    batch = keyed("a", prompts=12, per_prompt=4) + jobs("plain", 6)  # the last: no key
    await gateway.enqueue(batch)
    assert routed(metrics, "affinity") == 48 and routed(metrics, "shared") == 6
    assert routed(metrics, "fallback") == 0
    workers = [StreamQueue.from_url(redis_url, FAST, name=name) for name in names]
    async with recording(*workers) as took:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    for job in batch[:48]:
        assert job.prefix_key is not None
        assert took[job.id] == preferred(job.prefix_key, names)[0], job.id
    assert len({took[job.id] for job in batch[:48]}) == 3  # the prompts are spread
    await gateway.close()


async def test_a_loaded_worker_sends_a_prompt_to_the_next_then_to_any(redis_url: str) -> None:
    metrics = Metrics("gateway")
    gateway = StreamQueue.from_url(redis_url, ROUTED, events=metrics)
    await announce(gateway.client, "w0", concurrency=3)
    await announce(gateway.client, "w1", concurrency=3)
    first, second = preferred("r-p0", ["w0", "w1"])
    lengths = []
    for request in range(3):  # the same prompt, 4 items each time: one request's stay together
        batch = [job.model_copy(update={"prefix_key": "r-p0"}) for job in jobs(f"r{request}", 4)]
        await gateway.enqueue(batch)
        lengths.append(
            [await gateway.client.xlen(s) for s in
             (worker_stream_key("m", first), worker_stream_key("m", second), jobs_key("m"))]
        )  # fmt: skip
    # The preferred worker while below its concurrency, then the next one, then any worker.
    assert lengths == [[4, 0, 0], [4, 4, 0], [4, 4, 4]]
    assert routed(metrics, "affinity") == 4 and routed(metrics, "fallback") == 8
    assert await gateway.depth("m") == Depth(pending=0, lag=12)
    workers = [StreamQueue.from_url(redis_url, FAST, name=name) for name in ("w0", "w1")]
    async with recording(*workers) as took:
        for request in range(3):
            assert sum((await gather(gateway, jobs(f"r{request}", 4))).values()) == 4
    assert Counter(took.values())[first] >= 4 and Counter(took.values())[second] >= 4
    assert await gateway.depth("m") == Depth(pending=0, lag=0)
    await gateway.close()


async def test_round_robin_deals_each_job_to_the_next_worker(redis_url: str) -> None:
    metrics = Metrics("gateway")
    gateway = StreamQueue.from_url(
        redis_url, replace(ROUTED, routing="round_robin"), events=metrics
    )
    names = ["w0", "w1"]
    for name in names:
        await announce(gateway.client, name, concurrency=2)  # load is ignored
    batch = keyed("a", prompts=2, per_prompt=3) + jobs("plain", 1)
    await gateway.enqueue(batch)
    await gateway.enqueue(jobs("next", 1))  # the turn carries over to the next request
    lengths = [await gateway.client.xlen(worker_stream_key("m", n)) for n in names]
    assert lengths == [4, 4] and await gateway.client.xlen(jobs_key("m")) == 0
    assert routed(metrics, "round_robin") == 8 and routed(metrics, "affinity") == 0
    workers = [
        StreamQueue.from_url(redis_url, replace(FAST, routing="round_robin"), name=n) for n in names
    ]
    async with recording(*workers) as took:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    # The items of one prompt are split between the workers.
    assert {took[job.id] for job in batch[:3]} == set(names)
    await gateway.close()


async def test_capacity_counts_every_stream_of_the_model(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, StreamSettings(capacity=10))
    await announce(gateway.client, "w0", concurrency=100)
    await gateway.enqueue(keyed("a", prompts=2, per_prompt=5))
    assert await gateway.client.xlen(worker_stream_key("m", "w0")) == 10
    with pytest.raises(QueueFullError):
        await gateway.enqueue(jobs("b", 3))
    assert await gateway.client.xlen(jobs_key("m")) == 0  # all or none
    await gateway.close()


async def test_shared_routing_and_unready_or_stale_workers_use_the_shared_stream(
    redis_url: str,
) -> None:
    shared = StreamQueue.from_url(redis_url, replace(ROUTED, routing="shared"))
    await announce(shared.client, "w0", concurrency=100)
    await announce(shared.client, "w1", concurrency=100, status="loading")
    await announce(shared.client, "w2", concurrency=100, age=FAST.stale_s + 1)
    await shared.enqueue(keyed("a", prompts=2, per_prompt=2))
    assert await shared.client.xlen(jobs_key("m")) == 4
    prefix = StreamQueue.from_url(redis_url, ROUTED)
    await prefix.client.hdel(workers_key("m"), "w0")
    await prefix.enqueue(keyed("b", prompts=2, per_prompt=2))  # no routable worker
    assert await prefix.client.xlen(jobs_key("m")) == 8
    assert await prefix.client.smembers(streams_key("m")) == set()
    # A worker with shared routing reads no own stream.
    worker = StreamQueue.from_url(redis_url, replace(FAST, routing="shared"), name="w0")
    assert worker.own_stream("m") is None
    assert len(await worker.fetch("m", 100, wait_s=0.1)) == 8
    assert not await worker.client.exists(worker_stream_key("m", "w0"))
    for queue in (shared, prefix, worker):
        await queue.close()


async def test_the_stream_of_a_killed_worker_is_taken_over_and_removed(redis_url: str) -> None:
    quick = replace(FAST, stale_s=1.0)
    gateway = StreamQueue.from_url(redis_url, quick)
    await announce(gateway.client, "dead", concurrency=1000)
    batch = keyed("a", prompts=5, per_prompt=4)
    await gateway.enqueue(batch)
    own = worker_stream_key("m", "dead")
    assert await gateway.client.xlen(own) == 20  # all routed to the only worker
    dead = StreamQueue.from_url(redis_url, FAST, name="dead")
    assert len(await dead.fetch("m", 6, wait_s=0.1)) == 6
    await dead.close()  # like kill -9: 6 pending, 14 undelivered in its own stream
    await announce(gateway.client, "dead", concurrency=1000, age=quick.stale_s + 1)  # silent
    await announce(gateway.client, "survivor", concurrency=1000)
    started = time.monotonic()
    async with recording(StreamQueue.from_url(redis_url, quick, name="survivor")) as took:
        got = await gather(gateway, batch)
        assert got == Counter({job.id: 1 for job in batch})
        assert set(took.values()) == {"survivor"}
        assert time.monotonic() - started < quick.reclaim_idle_s + 3
        # The empty orphan is deleted once its worker stayed silent stale_s more.
        for _ in range(int((quick.stale_s + 3) / 0.1)):
            if not await gateway.client.exists(own):
                break
            await asyncio.sleep(0.1)
    assert not await gateway.client.exists(own)
    assert await gateway.client.smembers(streams_key("m")) == {
        worker_stream_key("m", "survivor").encode()
    }
    assert await gateway.depth("m") == Depth(pending=0, lag=0)
    await gateway.close()


async def test_a_drained_workers_released_and_queued_jobs_go_to_the_others(
    redis_url: str,
) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    await announce(gateway.client, "leaving", concurrency=1000)
    batch = keyed("a", prompts=3, per_prompt=4)
    await gateway.enqueue(batch)
    leaving = StreamQueue.from_url(redis_url, FAST, name="leaving")
    held = await leaving.fetch("m", 5, wait_s=0.1)
    await gateway.client.hdel(workers_key("m"), "leaving")  # withdrawn (service.fleet)
    await leaving.release(held)
    await leaving.close()
    await announce(gateway.client, "staying", concurrency=1000)
    async with recording(StreamQueue.from_url(redis_url, FAST, name="staying")) as took:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    assert set(took.values()) == {"staying"}
    await gateway.close()


async def test_a_deleted_own_stream_is_recreated(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    worker = StreamQueue.from_url(redis_url, FAST, name="w0")
    assert await worker.fetch("m", 1, wait_s=0.01) == []
    await gateway.client.delete(worker_stream_key("m", "w0"))  # e.g. Redis lost its data
    assert await worker.fetch("m", 1, wait_s=0.01) == []  # NOGROUP: recreated
    await gateway.client.delete(worker_stream_key("m", "w0"))  # an orphan to a slower peer
    await asyncio.sleep(FAST.reclaim_every_s + 0.05)  # this fetch reclaims and tidies consumers
    assert await worker.fetch("m", 1, wait_s=0.01) == []
    await announce(gateway.client, "w0", concurrency=10)
    await gateway.enqueue(keyed("a", prompts=1, per_prompt=2))
    fetched = await worker.fetch("m", 10, wait_s=0.1)
    assert len(fetched) == 2 and all(
        " " + worker_stream_key("m", "w0") in (j.receipt or "") for j in fetched
    )
    for job in fetched:
        await worker.complete(job, ItemResult(index=job.index, score=1.0))
    assert await gateway.depth("m") == Depth(pending=0, lag=0)
    await worker.close()
    await gateway.close()


async def test_a_live_workers_stream_is_not_deleted_after_a_stall(redis_url: str) -> None:
    """After a Redis stall every announcement is stale; a peer only suspects the streams then,
    and the worker's next announcement clears the suspicion: its stream is never deleted."""
    quick = replace(FAST, stale_s=1.0)
    peer = StreamQueue.from_url(redis_url, quick, name="peer")
    live = StreamQueue.from_url(redis_url, quick, name="live")
    assert await live.fetch("m", 1, wait_s=0.01) == []  # its stream and group exist
    own = worker_stream_key("m", "live")
    deadline = time.monotonic() + 4 * quick.stale_s
    while time.monotonic() < deadline:  # stale by the time a peer looks, fresh again after
        await announce(peer.client, "live", concurrency=10, age=quick.stale_s + 5)
        await asyncio.sleep(quick.reclaim_every_s + 0.05)
        await peer.fetch("m", 1, wait_s=0.01)  # looks for orphans
        assert await peer.client.exists(own), "a live worker's stream was deleted"
        await announce(peer.client, "live", concurrency=10)
        await asyncio.sleep(quick.reclaim_every_s + 0.05)
        await peer.fetch("m", 1, wait_s=0.01)
    await live.close()
    await peer.close()


async def test_a_worker_reading_its_stream_when_it_is_deleted_recovers(redis_url: str) -> None:
    """Redis answers a read blocked on a deleted stream with UNBLOCKED; the worker recreates its
    stream and goes on (it used to raise, ending the worker loop)."""
    gateway = StreamQueue.from_url(redis_url, FAST)
    worker = StreamQueue.from_url(redis_url, FAST, name="w0")
    assert await worker.fetch("m", 1, wait_s=0.01) == []
    reading = asyncio.create_task(worker.fetch("m", 1, wait_s=2.0))
    await asyncio.sleep(0.3)  # blocked in XREADGROUP on its own stream and the shared one
    await gateway.client.delete(worker_stream_key("m", "w0"))
    assert await reading == []
    await announce(gateway.client, "w0", concurrency=10)
    await gateway.enqueue(keyed("a", prompts=1, per_prompt=2))
    fetched = await worker.fetch("m", 10, wait_s=0.5)
    assert len(fetched) == 2
    for job in fetched:
        await worker.complete(job, ItemResult(index=job.index, score=1.0))
    await worker.close()
    await gateway.close()


async def test_a_poison_job_does_not_take_its_neighbours_to_the_dead_letter_stream(
    redis_url: str,
) -> None:
    """Issue 25.1: a job that kills every worker that takes it (kill -9 mid-score). The first
    worker dies holding it with 9 innocent jobs. A redelivered job is handed out alone, one at
    a time (never held beside others a crash would take down too), so only the poison reaches
    the dead-letter stream; its neighbours are scored."""
    settings = replace(FAST, max_deliveries=3)
    gateway = StreamQueue.from_url(redis_url, settings)
    first, later = jobs("a", 10), jobs("b", 6)  # a:0 is the poison
    await gateway.enqueue(first)
    results: dict[str, ItemResult] = {}

    async def collect(batch: list[Job]) -> None:
        async for job_id, result in gateway.results([j.id for j in batch], time.time() + 30):
            results[job_id] = result

    collector = asyncio.create_task(collect(first))
    crashes, redelivered_takes = 0, 0
    scored_after: dict[str, int] = {}  # job -> crashes before it was scored
    deadline = time.monotonic() + 30
    while not collector.done() and time.monotonic() < deadline:
        worker = StreamQueue.from_url(redis_url, settings, name=f"w{crashes}")
        while not collector.done() and time.monotonic() < deadline:
            taken = await worker.fetch("m", 16, wait_s=0.05)
            if any(job.deliveries > 1 for job in taken):
                redelivered_takes += 1
                assert len(taken) == 1, [job.id for job in taken]
            if any(job.id == "a:0" for job in taken):
                break  # dies with every job it holds, unacknowledged
            for job in taken:
                await worker.complete(job, ItemResult(index=job.index, score=float(job.index)))
                scored_after[job.id] = crashes
        else:
            await worker.close()
            break
        crashes += 1
        await worker.close()
        # Its replacement starts once everything it held is reclaimable (a restart takes
        # longer than reclaim_idle_s): the poison and its neighbours are reclaimed together.
        await asyncio.sleep(settings.reclaim_idle_s + 0.1)
        if crashes == 1:
            await gateway.enqueue(later)  # other requests keep coming meanwhile
            collector = asyncio.gather(collector, collect(later))
    await collector
    assert set(results) == {job.id for job in first + later}
    poisoned = results.pop("a:0")
    assert poisoned.error is not None and poisoned.error.type == "dead_lettered"
    assert "delivered 4 times" in poisoned.error.message
    assert {job_id: r.error for job_id, r in results.items() if r.error} == {}
    assert crashes == settings.max_deliveries
    assert redelivered_takes == 9 + 2  # each innocent once, the poison twice (then the letter)
    # The innocents that died beside it (delivered fewer times) went before its last run.
    assert max(scored_after[job.id] for job in first[1:]) < settings.max_deliveries
    (letter,) = await gateway.dead_letters("m")
    assert '"id":"a:0"' in letter["job"]
    await gateway.close()


async def test_a_released_job_is_not_counted_as_a_failed_delivery(redis_url: str) -> None:
    """A draining worker's released jobs are redelivered with their count unchanged: a drain
    is not a crash, so they are neither isolated nor brought nearer the dead-letter limit."""
    gateway = StreamQueue.from_url(redis_url, FAST)
    await gateway.enqueue(jobs("a", 3))
    leaving = StreamQueue.from_url(redis_url, FAST, name="leaving")
    held = await leaving.fetch("m", 3, wait_s=0.1)
    await leaving.release(held)
    await leaving.close()
    staying = StreamQueue.from_url(redis_url, FAST, name="staying")
    taken: list[Job] = []
    for _ in range(20):
        taken += await staying.fetch("m", 16, wait_s=0.05)
        if len(taken) == 3:
            break
    assert sorted(job.id for job in taken) == ["a:0", "a:1", "a:2"]
    assert [job.deliveries for job in taken] == [1, 1, 1]
    for queue in (gateway, staying):
        await queue.close()
