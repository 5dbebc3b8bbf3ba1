"""A worker: takes jobs of one model from the queue, scores them, stores the results.

It keeps up to `concurrency` jobs in flight and hands each to the model at once; the vLLM engine
batches whatever is in flight (continuous batching), so the worker never forms batches itself.
A job is never lost by the worker: it ends with a result, or it is handed back unscored (the
engine died under it, or the drain grace ran out) for the runtime to release or answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from rmserve.models.base import Evidence, RequestOptions, RewardModel, Sample
from rmserve.models.generative.parsing import candidate_label
from rmserve.models.spec import EngineOptions, ModelSpec
from rmserve.service.cache import ResultCache
from rmserve.service.jobs import Job, error_result
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import EvidenceResult, ItemResult, SampleResult, Timing, Usage
from rmserve.service.queue.base import JobQueue, QueueUnavailableError
from rmserve.service.usage import UsageLedger
from rmserve.wire.errors import ItemError

log = logging.getLogger(__name__)

STORE_ATTEMPTS = 5
# Jobs in flight for a model without an engine (verifiers, remote judges, composites).
DEFAULT_CONCURRENCY = 512


def worker_concurrency(spec: ModelSpec, setting: int | None) -> int:
    """Jobs a worker of `spec` holds: the setting, else twice what its engine runs at once
    (vLLM's max_num_seqs). The second half waits in the engine's own queue, so the engine never
    idles while the worker refills it; more would only sit in one replica while another could
    take them."""
    if setting is not None:
        return setting
    engine = getattr(spec, "engine", None)
    return 2 * engine.max_num_seqs if isinstance(engine, EngineOptions) else DEFAULT_CONCURRENCY


class EngineFailure(Exception):
    """The model's engine died under a job; the job was not scored."""


class Worker:
    def __init__(
        self,
        model: RewardModel,
        queue: JobQueue,
        metrics: Metrics,
        concurrency: int,
        cache: ResultCache | None = None,
        usage: UsageLedger | None = None,
    ) -> None:
        self.model = model
        self._usage = usage
        self._queue = queue
        self._cache = cache
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        # Jobs held beyond the free slots: the queue hands out a GRPO group whole, even when
        # fewer slots were free. They free no slot when done, so the worker stays at its cap.
        self._over = 0
        self._in_flight: dict[asyncio.Task[None], Job] = {}
        self._stopping = asyncio.Event()
        self.failure: str | None = None
        # Jobs not scored because the engine died under them.
        self.abandoned: list[Job] = []
        self._queue_down = False
        # Seconds the last items scored took: an item whose deadline is nearer than the fastest
        # of them cannot finish in time, and is answered `timeout` without computing it.
        self._recent: deque[float] = deque(maxlen=32)

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
            try:
                jobs = await self._queue.fetch(self.model.name, reserved, wait_s=0.5)
            except QueueUnavailableError as exc:
                jobs = []
                self._queue_lost(exc)
                await asyncio.sleep(1.0)
            else:
                self._queue_back()
            self._over += max(0, len(jobs) - reserved)
            for _ in range(reserved - len(jobs)):
                self._slots.release()
            if self._stopping.is_set():  # stop() came during the fetch: hand these back
                if jobs:
                    log.info("stopping: handed back %d jobs taken meanwhile", len(jobs))
                await self._queue.release(jobs)
                for _ in jobs:
                    self._free_slot()
                return
            for job in jobs:
                if job.deliveries > 1:
                    await self._run_alone(job)
                else:
                    self._start(job)

    def _start(self, job: Job) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_job(job))
        self._in_flight[task] = job
        task.add_done_callback(self._forget)
        return task

    async def _run_alone(self, job: Job) -> None:
        """Score a job whose last worker died holding it with nothing else in flight: the
        jobs running finish first, and none is taken until it is done. If it is what killed
        that worker, it takes no other job down with it (the queue hands such jobs out one at a
        time, and dead-letters one that keeps killing workers)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        if self._stopping.is_set():
            await self._queue.release([job])
            self._free_slot()
            return
        await asyncio.wait({self._start(job)})

    def _queue_lost(self, exc: Exception) -> None:
        if not self._queue_down:
            log.warning("the job queue is unreachable (%s); retrying", exc)
        self._queue_down = True

    def _queue_back(self) -> None:
        if self._queue_down:
            log.info("the job queue is back")
        self._queue_down = False

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)

    @property
    def busy(self) -> int:
        return len(self._in_flight)

    async def stop(self, grace_s: float) -> list[Job]:
        """Stop taking jobs; give in-flight jobs `grace_s` seconds to finish. Return the jobs
        that did not (cancelled, unscored) for the caller to release."""
        self._stopping.set()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)
        unfinished = dict(self._in_flight)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        return list(unfinished.values())

    async def _run_job(self, job: Job) -> None:
        try:
            result = await self._score(job)
        except EngineFailure:
            self.abandoned.append(job)
        else:  # cached first: a client retrying the moment it has the result finds it
            if self._cache is not None and job.cache_key is not None and result.error is None:
                await self._cache.put_many({job.cache_key: result})
            self._metrics.tenant_result(job, result)
            if self._usage is not None:
                self._usage.record(job, result)
            await self._store(job, result)
        finally:
            self._free_slot()

    def _free_slot(self) -> None:
        """A job is done: its slot is free, unless it was held beyond the slots."""
        if self._over:
            self._over -= 1
        else:
            self._slots.release()

    async def _store(self, job: Job, result: ItemResult) -> None:
        """Hand the result to the queue; ride out a short outage. A result that cannot be
        stored is dropped: the queue redelivers the job (it was never acknowledged)."""
        for attempt in range(STORE_ATTEMPTS):
            try:
                await self._queue.complete(job, result)
                return
            except QueueUnavailableError as exc:
                if attempt == STORE_ATTEMPTS - 1:
                    log.warning("result of job %s not stored (%s); it will be redone", job.id, exc)
                    return
                await asyncio.sleep(1.0)

    async def _score(self, job: Job) -> ItemResult:
        model, started = self.model, time.time()
        waited = max(0.0, started - job.enqueued_at)
        self._metrics.queue_wait.labels(model.name).observe(waited)

        def failed(code: str, message: str) -> ItemResult:
            result = error_result(job, code, message)
            result.timing = Timing(queue_s=waited, compute_s=time.time() - started)
            return result

        fastest = min(self._recent, default=0.0)
        if started + fastest > job.deadline:
            self._metrics.jobs.labels(model.name, "expired").inc()
            if started > job.deadline:
                why = f"deadline passed before scoring began ({waited:.2f} s waiting)"
            else:
                why = (
                    f"not scored: {job.deadline - started:.2f} s of its deadline were left "
                    f"after {waited:.2f} s waiting, and the fastest recent item of "
                    f"{model.name} took {fastest:.2f} s"
                )
            return failed("timeout", why)
        try:
            reward = await model.score(job.item, request_options(job))
        except ItemError as exc:
            self._metrics.jobs.labels(model.name, "item_error").inc()
            return failed(exc.code, exc.message)
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError":
                self.failure = f"the vLLM engine died: {exc}"
                self._stopping.set()
                raise EngineFailure(self.failure) from exc
            self._metrics.jobs.labels(model.name, "failed").inc()
            log.exception("scoring job %s on %s failed", job.id, model.name)
            return failed("internal_error", f"scoring failed: {type(exc).__name__}: {exc}")
        finished = time.time()
        self._recent.append(finished - started)
        self._metrics.jobs.labels(model.name, "ok").inc()
        self._metrics.job_duration.labels(model.name, model.kind).observe(finished - started)
        return ItemResult(
            id=job.item.id,
            index=job.index,
            score=reward.score,
            scores=reward.scores,
            step_scores=reward.step_scores,
            verdict=reward.verdict,
            critique=reward.critique,
            samples=[sample_result(s) for s in reward.samples] if reward.samples else None,
            evidence=[evidence_result(e) for e in reward.evidence] if reward.evidence else None,
            components=reward.components,
            usage=Usage(
                prompt_tokens=reward.prompt_tokens,
                truncated_tokens=reward.truncated_tokens,
                completion_tokens=reward.completion_tokens,
            ),
            timing=Timing(queue_s=started - job.enqueued_at, compute_s=finished - started),
        )


def request_options(job: Job) -> RequestOptions:
    judge = job.judge
    if judge is None:
        return RequestOptions(aggregate=job.aggregate, deadline=job.deadline, render=job.render)
    return RequestOptions(
        aggregate=job.aggregate,
        deadline=job.deadline,
        render=job.render,
        meta_filter=judge.meta_filter is not False,
        tools=tuple(judge.tools) if judge.tools is not None else None,
        max_tool_turns=judge.max_tool_turns,
        samples=judge.samples,
        temperature=judge.temperature,
        top_p=judge.top_p,
        max_tokens=judge.max_tokens,
        seed=judge.seed,
        return_samples=judge.return_samples,
    )


def evidence_result(evidence: Evidence) -> EvidenceResult:
    result = evidence.result
    return EvidenceResult(
        sample=evidence.sample,
        turn=evidence.turn,
        tool=result.tool,
        arguments=evidence.arguments,
        output=result.output,
        error=result.error,
        elapsed_s=result.elapsed_s,
    )


def sample_result(sample: Sample) -> SampleResult:
    return SampleResult(
        text=sample.text,
        completion_tokens=sample.completion_tokens,
        score=sample.score,
        scores=sample.scores,
        verdict=candidate_label(sample.choice) if sample.choice is not None else None,
        order=[candidate_label(i) for i in sample.order] if sample.order is not None else None,
        error=sample.error,
        meta_score=sample.meta_score,
        kept=sample.kept,
    )
