"""The in-process queue of embedded mode: asyncio queues per model, results routed by job id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from service.jobs import Job
from service.protocol import ItemResult
from service.queue.base import QueueFullError
from service.queue.inbox import Inboxes


class InProcessQueue:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._pending: dict[str, asyncio.Queue[Job]] = {}
        self._inboxes = Inboxes()

    def _queue(self, model: str) -> asyncio.Queue[Job]:
        return self._pending.setdefault(model, asyncio.Queue())

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        queue = self._queue(jobs[0].model)
        if queue.qsize() + len(jobs) > self._capacity:
            raise QueueFullError(jobs[0].model, retry_after_s=1)
        self._inboxes.open([job.id for job in jobs])
        for job in jobs:
            queue.put_nowait(job)

    def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        return self._inboxes.wait(job_ids, deadline)

    async def fetch(self, model: str, max_jobs: int, wait_s: float) -> list[Job]:
        queue = self._queue(model)
        try:
            first = await asyncio.wait_for(queue.get(), wait_s)
        except TimeoutError:
            return []
        jobs = [first]
        while len(jobs) < max_jobs and not queue.empty():
            jobs.append(queue.get_nowait())
        return jobs

    async def complete(self, job: Job, result: ItemResult) -> None:
        self._inboxes.deliver(job.id, result)

    async def release(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._queue(job.model).put_nowait(job)

    def pending(self, model: str) -> int:
        return self._queue(model).qsize()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._pending.clear()
        self._inboxes.clear()
