"""How many jobs a worker holds: the setting, else twice what the model's engine runs at once;
never more, whatever the size of the groups it takes whole."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pydantic

from rmserve.models.base import RequestOptions, Reward, RewardModel
from rmserve.models.loader import load_model
from rmserve.models.spec import ModelSpec
from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.queue import InProcessQueue
from rmserve.service.worker import DEFAULT_CONCURRENCY, Worker, worker_concurrency
from rmserve.wire.trajectory import Trajectory

SPECS: pydantic.TypeAdapter[ModelSpec] = pydantic.TypeAdapter(ModelSpec)


def spec(**fields: object) -> ModelSpec:
    return SPECS.validate_python({"name": "m", **fields})


def test_an_engine_model_holds_twice_what_its_engine_runs_at_once() -> None:
    assert worker_concurrency(spec(kind="discriminative", weights="/m"), None) == 512
    small = spec(kind="generative", weights="/m", engine={"max_num_seqs": 24})
    assert worker_concurrency(small, None) == 48


def test_a_model_without_an_engine_holds_the_default() -> None:
    assert worker_concurrency(spec(kind="math"), None) == DEFAULT_CONCURRENCY


def test_the_setting_wins() -> None:
    small = spec(kind="generative", weights="/m", engine={"max_num_seqs": 24})
    assert worker_concurrency(small, 512) == 512
    assert worker_concurrency(spec(kind="math"), 3) == 3


class Gated:
    """A rule-based model (exact match) whose scoring waits for a gate, counting the items it
    holds at once."""

    def __init__(self, model: RewardModel) -> None:
        self.model, self.name = model, model.name
        self.gate = asyncio.Event()
        self.holding = self.most = self.done = 0

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        self.holding += 1
        self.most = max(self.most, self.holding)
        try:
            await self.gate.wait()
            return await self.model.score(item, options)
        finally:
            self.holding -= 1
            self.done += 1

    def __getattr__(self, name: str) -> Any:  # the rest of the model, as it is
        return getattr(self.model, name)

    def open_gate(self) -> None:
        """Let the items waiting now go on; those that come later wait for the next call."""
        gate, self.gate = self.gate, asyncio.Event()
        gate.set()

    def shutdown(self) -> None:
        self.model.shutdown()


def group(request: str, n: int) -> list[Job]:
    """A request's n items sharing a prompt: a bundle the queue hands out whole."""
    item = Trajectory.model_validate(
        {"messages": [{"role": "assistant", "content": "yes"}], "reference": "yes"}
    )
    now = time.time()
    return [
        Job(
            id=f"{request}-{i}",
            model="exact",
            index=i,
            item=item,
            enqueued_at=now,
            deadline=now + 60,
            prefix_key=request,
        )
        for i in range(n)
    ]


async def test_a_group_larger_than_the_free_slots_does_not_raise_the_cap() -> None:
    """Found by benchmarks/tenant_fairness.py: each group taken whole into fewer free slots
    used to free a slot per item when done, so a worker capped at 32 came to hold 191 jobs and
    fair scheduling had nothing left to order."""
    spec = SPECS.validate_python(
        {"name": "exact", "kind": "similarity", "options": {"metric": "exact"}}
    )
    model = Gated(load_model(spec))
    queue = InProcessQueue(capacity=1000)
    worker = Worker(model, queue, Metrics(), concurrency=4)
    task = asyncio.create_task(worker.run())
    try:
        for request in range(4):  # 4 groups of 6 items, each larger than the cap of 4
            await queue.enqueue(group(f"r{request}", 6))
        for round_ in range(4):
            while model.holding < 6:  # noqa: ASYNC110 (a whole group, however few slots were free)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the worker would take more now, were its slots wrong
            assert (await queue.depth("exact")).pending == 6  # one group, held whole
            model.open_gate()  # this group's items finish; the next group's wait
            while model.done < 6 * (round_ + 1):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # While one group's last items finish, the next may start: never more than the cap
        # plus one group taken into a single free slot.
        assert model.most <= 4 + 6 - 1, model.most
        assert (await queue.depth("exact")).lag == 0
    finally:
        model.open_gate()
        await worker.stop(grace_s=5)
        await task
