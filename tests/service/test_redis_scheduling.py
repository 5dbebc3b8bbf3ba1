"""The fair scheduler of distributed mode (service.queue.redis_scheduler) against a real
redis-server: jobs wait in the model's waiting room and go to the streams in service.scheduling's
order, whichever gateway admitted them and whichever worker reads; bundles are never split; the
ready workers' room bounds what is released; every script declares every key (KEY_CHECK)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace

from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult, Priority
from rmserve.service.queue.redis_streams import StreamQueue, jobs_key
from tests.service.test_stream_queue import (
    FAST,
    ITEM,
    announce,
    scripts_declare_every_key,  # noqa: F401  (autouse: every script checked for its keys)
)


def bundle(
    request: str,
    tenant: str,
    n: int = 1,
    weight: float = 1.0,
    priority: Priority = "training",
    timeout_s: float = 600,
    prompt: bool = True,
) -> list[Job]:
    """A request of n jobs sharing a prompt (a GRPO group), or of n prompts."""
    now = time.time()
    return [
        Job(id=f"{request}:{i}", model="m", index=i, item=ITEM, enqueued_at=now,
            deadline=now + timeout_s, tenant=tenant, weight=weight, priority=priority,
            prefix_key=f"{request}-p" if prompt else f"{request}-p{i}")
        for i in range(n)
    ]  # fmt: skip


async def take(worker: StreamQueue, n: int) -> list[Job]:
    jobs = await worker.fetch("m", n, wait_s=0.05)
    for job in jobs:
        await worker.complete(job, ItemResult(index=job.index, score=1.0))
    return jobs


async def test_saturating_tenants_get_items_by_weight_whichever_worker_reads(
    redis_url: str,
) -> None:
    gateways = [StreamQueue.from_url(redis_url, FAST) for _ in range(2)]
    for i in range(60):  # two gateways admit them, each tenant's 8-job groups alternating
        await gateways[i % 2].enqueue(bundle(f"a{i}", "a", n=8, weight=3))
        await gateways[(i + 1) % 2].enqueue(bundle(f"b{i}", "b", n=8))
    metrics = Metrics("worker")
    workers = [
        StreamQueue.from_url(redis_url, FAST, name=f"w{i}", events=metrics) for i in range(2)
    ]
    served: Counter[str] = Counter()
    for turn in range(40):  # 320 jobs, 5 rounds: both tenants have work waiting throughout
        jobs = await take(workers[turn % 2], 8)
        assert len({job.id.split(":")[0] for job in jobs}) == 1  # one group, whole
        served.update(job.tenant for job in jobs)
    assert abs(served["a"] / sum(served.values()) - 0.75) < 0.05, served
    # What the workers released is counted by route (no worker announced: the shared stream).
    routed = metrics.registry.get_sample_value(
        "rmserve_routed_jobs_total", {"model": "m", "route": "shared"}
    )
    assert routed == 320
    depth = await gateways[0].depth("m")
    assert depth.lag == 960 - 320  # the rest waits (in the waiting room)
    for queue in (*gateways, *workers):
        await queue.close()


async def test_a_small_tenant_waits_at_most_one_bundle_behind_a_large_backlog(
    redis_url: str,
) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    for i in range(14):  # a re-scoring batch of 14 x 64 jobs
        await gateway.enqueue(bundle(f"big{i}", "a", n=64))
    group = bundle("grpo", "b", n=16)
    await gateway.enqueue(group)
    worker = StreamQueue.from_url(redis_url, FAST, name="w")
    before = 0
    while True:
        jobs = await take(worker, 64)
        assert jobs, "the group never came"
        if jobs[0].tenant == "b":  # the group whole, then what follows it
            assert [job.id for job in jobs[:16]] == [job.id for job in group]
            break
        before += len(jobs)
    assert before <= 64
    await gateway.close()
    await worker.close()


async def test_higher_classes_first_and_earliest_deadline_first_within_a_tenant(
    redis_url: str,
) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    await gateway.enqueue(bundle("batch", "c", priority="batch"))
    await gateway.enqueue(bundle("late", "a", timeout_s=600))
    await gateway.enqueue(bundle("soon", "a", timeout_s=60))
    await gateway.enqueue(bundle("urgent", "b", priority="interactive"))
    worker = StreamQueue.from_url(redis_url, FAST, name="w")
    order = [job.id for _ in range(4) for job in await take(worker, 1)]
    assert order == ["urgent:0", "soon:0", "late:0", "batch:0"]
    await gateway.close()
    await worker.close()


async def test_only_time_behind_a_higher_class_ages_a_bundle(redis_url: str) -> None:
    """starvation_s of 1 s. B's bundles wait longer than that in the highest class with work,
    and keep their place by weight (aged, they would all go before A's); the batch bundle
    waits as long behind training work, and moves up to be served in turn with it."""
    settings = replace(FAST, starvation_s=1.0)
    gateway = StreamQueue.from_url(redis_url, settings)
    worker = StreamQueue.from_url(redis_url, settings, name="w")
    for i in range(20):
        await gateway.enqueue(bundle(f"b{i}", "b", n=8))
    await asyncio.sleep(1.5)
    for i in range(20):
        await gateway.enqueue(bundle(f"a{i}", "a", n=8, weight=3))
    await gateway.enqueue(bundle("batch", "c", priority="batch"))
    served: Counter[str] = Counter()
    for _ in range(8):  # two rounds
        served.update(job.tenant for job in await take(worker, 8))
    assert served == Counter({"a": 48, "b": 16}), served
    await asyncio.sleep(1.5)  # the batch bundle has waited behind training work: it moves up
    order = [job.tenant for _ in range(9) for job in await take(worker, 8)]  # within a round
    assert "c" in order, order
    await gateway.close()
    await worker.close()


async def test_admission_releases_only_what_the_ready_workers_can_take(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, FAST)
    await announce(gateway.client, "w0", concurrency=4)
    await gateway.enqueue(bundle("r", "a", n=10, prompt=False))
    assert (
        await gateway.client.xlen(jobs_key("m")) + await gateway.client.xlen("rmserve:{m}:jobs:w0")
        == 4
    )
    depth = await gateway.depth("m")
    assert (depth.pending, depth.lag) == (0, 10)
    await gateway.close()


async def test_fifo_scheduling_keeps_arrival_order(redis_url: str) -> None:
    fifo = replace(FAST, scheduling="fifo")
    gateway = StreamQueue.from_url(redis_url, fifo)
    await gateway.enqueue(bundle("first", "a", priority="batch"))
    await gateway.enqueue(bundle("second", "b", priority="interactive"))
    worker = StreamQueue.from_url(redis_url, fifo, name="w")
    assert [job.id for job in await take(worker, 2)] == ["first:0", "second:0"]
    await gateway.close()
    await worker.close()


async def test_a_waiting_room_left_inconsistent_recovers_instead_of_failing(
    redis_url: str,
) -> None:
    """Part of Redis's data lost (a restart without AOF of some keys, an operator's DEL): a
    tenant in the round robin without bundles, a bundle without its description, a count of
    waiting jobs that is wrong. Admission and reading go on; nothing fails with a script error."""
    gateway = StreamQueue.from_url(redis_url, replace(FAST, capacity=50))
    await gateway.enqueue(bundle("lost", "a", n=2))
    redis = gateway.client
    sched, bundles = "rmserve:{m}:sched", "rmserve:{m}:bundles"
    await redis.hset(sched, mapping={"active:1": '["a","ghost"]', "waiting": 999})
    for field in await redis.hkeys(bundles):
        if field.endswith(b":m"):
            await redis.hdel(bundles, field)
    worker = StreamQueue.from_url(redis_url, FAST, name="w")
    assert await take(worker, 8) == []  # the lost bundle is forgotten, the count reset
    await gateway.enqueue(bundle("fine", "b", n=3))  # admitted: the count no longer blocks it
    assert [job.id for job in await take(worker, 8)] == ["fine:0", "fine:1", "fine:2"]
    await gateway.close()
    await worker.close()
