"""What a job queue must do. The in-process queue (embedded mode) and the Redis Streams queue
(distributed mode) both implement it, so gateway and worker code do not know which one runs."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult


class QueueFullError(Exception):
    """The model's queue is at capacity; the client should retry after `retry_after_s`."""

    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(f"the queue for model {model!r} is full")
        self.model = model
        self.retry_after_s = retry_after_s


class QueueUnavailableError(Exception):
    """The queue backend cannot be reached."""


@dataclass(frozen=True)
class Depth:
    """A model's queue: `pending` jobs are held by a worker and not yet acknowledged, `lag`
    jobs wait for a worker."""

    pending: int
    lag: int


class QueueEvents(Protocol):
    """What happened to jobs in a queue, for the metrics."""

    def acked(self, model: str) -> None:
        """A job's result was stored and the job acknowledged."""

    def redelivered(self, model: str) -> None:
        """A job went to a worker again (its worker stopped or failed before finishing)."""

    def dead_lettered(self, model: str) -> None:
        """A job was given up after too many deliveries."""

    def routed(self, model: str, route: str, jobs: int) -> None:
        """`jobs` jobs were admitted by `route`: affinity (to the worker their prefix key
        prefers), fallback (to another, that one being loaded) or shared (to any worker)."""

    def expired(self, job: Job, result: ItemResult) -> None:
        """A job was answered `timeout` by the scheduler instead of going to a worker: its
        deadline was nearer than its scoring would take."""


class NoEvents:
    def acked(self, model: str) -> None:
        pass

    def redelivered(self, model: str) -> None:
        pass

    def dead_lettered(self, model: str) -> None:
        pass

    def routed(self, model: str, route: str, jobs: int) -> None:
        pass

    def expired(self, job: Job, result: ItemResult) -> None:
        pass


class JobQueue(Protocol):
    # Gateway side.
    async def enqueue(self, jobs: Sequence[Job]) -> None:
        """Accept all jobs (of one model) or none: raise QueueFullError when the model's
        backlog (jobs not finished: waiting, or held by a worker) is at its capacity. A request
        is admitted while the backlog is below capacity, whatever its size: so one larger than
        the capacity gets in on an idle queue instead of a 429 forever, and a large request is
        not starved by small ones that fit the room left. The backlog stays below the capacity
        plus one request (max_items_per_request, or max_items_per_batch for an async batch)."""
        ...

    def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        """Yield (job id, result) as each job finishes, until all are done or `deadline`
        (time.time()) passes. Results of jobs still unfinished then are not yielded."""
        ...

    @property
    def reply_channel(self) -> str | None:
        """Where workers announce results for this gateway (None: in the process)."""
        ...

    def watch(self, model: str, job_ids: Sequence[str]) -> None:
        """Wait for jobs (of `model`) another gateway (or request) enqueues, as if this one
        had: results() then yields them. Jobs with `cohort_channels` are enqueued without this
        (their waiters watch them)."""
        ...

    async def post(
        self, model: str, job_id: str, result: ItemResult, channels: Sequence[str]
    ) -> None:
        """Answer a job (of `model`) that will not be enqueued (a group given up) with
        `result`: stored and announced as a worker's result would be."""
        ...

    # Worker side.
    async def fetch(self, model: str, max_jobs: int, wait_s: float) -> list[Job]:
        """Up to `max_jobs` jobs for `model`, waiting at most `wait_s` for the first one."""
        ...

    async def complete(self, job: Job, result: ItemResult) -> None:
        """Store the result of a job and release it to the waiting gateway."""
        ...

    async def release(self, jobs: Sequence[Job]) -> None:
        """Give jobs back unscored (a worker stopping or failing), so that another takes them."""
        ...

    async def depth(self, model: str) -> Depth:
        """The model's queue now (raises QueueUnavailableError)."""
        ...

    async def ping(self) -> None:
        """Raise QueueUnavailableError when the backend cannot be reached."""
        ...

    async def close(self) -> None: ...
