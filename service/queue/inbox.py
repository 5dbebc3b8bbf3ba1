"""Routing results to the request waiting for them: one inbox per request, found by job id.

Both queues use it: the worker side delivers (directly in embedded mode, via the gateway's
result channel with Redis); the request side waits until all its jobs are in or the deadline
passes. `check` lets a queue look for results it may have missed while idle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from rmserve.service.protocol import ItemResult

Delivery = tuple[str, ItemResult]
Check = Callable[[list[str]], Awaitable[list[Delivery]]]


class Inboxes:
    def __init__(self) -> None:
        self._by_job: dict[str, asyncio.Queue[Delivery]] = {}

    def open(self, job_ids: Sequence[str]) -> None:
        """Register the jobs of one request (before they are enqueued: no result is missed)."""
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        for job_id in job_ids:
            self._by_job[job_id] = inbox

    def discard(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self._by_job.pop(job_id, None)

    def deliver(self, job_id: str, result: ItemResult) -> None:
        inbox = self._by_job.get(job_id)
        if inbox is not None:  # None: the client gave up; nobody waits for this result
            inbox.put_nowait((job_id, result))

    async def wait(
        self,
        job_ids: Sequence[str],
        deadline: float,
        check: Check | None = None,
        check_every_s: float = 1.0,
    ) -> AsyncGenerator[Delivery, None]:
        inboxes = {self._by_job[job_id] for job_id in job_ids if job_id in self._by_job}
        if len(inboxes) != 1:
            raise ValueError("wait() takes the job ids of one open() call")
        inbox, waiting = inboxes.pop(), set(job_ids)
        idle_s = check_every_s if check is not None else float("inf")
        try:
            while waiting and (remaining := deadline - time.time()) > 0:
                try:
                    delivered = [await asyncio.wait_for(inbox.get(), min(remaining, idle_s))]
                except TimeoutError:
                    delivered = await check(sorted(waiting)) if check is not None else []
                for job_id, result in delivered:
                    if job_id in waiting:
                        waiting.discard(job_id)
                        yield job_id, result
        finally:
            self.discard(job_ids)

    def clear(self) -> None:
        self._by_job.clear()
