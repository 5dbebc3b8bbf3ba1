"""A job: one item of a scoring request, as it travels from the gateway to a worker."""

from __future__ import annotations

from pydantic import BaseModel, Field

from rmserve.models.base import Render
from rmserve.models.spec import Aggregate
from rmserve.service.protocol import ItemErrorBody, ItemResult, JudgeOptions
from rmserve.wire.trajectory import Trajectory


class Job(BaseModel):
    id: str
    model: str
    index: int
    item: Trajectory
    enqueued_at: float
    # Wall-clock time (time.time()) after which the client no longer waits for the result.
    deadline: float
    aggregate: Aggregate | None = None
    judge: JudgeOptions | None = None
    render: Render = "chat_template"
    # Where the worker announces the result (the enqueuing gateway's channel, Redis queue).
    reply_to: str | None = None
    # The async batch (POST /v1/jobs) the job belongs to. With Redis, the worker appends the
    # result to the batch's record itself, so a batch outlives the gateway that accepted it.
    batch: str | None = None
    # Where the worker caches the result (result cache on); None: not cached.
    cache_key: str | None = None
    # The queue's handle for acknowledging this delivery (a stream entry id); not serialized.
    receipt: str | None = Field(default=None, exclude=True)


def error_result(job: Job, code: str, message: str) -> ItemResult:
    """The result of an item that could not be scored (the rest of its batch still is)."""
    return ItemResult(
        id=job.item.id, index=job.index, error=ItemErrorBody(type=code, message=message)
    )
