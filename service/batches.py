"""Async batch jobs: submit a big batch, get an id at once, poll or stream its results.

Two stores behind one interface. Embedded mode keeps batches in the process. Distributed mode
keeps each batch in a Redis stream (`rmserve:{<model>}:batch:<id>`, found through the key
`rmserve:batch:<id>:model`: a header entry, then one entry per result, appended by the worker
that scored it), so any gateway answers for any batch and a
batch survives the gateway that accepted it. Results are kept for `ttl_s` after the batch is
done (Redis: after its deadline, when it is done at the latest). A batch belongs to the API key
that started it (`owner`, its name): to any other it does not exist (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from rmserve.service.protocol import BatchStatus, ItemErrorBody, ItemResult, ScoreRequest
from rmserve.service.queue.base import QueueUnavailableError
from rmserve.service.queue.redis_streams import as_text, available, batch_key, batch_model_key
from rmserve.service.redis_cluster import RedisClient
from rmserve.service.scoring import ScoringService, Submission
from rmserve.web.errors import NotFound, Unavailable


class BatchStore(Protocol):
    async def start(self, request: ScoreRequest, owner: str | None = None) -> BatchStatus:
        """Check and enqueue the batch (ApiError before any work), return its id."""
        ...

    async def status(self, batch_id: str, owner: str | None = None) -> BatchStatus:
        """Progress and the results so far, in item order; NotFound when unknown/expired (or
        another owner's)."""
        ...

    async def follow(self, batch_id: str, owner: str | None = None) -> AsyncIterator[ItemResult]:
        """NotFound at once when unknown; else every result: those in, then each as it ends."""
        ...


async def wait_done(store: BatchStore, batch_id: str, owner: str | None) -> None:
    """Return once the batch is done (its items hold their key's quota until then); the store
    being unreachable for a while does not end the wait."""
    while True:
        try:
            async for _ in await store.follow(batch_id, owner):
                pass
            return
        except Unavailable:
            await asyncio.sleep(1.0)


def new_batch_id() -> str:
    return f"batch-{uuid.uuid4().hex}"


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"no batch {batch_id!r} (unknown, or its results expired)", param="id")


# -- embedded mode -------------------------------------------------------------------------------


@dataclass
class Batch:
    id: str
    model: str
    total: int
    owner: str | None = None
    results: list[ItemResult] = field(default_factory=list)
    finished_at: float | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def status(self, with_results: bool) -> BatchStatus:
        return BatchStatus(
            id=self.id,
            model=self.model,
            status="done" if self.finished_at is not None else "running",
            total=self.total,
            finished=len(self.results),
            results=sorted(self.results, key=lambda r: r.index) if with_results else None,
        )


class MemoryBatchStore:
    def __init__(self, scoring: ScoringService, limit: int, ttl_s: float) -> None:
        self._scoring, self._limit, self._ttl_s = scoring, limit, ttl_s
        self._batches: dict[str, Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: ScoreRequest, owner: str | None = None) -> BatchStatus:
        self._expire()
        batch_id = new_batch_id()
        jobs = self._scoring.prepare(request, self._limit, batch=batch_id)
        submission = await self._scoring.enqueue(jobs)
        batch = Batch(id=batch_id, model=request.model, total=len(jobs), owner=owner)
        self._batches[batch.id] = batch
        task = asyncio.create_task(self._collect(batch, submission))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch.status(with_results=False)

    async def _collect(self, batch: Batch, submission: Submission) -> None:
        try:
            async for result in self._scoring.stream(submission):
                async with batch.changed:
                    batch.results.append(result)
                    batch.changed.notify_all()
        finally:
            async with batch.changed:
                batch.finished_at = time.monotonic()
                batch.changed.notify_all()

    def _get(self, batch_id: str, owner: str | None) -> Batch:
        self._expire()
        batch = self._batches.get(batch_id)
        if batch is None or batch.owner != owner:
            raise _not_found(batch_id)
        return batch

    async def status(self, batch_id: str, owner: str | None = None) -> BatchStatus:
        return self._get(batch_id, owner).status(with_results=True)

    async def follow(self, batch_id: str, owner: str | None = None) -> AsyncIterator[ItemResult]:
        return self._follow(self._get(batch_id, owner))

    async def _follow(self, batch: Batch) -> AsyncIterator[ItemResult]:
        sent = 0

        def more_or_done() -> bool:
            return len(batch.results) > sent or batch.finished_at is not None

        while True:
            async with batch.changed:
                await batch.changed.wait_for(more_or_done)
                new, done = batch.results[sent:], batch.finished_at is not None
            for result in new:
                yield result
            sent += len(new)
            if done and sent == len(batch.results):
                return

    def _expire(self) -> None:
        now = time.monotonic()
        for batch_id in [
            b.id for b in self._batches.values()
            if b.finished_at is not None and now - b.finished_at > self._ttl_s
        ]:  # fmt: skip
            del self._batches[batch_id]


# -- distributed mode ----------------------------------------------------------------------------


