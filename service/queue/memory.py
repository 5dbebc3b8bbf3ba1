"""The in-process queue of embedded mode: asyncio queues per model, results routed by job id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence

from service.jobs import Job
from service.protocol import ItemResult
from service.queue.base import QueueFullError


class InProcessQueue:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._pending: dict[str, asyncio.Queue[Job]] = {}
        # job id -> inbox of the request waiting for it (one inbox per request, O(1) routing).
        self._inboxes: dict[str, asyncio.Queue[tuple[str, ItemResult]]] = {}

    def _queue(self, model: str) -> asyncio.Queue[Job]:
        return self._pending.setdefault(model, asyncio.Queue())

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        queue = self._queue(jobs[0].model)
        if queue.qsize() + len(jobs) > self._capacity:
            raise QueueFullError(jobs[0].model, retry_after_s=1)
        inbox: asyncio.Queue[tuple[str, ItemResult]] = asyncio.Queue()
        for job in jobs:
            self._inboxes[job.id] = inbox
            queue.put_nowait(job)

    async def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        inboxes = {self._inboxes[job_id] for job_id in job_ids if job_id in self._inboxes}
        if len(inboxes) != 1:
            raise ValueError("results() takes the job ids of one enqueue() call")
        inbox = inboxes.pop()
        waiting = set(job_ids)
        try:
            while waiting:
                remaining = deadline - time.time()
                if remaining <= 0:
                    return
                try:
                    job_id, result = await asyncio.wait_for(inbox.get(), remaining)
                except TimeoutError:
                    return
                if job_id in waiting:
                    waiting.discard(job_id)
                    yield job_id, result
        finally:
            for job_id in job_ids:
                self._inboxes.pop(job_id, None)

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
        inbox = self._inboxes.get(job.id)
        if inbox is not None:  # None: the client gave up; nobody waits for this result
            inbox.put_nowait((job.id, result))

    def pending(self, model: str) -> int:
        return self._queue(model).qsize()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._pending.clear()
        self._inboxes.clear()
