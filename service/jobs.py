"""A job: one item of a scoring request, as it travels from the gateway to a worker."""

from __future__ import annotations

from pydantic import BaseModel, Field

from rmserve.models.base import Render
from rmserve.models.spec import Aggregate
from rmserve.service.protocol import (
    DEFAULT_PRIORITY,
    ItemErrorBody,
    ItemResult,
    JudgeOptions,
    Priority,
)
from rmserve.wire.trajectory import Trajectory


class GroupMember(BaseModel):
    """An item of the request that a folded group job (listwise judging) stands for."""

    index: int
    id: str | None = None


class Job(BaseModel):
    id: str
    model: str
    index: int
    item: Trajectory
    enqueued_at: float
    # Wall-clock time (time.time()) after which the client no longer waits for the result.
    deadline: float
    # Who sent it (its API key's tenant) and its priority class: the order in which a model's
    # workers take jobs when tenants share it (service.scheduling).
    tenant: str = "anonymous"
    weight: float = 1.0  # the tenant's, as configured on the gateway that admitted the job
    priority: Priority = DEFAULT_PRIORITY
    aggregate: Aggregate | None = None
    judge: JudgeOptions | None = None
    render: Render = "chat_template"
    # Distributed mode: jobs with the same key (a hash of the item's prompt: the conversation
    # before the response) go to the same worker while it has room, so its engine computes the
    # shared prompt once (service.queue.redis_streams). None: any worker.
    prefix_key: str | None = None
    # Where the worker announces the result (the enqueuing gateway's channel, Redis queue).
    reply_to: str | None = None
    # A group assembled across requests (service.cohorts): the result channels of every
    # gateway with a request waiting for it (Redis queue; [] in the process). None: not one.
    cohort_channels: list[str] | None = None
    # The async batch (POST /v1/jobs) the job belongs to. With Redis, the worker appends the
    # result to the batch's record itself, so a batch outlives the gateway that accepted it.
    batch: str | None = None
    # Where the worker caches the result (result cache on); None: not cached.
    cache_key: str | None = None
    # A listwise judge's job for a whole group: the request's items it scores, in candidate
    # order (the gateway unfolds the result; service.groups). Kept by the gateway, not sent.
    members: list[GroupMember] | None = Field(default=None, exclude=True)
    # The queue's handle for acknowledging this delivery (a stream entry id); not serialized.
    receipt: str | None = Field(default=None, exclude=True)
    # How many times the queue has handed the job out, this time included: above 1, a worker
    # died holding it (released jobs keep their count), and it is scored alone.
    deliveries: int = Field(default=1, exclude=True)


def error_result(job: Job, code: str, message: str) -> ItemResult:
    """The result of an item that could not be scored (the rest of its batch still is)."""
    return ItemResult(
        id=job.item.id, index=job.index, error=ItemErrorBody(type=code, message=message)
    )
