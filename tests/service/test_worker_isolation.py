"""A job redelivered because its worker died under it is scored alone (issue 25.1): the worker
lets its other jobs finish first and takes no others until it is done, so if it is what killed
the last worker, it takes no innocent job down with it. Real redis-server and a real Worker."""

from __future__ import annotations

import asyncio
import time

from rmserve.models.base import RequestOptions, Reward
from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
from rmserve.service.worker import Worker
from rmserve.wire.trajectory import Trajectory

SETTINGS = StreamSettings(capacity=1000, reclaim_idle_s=0.3, sweep_s=0.5, routing="shared")


def job(name: str, now: float) -> Job:
    item = Trajectory.model_validate({"id": name, "messages": [{"role": "user", "content": name}]})
    return Job(id=name, model="m", index=0, item=item, enqueued_at=now, deadline=now + 60)


class Recording:
    """A reward model that takes 0.2 s per item and records which items ran at the same time."""

    name, kind, max_model_len = "m", "discriminative", 1024

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.beside: dict[str, set[str]] = {}  # item -> the items that ran while it ran

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        assert item.id is not None
        self.beside.setdefault(item.id, set()).update(self.running)
        for other in self.running:
            self.beside.setdefault(other, set()).add(item.id)
        self.running.add(item.id)
        await asyncio.sleep(0.2)
        self.running.discard(item.id)
        return Reward(score=1.0)

    def shutdown(self) -> None:
        pass


async def test_a_redelivered_job_runs_alone(redis_url: str) -> None:
    gateway = StreamQueue.from_url(redis_url, SETTINGS)
    now = time.time()
    await gateway.enqueue([job("suspect", now)])
    dead = StreamQueue.from_url(redis_url, SETTINGS, name="dead")
    assert [j.id for j in await dead.fetch("m", 1, wait_s=0.1)] == ["suspect"]
    await dead.close()  # like kill -9 while scoring it
    await asyncio.sleep(SETTINGS.reclaim_idle_s + 0.05)  # reclaimable now
    fresh = [job(f"fresh{i}", now) for i in range(8)]
    await gateway.enqueue(fresh[:4])  # the survivor's first fetch finds both
    model = Recording()
    queue = StreamQueue.from_url(redis_url, SETTINGS, name="survivor")
    worker = Worker(model, queue, Metrics("worker"), concurrency=16)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.05)
    await gateway.enqueue(fresh[4:])  # arrive while the suspect runs

    async def results(ids: list[str]) -> dict[str, ItemResult]:
        return {job_id: r async for job_id, r in gateway.results(ids, time.time() + 20)}

    ids = [["suspect"], [j.id for j in fresh[:4]], [j.id for j in fresh[4:]]]
    got = {k: v for part in await asyncio.gather(*map(results, ids)) for k, v in part.items()}
    await worker.stop(grace_s=5)
    await task
    assert sorted(got) == sorted(job_id for part in ids for job_id in part)
    assert all(r.error is None for r in got.values())
    assert model.beside["suspect"] == set()  # nothing ran beside it
    assert any(model.beside[j.id] for j in fresh[:4])  # the fresh ones ran together
    for q in (gateway, queue):
        await q.close()
