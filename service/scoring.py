"""The gateway's scoring logic: check the model, split a request into jobs, gather results."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rmserve.models.spec import GenerativeSpec, ModelSpec
from rmserve.service.cache import ResultCache, cache_key
from rmserve.service.cohorts import Cohorts, Waiting, cohort_store_for
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.groups import Piece, Unit, fold, prefix_key, unfold
from rmserve.service.jobs import GroupMember, Job, error_result
from rmserve.service.limits import ItemLimits, check_items, inline_images
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult, ScoreRequest, ScoreResponse
from rmserve.service.queue.base import JobQueue, QueueFullError, QueueUnavailableError
from rmserve.service.tenants import current_tenancy
from rmserve.web.errors import (
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    UnprocessableEntity,
)
from rmserve.wire.trajectory import Trajectory


@dataclass(frozen=True)
class Submission:
    """A checked request: the jobs enqueued, and the results found in the cache."""

    jobs: list[Job]
    cached: list[ItemResult]
    # Groups this request carries part of (listwise judges): assembled with other requests'.
    groups: list[Waiting] = field(default_factory=list)


class ScoringService:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        directory: ModelDirectory,
        metrics: Metrics,
        cache: ResultCache | None = None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._directory = directory
        self._metrics = metrics
        self._cache = cache
        self._cohorts = Cohorts(
            cohort_store_for(queue),
            queue,
            metrics,
            settings.partial_groups,
            keep_s=settings.batch_result_ttl_s,
        )
        self._item_limits = ItemLimits(
            max_messages=settings.max_messages_per_item,
            max_chars=settings.max_chars_per_item,
            max_images=settings.max_images_per_item,
            max_image_pixels=settings.max_image_pixels,
            max_image_bytes=settings.max_image_bytes,
            url_allowlist=tuple(settings.image_url_allowlist),
        )

    def check_model(self, request: ScoreRequest) -> None:
        name = request.model
        entry = self._directory.get(name)
        if entry is None:
            known = ", ".join(sorted(self._directory.names())) or "none"
            raise NotFound(f"model {name!r} does not exist (models: {known})", param="model")
        if entry.status == "loading":
            raise Unavailable(
                f"model {name!r} is still loading", param="model", headers={"Retry-After": "10"}
            )
        if entry.status == "unavailable":
            raise Unavailable(f"model {name!r} is unavailable: {entry.reason}", param="model")
        self._check_judge_options(request, entry.spec)
        if request.options.render == "raw" and entry.spec.kind != "discriminative":
            raise UnprocessableEntity(
                f"options.render 'raw' applies to discriminative models; {name!r} is "
                f"{entry.spec.kind}",
                param="options.render",
            )
        if request.options.aggregate and entry.spec.kind != "process":
            raise UnprocessableEntity(
                f"options.aggregate applies to process reward models; {name!r} is "
                f"{entry.spec.kind}",
                param="options.aggregate",
            )

    @staticmethod
    def _check_judge_options(request: ScoreRequest, spec: ModelSpec) -> None:
        judge = request.options.judge
        if judge is None:
            return
        if not isinstance(spec, GenerativeSpec):
            raise UnprocessableEntity(
                f"options.judge applies to generative judges; {spec.name!r} is {spec.kind}",
                param="options.judge",
            )
        limits = spec.options
        if judge.meta_filter and limits.meta_model is None:
            raise UnprocessableEntity(
                f"options.judge.meta_filter: judge {spec.name!r} has no meta reward model "
                "(registry options.meta_model)",
                param="options.judge.meta_filter",
            )
        if judge.tools is not None and (extra := sorted(set(judge.tools) - set(limits.tools))):
            raise UnprocessableEntity(
                f"options.judge.tools: {extra} not enabled for {spec.name!r} (its tools: "
                f"{', '.join(limits.tools) or 'none'})",
                param="options.judge.tools",
            )
        if judge.max_tool_turns is not None and judge.max_tool_turns > limits.max_tool_turns:
            raise UnprocessableEntity(
                f"options.judge.max_tool_turns {judge.max_tool_turns} exceeds the model's "
                f"max_tool_turns ({limits.max_tool_turns})",
                param="options.judge.max_tool_turns",
            )
        if judge.samples is not None and judge.samples > limits.max_samples:
            raise UnprocessableEntity(
                f"options.judge.samples {judge.samples} exceeds the model's max_samples "
                f"({limits.max_samples})",
                param="options.judge.samples",
            )
        if judge.max_tokens is not None and judge.max_tokens > limits.max_tokens_limit:
            raise UnprocessableEntity(
                f"options.judge.max_tokens {judge.max_tokens} exceeds the model's "
                f"max_tokens_limit ({limits.max_tokens_limit})",
                param="options.judge.max_tokens",
            )

    async def submit(self, request: ScoreRequest, scope: str = "") -> Submission:
        """Check the request and enqueue one job per item; raise ApiError before any work.
        Groups the request carries part of join their groups (`scope`: the caller's API key,
        so that different callers' groups never mix)."""
        jobs, pieces = self._prepare(request)
        submission = await self.enqueue(jobs) if jobs else Submission([], [])
        if pieces:
            wait_s = request.options.group_wait_s or self._settings.group_wait_s
            template = self._job(request, 0, pieces[0].members[0][1], None, None)
            try:
                for piece in pieces:
                    submission.groups.append(
                        await self._cohorts.join(piece, template, scope, wait_s)
                    )
            except QueueUnavailableError as exc:
                raise Unavailable(f"the job queue is unreachable: {exc}") from None
        return submission

    def prepare(
        self, request: ScoreRequest, limit: int | None = None, batch: str | None = None
    ) -> list[Job]:
        """Check the request (ApiError if it cannot be served) and make one job per item (an
        async batch: every group whole)."""
        jobs, pieces = self._prepare(request, limit, batch)
        if pieces:
            raise UnprocessableEntity(
                f"items.{pieces[0].members[0][0]}.group_size: groups sent in pieces are "
                "assembled on POST /v1/score; an async batch must carry each group whole",
                param=f"items.{pieces[0].members[0][0]}.group_size",
            )
        return jobs

    def _prepare(
        self, request: ScoreRequest, limit: int | None = None, batch: str | None = None
    ) -> tuple[list[Job], list[Piece]]:
        self.check_model(request)
        limit = limit or self._settings.max_items_per_request
        if len(request.items) > limit:
            raise PayloadTooLarge(
                f"{len(request.items)} items in one request; the limit is {limit}", param="items"
            )
        check_items(request.items, self._item_limits)
        request_id = batch or uuid.uuid4().hex
        spec = self._directory.spec(request.model)
        units, pieces = self._units(request, spec, batch)
        jobs = [
            self._job(request, index, item, members, batch, f"{request_id}:{index}")
            for index, item, members in units
        ]
        if self._cache is not None:  # the worker caches what it scores under this key
            for job in jobs:
                job.cache_key = cache_key(spec, job)
        return jobs, pieces

    def _job(
        self,
        request: ScoreRequest,
        index: int,
        item: Trajectory,
        members: list[GroupMember] | None,
        batch: str | None,
        job_id: str = "",
    ) -> Job:
        now = time.time()
        tenancy = current_tenancy.get()  # set by the gateway's admission (service.tenants)
        timeout = min(
            request.options.timeout_s or self._settings.default_timeout_s,
            self._settings.max_timeout_s,
        )
        return Job(
            id=job_id,
            model=request.model,
            index=index,
            item=item,
            enqueued_at=now,
            deadline=now + timeout,
            tenant=tenancy.tenant,
            weight=tenancy.weight,
            priority=tenancy.priority,
            aggregate=request.options.aggregate,
            judge=request.options.judge,
            render=request.options.render,
            batch=batch,
            prefix_key=prefix_key(item),
            members=members,
        )

    @staticmethod
    def _units(
        request: ScoreRequest, spec: ModelSpec, batch: str | None
    ) -> tuple[list[Unit], list[Piece]]:
        """What the model scores, job by job: each item, or for a listwise judge each group
        (and the groups that are here in part)."""
        if not (isinstance(spec, GenerativeSpec) and spec.options.mode == "listwise"):
            return [(index, item, None) for index, item in enumerate(request.items)], []
        units, pieces = fold(request.items)
        if batch is not None and any(members for _, _, members in units):
            raise UnprocessableEntity(
                "items.0.group: listwise judging of groups is available on POST /v1/score; in "
                "an async batch, give each group as one item with `candidates`",
                param="items.0.group",
            )
        return units, pieces

    async def enqueue(self, jobs: list[Job]) -> Submission:
        """Answer what the cache knows, enqueue the rest (all or none)."""
        model = jobs[0].model
        items = await inline_images([job.item for job in jobs], self._item_limits)
        for job, item in zip(jobs, items, strict=True):
            if item is not job.item:  # its images were fetched: key the cache on their bytes
                job.item = item
                if job.cache_key is not None:
                    job.cache_key = cache_key(self._directory.spec(model), job)
        try:
            jobs, cached = await self._from_cache(jobs)
            await self._queue.enqueue(jobs)
        except QueueFullError as exc:
            raise QueueFull(
                f"{exc}; retry later", headers={"Retry-After": str(exc.retry_after_s)}
            ) from None
        except QueueUnavailableError as exc:
            raise Unavailable(f"the job queue is unreachable: {exc}") from None
        self._metrics.jobs_enqueued.labels(model).inc(len(jobs))
        return Submission(jobs, cached)

    async def _from_cache(self, jobs: list[Job]) -> tuple[list[Job], list[ItemResult]]:
        keys = [job.cache_key for job in jobs if job.cache_key is not None]
        if self._cache is None or not keys:
            return jobs, []
        hits = await self._cache.get_many(keys)
        cached = [
            result
            for job in jobs
            if job.cache_key in hits
            for result in _results(job, hits[job.cache_key].model_copy(update={"cached": True}))
        ]
        return [job for job in jobs if job.cache_key not in hits], cached

    async def stream(self, submission: Submission) -> AsyncIterator[ItemResult]:
        """Cached results first, then the rest in the order they finish; items not done by the
        deadline end as timeouts."""
        for result in submission.cached:
            yield result
        # Groups sent in pieces are awaited alongside the request's own jobs.
        groups = [
            asyncio.ensure_future(self._cohorts.wait(waiting)) for waiting in submission.groups
        ]
        try:
            async for result in self._own(submission):
                yield result
            for group in groups:
                for result in await group:
                    yield result
        finally:
            for group in groups:
                group.cancel()

    async def _own(self, submission: Submission) -> AsyncIterator[ItemResult]:
        pending = {job.id: job for job in submission.jobs}
        if not pending:
            return
        async with contextlib.aclosing(
            self._queue.results(list(pending), submission.jobs[0].deadline)
        ) as finished:
            async for job_id, result in finished:
                if (job := pending.pop(job_id, None)) is not None:
                    for item_result in _results(job, result):
                        yield item_result
        for job in pending.values():
            for item_result in _results(job, _timed_out(job)):
                yield item_result

    async def score(self, request: ScoreRequest, scope: str = "") -> ScoreResponse:
        results = [result async for result in self.stream(await self.submit(request, scope))]
        return ScoreResponse(model=request.model, results=sorted(results, key=lambda r: r.index))


def _results(job: Job, result: ItemResult) -> list[ItemResult]:
    """The results of the request's items that a job scored: its item's, or its group's."""
    if job.members is not None:
        return unfold(result, job.members)
    return [result.model_copy(update={"id": job.item.id, "index": job.index})]


def _timed_out(job: Job) -> ItemResult:
    return error_result(job, "timeout", "the item was not scored within timeout_s")
