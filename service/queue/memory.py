"""The in-process queue of embedded mode: asyncio queues per model, results routed by job id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import Depth, NoEvents, QueueEvents, QueueFullError
from rmserve.service.queue.inbox import Inboxes


class InProcessQueue:
    def __init__(self, capacity: int, events: QueueEvents | None = None) -> None:
        self._capacity = capacity
        self._events = events or NoEvents()
        self._pending: dict[str, asyncio.Queue[Job]] = {}
        self._held: dict[str, set[str]] = {}  # model -> ids of jobs a worker holds
        self._released: set[str] = set()  # given back: their next fetch is a redelivery
        self._inboxes = Inboxes()

    def _queue(self, model: str) -> asyncio.Queue[Job]:
        return self._pending.setdefault(model, asyncio.Queue())

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        model = jobs[0].model
        queue = self._queue(model)
        # The backlog is what is not finished: waiting, and held by a worker (as in Redis).
        # A request is admitted whole while the backlog is below capacity (service.queue.base).
        if queue.qsize() + len(self._held.get(model, ())) >= self._capacity:
            raise QueueFullError(jobs[0].model, retry_after_s=1)
        self._inboxes.open([job.id for job in jobs if job.cohort_channels is None])
        for job in jobs:
            queue.put_nowait(job)

    def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        return self._inboxes.wait(job_ids, deadline)

    @property
    def reply_channel(self) -> str | None:
        return None

    def watch(self, model: str, job_ids: Sequence[str]) -> None:
        self._inboxes.open(job_ids)

    async def post(
        self, model: str, job_id: str, result: ItemResult, channels: Sequence[str]
    ) -> None:
        self._inboxes.deliver(job_id, result)

    async def fetch(self, model: str, max_jobs: int, wait_s: float) -> list[Job]:
        queue = self._queue(model)
        try:
            first = await asyncio.wait_for(queue.get(), wait_s)
        except TimeoutError:
            return []
        jobs = [first]
        while len(jobs) < max_jobs and not queue.empty():
            jobs.append(queue.get_nowait())
        held = self._held.setdefault(model, set())
        for job in jobs:
            held.add(job.id)
            if job.id in self._released:
                self._released.discard(job.id)
                self._events.redelivered(model)
        return jobs

    async def complete(self, job: Job, result: ItemResult) -> None:
        self._held.get(job.model, set()).discard(job.id)
        self._inboxes.deliver(job.id, result)
        self._events.acked(job.model)

    async def release(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._held.get(job.model, set()).discard(job.id)
            self._released.add(job.id)
            self._queue(job.model).put_nowait(job)

    async def depth(self, model: str) -> Depth:
        return Depth(pending=len(self._held.get(model, ())), lag=self._queue(model).qsize())

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._pending.clear()
        self._held.clear()
        self._released.clear()
        self._inboxes.clear()
