"""Async batch jobs: submit a big batch, get an id at once, poll or stream its results.

Results are kept in the process for `ttl_s` after the batch finishes (embedded mode).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service.errors import NotFound
from service.protocol import BatchStatus, ItemResult
from service.scoring import ScoringService, Submission


@dataclass
class Batch:
    id: str
    model: str
    total: int
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


class BatchStore:
    def __init__(self, scoring: ScoringService, ttl_s: float) -> None:
        self._scoring = scoring
        self._ttl_s = ttl_s
        self._batches: dict[str, Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, model: str, submission: Submission) -> Batch:
        self._expire()
        total = len(submission.jobs) + len(submission.cached)
        batch = Batch(id=f"batch-{uuid.uuid4().hex}", model=model, total=total)
        self._batches[batch.id] = batch
        task = asyncio.create_task(self._collect(batch, submission))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch

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

    def get(self, batch_id: str) -> Batch:
        self._expire()
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} (unknown, or its results expired)", param="id")
        return batch

    async def follow(self, batch: Batch) -> AsyncIterator[ItemResult]:
        """Every result of the batch: those already in, then each as it finishes."""
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
