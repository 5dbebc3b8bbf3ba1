"""The in-process queue of embedded mode: a fair scheduler per model (service.scheduling: tenant
shares, priority classes, deadlines), results routed by job id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from rmserve.service.jobs import Job, error_result
from rmserve.service.protocol import ItemResult, Timing
from rmserve.service.queue.base import Depth, NoEvents, QueueEvents, QueueFullError
from rmserve.service.queue.inbox import Inboxes
from rmserve.service.scheduling import FairScheduler

if TYPE_CHECKING:  # service.usage imports the queue package
    from rmserve.service.usage import UsageLedger


class InProcessQueue:
    def __init__(
        self,
        capacity: int,
        events: QueueEvents | None = None,
        usage: UsageLedger | None = None,
        fifo: bool = False,
    ) -> None:
        self._capacity = capacity
        self._fifo = fifo
        self._events = events or NoEvents()
        self._usage = usage  # counts the jobs answered `timeout` here, as a worker would
        self._pending: dict[str, FairScheduler] = {}
        self._arrived: dict[str, asyncio.Event] = {}  # set while the model has jobs waiting
        self._held: dict[str, set[str]] = {}  # model -> ids of jobs a worker holds
        self._released: set[str] = set()  # given back: their next fetch is a redelivery
        self._inboxes = Inboxes()

    def _queue(self, model: str) -> FairScheduler:
        return self._pending.setdefault(model, FairScheduler(fifo=self._fifo))

    def _add(self, model: str, jobs: Sequence[Job]) -> None:
        self._queue(model).add(jobs)
        self._arrived.setdefault(model, asyncio.Event()).set()

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        model = jobs[0].model
        # The backlog is what is not finished: waiting, and held by a worker (as in Redis).
        # A request is admitted whole while the backlog is below capacity (service.queue.base).
        if len(self._queue(model)) + len(self._held.get(model, ())) >= self._capacity:
            raise QueueFullError(jobs[0].model, retry_after_s=1)
        self._inboxes.open([job.id for job in jobs if job.cohort_channels is None])
        self._add(model, jobs)

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

    async def fetch(
        self, model: str, max_jobs: int, wait_s: float, margin_s: float = 0.0
    ) -> list[Job]:
        queue = self._queue(model)
        arrived = self._arrived.setdefault(model, asyncio.Event())
        deadline = time.monotonic() + wait_s
        while True:
            jobs, expired = queue.take(max_jobs, margin_s=margin_s)
            for job in expired:
                result = expired_result(job, margin_s)
                self._events.expired(job, result)
                if self._usage is not None:
                    self._usage.record(job, result)
                await self.complete(job, result)
            if jobs:
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                return []
        if len(queue):
            arrived.set()  # for the next worker
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
        if jobs:
            self._add(jobs[0].model, jobs)

    async def depth(self, model: str) -> Depth:
        return Depth(pending=len(self._held.get(model, ())), lag=len(self._queue(model)))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._pending.clear()
        self._held.clear()
        self._released.clear()
        self._inboxes.clear()


def expired_result(job: Job, margin_s: float) -> ItemResult:
    """The answer of a job the scheduler did not hand out: its deadline was too near."""
    waited = time.time() - job.enqueued_at
    why = "passed" if margin_s <= 0 else f"was less than the {margin_s:.2f} s scoring takes away"
    result = error_result(
        job, "timeout", f"not scored: the deadline {why} after {waited:.2f} s waiting"
    )
    result.timing = Timing(queue_s=waited)
    return result
