"""A job: one item of a scoring request, as it travels from the gateway to a worker."""

from __future__ import annotations

from pydantic import BaseModel

from models.spec import Aggregate
from models.trajectory import Trajectory


class Job(BaseModel):
    id: str
    model: str
    index: int
    item: Trajectory
    enqueued_at: float
    # Wall-clock time (time.time()) after which the client no longer waits for the result.
    deadline: float
    aggregate: Aggregate | None = None