@dataclass
class _Record:
    """What a batch stream holds: its header and the results read so far (first per index)."""

    id: str
    model: str
    ids: list[str | None]
    deadline: float
    results: dict[int, ItemResult] = field(default_factory=dict)
    last_entry: str = "0-0"

    @classmethod
    def parse(cls, batch_id: str, entries: list[Any], owner: str | None) -> _Record:
        if not entries or b"header" not in entries[0][1]:
            raise _not_found(batch_id)
        header = json.loads(entries[0][1][b"header"])
        if header.get("owner") != owner:
            raise _not_found(batch_id)
        record = cls(batch_id, header["model"], header["ids"], header["deadline"])
        record.last_entry = as_text(entries[0][0])
        record.add(entries[1:])
        return record

    def add(self, entries: list[Any]) -> list[ItemResult]:
        new = []
        for entry_id, fields in entries:
            self.last_entry = as_text(entry_id)
            result = ItemResult.model_validate_json(fields[b"result"])
            if result.index not in self.results:  # a duplicate could only come from a retry
                self.results[result.index] = result
                new.append(result)
        return new

    @property
    def total(self) -> int:
        return len(self.ids)

    def done(self) -> bool:
        return len(self.results) == self.total or time.time() > self.deadline

    def timed_out(self) -> list[ItemResult]:
        """Items with no result once the deadline passed."""
        if time.time() <= self.deadline:
            return []
        return [
            ItemResult(
                id=item_id,
                index=index,
                error=ItemErrorBody(type="timeout", message="the item was not scored in time"),
            )
            for index, item_id in enumerate(self.ids)
            if index not in self.results
        ]

    def status(self) -> BatchStatus:
        results = sorted([*self.results.values(), *self.timed_out()], key=lambda r: r.index)
        return BatchStatus(
            id=self.id,
            model=self.model,
            status="done" if self.done() else "running",
            total=self.total,
            finished=len(results),
            results=results,
        )


class RedisBatchStore:
    # The longest a follower blocks on the batch stream before checking the deadline again.
    BLOCK_S = 1.0  # below the Redis socket timeout (RMSERVE_REDIS_TIMEOUT_S >= 2)

    def __init__(
        self, client: RedisClient, scoring: ScoringService, limit: int, ttl_s: float
    ) -> None:
        self._redis, self._scoring, self._limit, self._ttl_s = client, scoring, limit, ttl_s

    async def start(self, request: ScoreRequest, owner: str | None = None) -> BatchStatus:
        batch_id = new_batch_id()
        jobs = self._scoring.prepare(request, self._limit, batch=batch_id)
        key, deadline = batch_key(request.model, batch_id), jobs[0].deadline
        header = {
            "model": request.model,
            "deadline": deadline,
            "ids": [j.item.id for j in jobs],
            "owner": owner,
        }
        ttl_s = math.ceil(deadline - time.time() + self._ttl_s)
        pipe = self._redis.pipeline(transaction=True)  # the model's slot
        pipe.xadd(key, {"header": json.dumps(header)})
        pipe.expire(key, ttl_s)
        await self._call(pipe.execute())  # the stream exists before any worker appends to it
        # Where to find it by id alone (another slot: its own command).
        await self._call(self._redis.set(batch_model_key(batch_id), request.model, ex=ttl_s))
        try:
            submission = await self._scoring.enqueue(jobs)
        except BaseException:
            # Redis may be what failed: then the key expires with its TTL.
            with contextlib.suppress(QueueUnavailableError):
                await available(self._redis.delete(key))
            raise
        if submission.cached:
            pipe = self._redis.pipeline(transaction=False)
            for result in submission.cached:
                pipe.xadd(key, {"result": result.model_dump_json()}, nomkstream=True)
            await self._call(pipe.execute())
        return BatchStatus(
            id=batch_id,
            model=request.model,
            status="running",
            total=len(jobs),
            finished=len(submission.cached),
        )

    async def status(self, batch_id: str, owner: str | None = None) -> BatchStatus:
        return (await self._read(batch_id, owner)).status()

    async def follow(self, batch_id: str, owner: str | None = None) -> AsyncIterator[ItemResult]:
        return self._follow(await self._read(batch_id, owner))

    async def _follow(self, record: _Record) -> AsyncIterator[ItemResult]:
        for result in list(record.results.values()):
            yield result
        key = batch_key(record.model, record.id)
        while not record.done():
            block_s = min(self.BLOCK_S, max(0.001, record.deadline - time.time()))
            reply: Any = await self._call(
                self._redis.xread({key: record.last_entry}, count=1000, block=int(block_s * 1000))
            )
            for _key, entries in reply or []:
                for result in record.add(entries):
                    yield result
        for result in record.timed_out():
            yield result

    async def _read(self, batch_id: str, owner: str | None) -> _Record:
        model: Any = await self._call(self._redis.get(batch_model_key(batch_id)))
        if model is None:
            raise _not_found(batch_id)
        entries: Any = await self._call(self._redis.xrange(batch_key(as_text(model), batch_id)))
        return _Record.parse(batch_id, entries, owner)

    @staticmethod
    async def _call(call: Any) -> Any:
        try:
            return await available(call)
        except QueueUnavailableError as exc:
            raise Unavailable(f"the batch store is unreachable: {exc}") from None
