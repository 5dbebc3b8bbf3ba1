"""The in-process queue: routing results to the waiting request, capacity, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue import InProcessQueue, QueueFullError
from rmserve.service.queue.base import Depth
from rmserve.wire.trajectory import Trajectory

ITEM = Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}]})


def jobs(request: str, n: int, model: str = "m", timeout: float = 10) -> list[Job]:
    now = time.time()
    return [
        Job(
            id=f"{request}:{i}",
            model=model,
            index=i,
            item=ITEM,
            enqueued_at=now,
            deadline=now + timeout,
        )
        for i in range(n)
    ]


async def drain(queue: InProcessQueue, model: str = "m") -> None:
    """A worker that answers every job with its index as the score."""
    while True:
        for job in await queue.fetch(model, 8, wait_s=0.05):
            await queue.complete(job, ItemResult(index=job.index, score=float(job.index)))


async def test_results_reach_the_request_that_enqueued_them() -> None:
    queue = InProcessQueue(capacity=100)
    first, second = jobs("a", 5), jobs("b", 3)
    await queue.enqueue(first)
    await queue.enqueue(second)
    worker = asyncio.create_task(drain(queue))
    got_a = {
        job_id: r.score async for job_id, r in queue.results([j.id for j in first], time.time() + 5)
    }
    got_b = {
        job_id: r.score
        async for job_id, r in queue.results([j.id for j in second], time.time() + 5)
    }
    worker.cancel()
    assert got_a == {f"a:{i}": float(i) for i in range(5)}
    assert got_b == {f"b:{i}": float(i) for i in range(3)}


async def test_fetch_takes_at_most_max_jobs_and_waits_bounded() -> None:
    queue = InProcessQueue(capacity=100)
    await queue.enqueue(jobs("a", 10))
    assert len(await queue.fetch("m", 4, wait_s=0.1)) == 4
    assert len(await queue.fetch("m", 100, wait_s=0.1)) == 6
    started = time.monotonic()
    assert await queue.fetch("m", 4, wait_s=0.1) == []
    assert time.monotonic() - started < 1


async def test_a_request_is_admitted_while_the_backlog_is_below_capacity() -> None:
    """Admission looks at the backlog, not at the request's size: a request is admitted whole
    while the backlog is below capacity and refused whole once it is not, so a large request
    is never starved by small ones (issue 25.4) nor refused forever for its size."""
    queue = InProcessQueue(capacity=5)
    await queue.enqueue(jobs("big", 7))  # larger than the capacity, on an idle queue
    with pytest.raises(QueueFullError) as caught:
        await queue.enqueue(jobs("b", 1))
    assert caught.value.retry_after_s >= 1
    assert await queue.depth("m") == Depth(pending=0, lag=7)
    await queue.enqueue(jobs("c", 1, model="other"))  # other models are unaffected
    for job in await queue.fetch("m", 3, wait_s=0.1):
        await queue.complete(job, ItemResult(index=job.index, score=0.0))
    await queue.enqueue(jobs("d", 4))  # the backlog (4) is below capacity again
    await queue.fetch("m", 8, wait_s=0.1)  # held by a worker, still not finished
    with pytest.raises(QueueFullError):
        await queue.enqueue(jobs("e", 1))


async def test_results_stop_at_the_deadline_and_late_results_are_dropped() -> None:
    queue = InProcessQueue(capacity=10)
    batch = jobs("a", 2)
    await queue.enqueue(batch)
    (taken,) = await queue.fetch("m", 1, wait_s=0.1)
    await queue.complete(taken, ItemResult(index=taken.index, score=1.0))
    started = time.monotonic()
    got = [job_id async for job_id, _ in queue.results([j.id for j in batch], time.time() + 0.2)]
    assert got == [taken.id]
    assert time.monotonic() - started < 2
    (late,) = await queue.fetch("m", 1, wait_s=0.1)
    await queue.complete(late, ItemResult(index=late.index, score=2.0))  # nobody waits: no error


async def test_depth_and_job_events_follow_the_jobs() -> None:
    metrics = Metrics("serve")
    queue = InProcessQueue(capacity=100, events=metrics)
    await queue.enqueue(jobs("a", 5))
    assert await queue.depth("m") == Depth(pending=0, lag=5)
    held = await queue.fetch("m", 3, wait_s=0.1)
    assert await queue.depth("m") == Depth(pending=3, lag=2)
    await queue.complete(held[0], ItemResult(index=held[0].index, score=1.0))
    await queue.release(held[1:])  # a stopping worker gives two back
    assert await queue.depth("m") == Depth(pending=0, lag=4)
    again = await queue.fetch("m", 10, wait_s=0.1)
    assert len(again) == 4

    def counted(name: str) -> float:
        sample = metrics.registry.get_sample_value(f"rmserve_jobs_{name}_total", {"model": "m"})
        return sample or 0

    assert (counted("acked"), counted("redelivered"), counted("dead_lettered")) == (1, 2, 0)
