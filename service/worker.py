"""A worker: takes jobs of one model from the queue, scores them, stores the results.

It keeps up to `concurrency` jobs in flight and hands each to the model at once; the vLLM engine
batches whatever is in flight (continuous batching), so the worker never forms batches itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

from models.base import RequestOptions, RewardModel
from models.errors import ItemError
from service.jobs import Job, error_result
from service.metrics import Metrics
from service.protocol import ItemResult, Timing, Usage
from service.queue.base import JobQueue

log = logging.getLogger(__name__)


class EngineFailure(Exception):
    """The model's engine died; the model must be taken out of service."""


class Worker:
    def __init__(
        self, model: RewardModel, queue: JobQueue, metrics: Metrics, concurrency: int
    ) -> None:
        self.model = model
        self._queue = queue
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.failure: str | None = None

    async def run(self) -> None:
        """Take jobs until stop() is called or the engine fails."""
        while not self._stopping.is_set():
            await self._slots.acquire()
            reserved = 1
            while reserved < self._concurrency and not self._slots.locked():
                await self._slots.acquire()
                reserved += 1
            if self._stopping.is_set():  # stop() came while waiting for a free slot
                for _ in range(reserved):
                    self._slots.release()
                return
            jobs = await self._queue.fetch(self.model.name, reserved, wait_s=0.5)
            for _ in range(reserved - len(jobs)):
                self._slots.release()
            for job in jobs:
                task = asyncio.create_task(self._run_job(job))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def stop(self, grace_s: float) -> None:
        """Stop taking jobs; give in-flight jobs `grace_s` seconds to finish."""
        self._stopping.set()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)

    async def _run_job(self, job: Job) -> None:
        try:
            result = await self._score(job)
            await self._queue.complete(job, result)
        finally:
            self._slots.release()

    async def _score(self, job: Job) -> ItemResult:
        model, started = self.model, time.time()
        self._metrics.queue_wait.labels(model.name).observe(max(0.0, started - job.enqueued_at))
        if started > job.deadline:
            self._metrics.jobs.labels(model.name, "expired").inc()
            return error_result(job, "timeout", "deadline passed before scoring began")
        try:
            reward = await model.score(job.item, RequestOptions(aggregate=job.aggregate))
        except ItemError as exc:
            self._metrics.jobs.labels(model.name, "item_error").inc()
            return error_result(job, exc.code, exc.message)
        except Exception as exc:
            self._metrics.jobs.labels(model.name, "failed").inc()
            log.exception("scoring job %s on %s failed", job.id, model.name)
            if type(exc).__name__ == "EngineDeadError":
                self.failure = f"the vLLM engine died: {exc}"
                self._stopping.set()
            message = f"scoring failed: {type(exc).__name__}: {exc}"
            return error_result(job, "internal_error", message)
        finished = time.time()
        self._metrics.jobs.labels(model.name, "ok").inc()
        self._metrics.job_duration.labels(model.name, model.kind).observe(finished - started)
        self._metrics.prompt_tokens.labels(model.name).inc(reward.prompt_tokens)
        return ItemResult(
            id=job.item.id,
            index=job.index,
            score=reward.score,
            scores=reward.scores,
            step_scores=reward.step_scores,
            usage=Usage(
                prompt_tokens=reward.prompt_tokens, truncated_tokens=reward.truncated_tokens
            ),
            timing=Timing(queue_s=started - job.enqueued_at, compute_s=finished - started),
        )
