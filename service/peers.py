"""Scoring with another model of the registry from inside a worker (a judge's meta reward model),
through the same job queue the gateway uses: the other model's own workers score the items, in
the same continuous batches as client requests, in embedded and distributed mode alike."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence

from rmserve.service.directory import ModelDirectory
from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import JobQueue, QueueFullError, QueueUnavailableError
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory


class QueuePeers:
    def __init__(self, queue: JobQueue, directory: ModelDirectory) -> None:
        self._queue = queue
        self._directory = directory  # the peers' states (loading / ready / unavailable)

    async def score(self, model: str, items: Sequence[Trajectory], deadline: float) -> list[float]:
        self._check_ready(model)
        now, request = time.time(), uuid.uuid4().hex
        jobs = [
            Job(
                id=f"peer-{request}:{index}",
                model=model,
                index=index,
                item=item,
                enqueued_at=now,
                deadline=deadline,
            )
            for index, item in enumerate(items)
        ]
        try:
            await self._queue.enqueue(jobs)
        except QueueFullError as exc:
            raise ItemError("peer_busy", f"{exc}; retry later") from None
        except QueueUnavailableError as exc:
            raise ItemError("peer_unavailable", f"the job queue is unreachable: {exc}") from None
        results: dict[str, ItemResult] = {}
        async with contextlib.aclosing(
            self._queue.results([job.id for job in jobs], deadline)
        ) as finished:
            async for job_id, result in finished:
                results[job_id] = result
        return [_score(model, results.get(job.id)) for job in jobs]

    def _check_ready(self, model: str) -> None:
        entry = self._directory.get(model)
        if entry is None:
            raise ItemError("peer_unavailable", f"model {model!r} is not in the registry")
        if entry.status != "ready":
            why = f": {entry.reason}" if entry.reason else ""
            raise ItemError("peer_unavailable", f"model {model!r} is {entry.status}{why}")


def _score(model: str, result: ItemResult | None) -> float:
    if result is None:
        raise ItemError("timeout", f"model {model!r} did not answer before the deadline")
    if result.error is not None:
        raise ItemError(
            "peer_error",
            f"model {model!r} could not score: {result.error.type}: {result.error.message}",
        )
    assert result.score is not None
    return result.score
