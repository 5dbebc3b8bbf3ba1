"""GRPO groups assembled across requests ("cohorts"), for listwise judges.

A trainer that scores one sample per request (OpenRLHF; verl's agent loop, which scores each
sample on a reward worker chosen at random) sends a group's responses in pieces. Items that say
their group's size (`group`, `group_size`) and arrive with fewer of their group than that are
held until the whole group is in, then judged as one group; each request gets its own items'
results.

- The state of a group (a `Cohort`) lives where the queue lives: in Redis (every gateway sees
  it, and it outlives the gateway that took an item) or in the process (embedded mode). It is
  changed by one pure function at a time (`join`, `expire`), atomically (a Redis transaction).
- A group is keyed by (API key, model, group): two training jobs cannot mix their groups.
- The item that completes a group enqueues its judging as one job whose result every gateway
  with a waiting request is sent (Job.cohort_channels); the result is also stored, so a request
  that comes later (a resent item) finds it.
- A group not complete within its wait (options.group_wait_s, else the server's group_wait_s)
  is given up by the first waiting request to notice: each item gets `group_incomplete`, or,
  when the operator allows (partial_groups: judge) and 2+ responses are in, the partial group
  is judged and its results say so (`partial_group`). Never a silent partial ranking.
- An item that resends an item of the group (the same `id`, the same content) waits for that
  item's result; the same `id` with other content is `group_conflict`. More items than the
  group's size is `group_oversize`; an item whose prompt, reference, documents, metadata, size
  or options differ from the group's is `group_mismatch`. These are errors of that item only.
- A gateway that dies while its requests wait loses nothing of the group: the state is in
  Redis, the group completes with the other items, and a resent item gets the stored result.
  A gateway that dies between completing a group and enqueueing it leaves the group's requests
  to time out (an error, never a score).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel
from redis.exceptions import WatchError

from rmserve.service.groups import Piece, prefix_key, unfold
from rmserve.service.jobs import GroupMember, Job, error_result
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemErrorBody, ItemResult
from rmserve.service.queue.base import JobQueue, QueueFullError, QueueUnavailableError
from rmserve.service.redis_cluster import RedisClient
from rmserve.wire.trajectory import Candidate, Trajectory

log = logging.getLogger(__name__)
T = TypeVar("T")


class Cohort(BaseModel):
    """A group being assembled: its judging job's id, what every item must agree on, and the
    responses in so far (in arrival order: the judge's candidate order)."""

    job: str
    size: int
    agreed: dict[str, str]  # field -> digest: prompt, reference, documents, metadata, options
    options: dict[str, Any]  # the first request's options for the job (aggregate, judge, render)
    opened_at: float
    expires_at: float
    deadline: float  # the latest deadline of the requests waiting
    status: Literal["open", "done", "expired"] = "open"
    ids: list[str | None] = []
    digests: list[str] = []
    responses: list[list[Any]] = []
    channels: list[str] = []
    first: dict[str, Any] = {}  # the first item (its prompt, reference, ... for the judge)


Outcome = int | ItemErrorBody  # the item's place in the group, or why it has none


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def agreed_fields(piece: Piece, options: Any) -> dict[str, str]:
    first = piece.members[0][1]
    return {
        "group_size": str(piece.size),
        "prompt": _digest(piece.prompt),
        "reference": _digest(first.reference),
        "documents": _digest([d.model_dump() for d in first.documents or []]),
        "metadata": _digest(first.metadata),
        "options": _digest(options),
    }


def join(
    cohort: Cohort | None,
    piece: Piece,
    options: dict[str, Any],
    channel: str | None,
    now: float,
    wait_s: float,
    deadline: float,
) -> tuple[Cohort, list[Outcome], bool]:
    """Add a piece's items to their group: (the group now, each item's outcome, whether this
    piece completed the group). A group found past its wait is given up first (its status
    becomes expired: the caller concludes it), so no item joins a group that timed out."""
    agreed = agreed_fields(piece, options)
    if cohort is None:
        first = piece.members[0][1]
        cohort = Cohort(
            job=f"group:{uuid.uuid4().hex}",
            size=piece.size,
            agreed=agreed,
            options=options,
            opened_at=now,
            expires_at=now + wait_s,
            deadline=deadline,
            first=first.model_dump(mode="json", include={"reference", "documents", "metadata"})
            | {"prompt": piece.prompt, "id": first.id},
        )
    cohort = cohort.model_copy(deep=True)
    if cohort.status == "open" and now >= cohort.expires_at:
        cohort.status = "expired"  # past its wait: the joining request gives it up (Cohorts)
    differs = [name for name, digest in agreed.items() if cohort.agreed.get(name) != digest]
    outcomes: list[Outcome] = []
    for (_, item), response in zip(piece.members, piece.responses, strict=True):
        digest = _digest(response)
        if differs:
            outcomes.append(_mismatch(piece, differs[0], cohort))
        elif item.id is not None and item.id in cohort.ids:
            slot = cohort.ids.index(item.id)
            outcomes.append(slot if cohort.digests[slot] == digest else _conflict(piece, item))
        elif cohort.status == "expired":
            outcomes.append(_late(piece, cohort))
        elif cohort.status == "done" or len(cohort.ids) >= cohort.size:
            outcomes.append(_oversize(piece, cohort))
        else:
            cohort.ids.append(item.id)
            cohort.digests.append(digest)
            cohort.responses.append(response)
            outcomes.append(len(cohort.ids) - 1)
    waiting = any(isinstance(outcome, int) for outcome in outcomes)
    if waiting:
        cohort.deadline = max(cohort.deadline, deadline)
        if channel is not None and channel not in cohort.channels:
            cohort.channels.append(channel)
    completed = cohort.status == "open" and len(cohort.ids) == cohort.size
    if completed:
        cohort.status = "done"
    return cohort, outcomes, completed


def expire(cohort: Cohort | None, now: float) -> tuple[Cohort | None, bool]:
    """Give up a group past its wait: (the group now, whether this call gave it up)."""
    if cohort is None or cohort.status != "open" or now < cohort.expires_at:
        return cohort, False
    return cohort.model_copy(update={"status": "expired"}), True


def _mismatch(piece: Piece, field_name: str, cohort: Cohort) -> ItemErrorBody:
    what = {"group_size": "group_size", "options": "request options"}.get(
        field_name, field_name if field_name != "prompt" else "conversation before the response"
    )
    return ItemErrorBody(
        type="group_mismatch",
        message=f"group {piece.group!r}: this item's {what} differs from that of the group's "
        f"first item (id {cohort.first.get('id')!r}); a group is judged against one prompt",
    )


def _conflict(piece: Piece, item: Trajectory) -> ItemErrorBody:
    return ItemErrorBody(
        type="group_conflict",
        message=f"group {piece.group!r} already has an item with id {item.id!r} and another "
        "response; ids of a group's items must differ",
    )


def _late(piece: Piece, cohort: Cohort) -> ItemErrorBody:
    return ItemErrorBody(
        type="group_incomplete",
        message=f"group {piece.group!r} was given up before this item arrived: {len(cohort.ids)}"
        f" of {cohort.size} responses arrived within its wait",
    )


def _oversize(piece: Piece, cohort: Cohort) -> ItemErrorBody:
    return ItemErrorBody(
        type="group_oversize",
        message=f"group {piece.group!r} announced group_size {cohort.size} and already has "
        f"{len(cohort.ids)} responses; this one is more than its size",
    )


# -- where groups are kept ----------------------------------------------------------------------


class CohortStore(Protocol):
    async def change(
        self, key: str, edit: Callable[[Cohort | None], tuple[Cohort | None, T]], ttl_s: float
    ) -> T:
        """Apply `edit` to the group at `key` atomically (it may be called again on a
        conflict: it must be pure) and keep the new state for `ttl_s`."""
        ...


class MemoryCohorts:
    def __init__(self) -> None:
        self._groups: dict[str, tuple[Cohort, float]] = {}

    async def change(
        self, key: str, edit: Callable[[Cohort | None], tuple[Cohort | None, T]], ttl_s: float
    ) -> T:
        now = time.monotonic()
        if len(self._groups) > 1000:  # forget groups past their time
            self._groups = {k: v for k, v in self._groups.items() if v[1] > now}
        held = self._groups.get(key)
        cohort, out = edit(held[0] if held is not None and held[1] > now else None)
        if cohort is not None:
            self._groups[key] = (cohort, now + ttl_s)
        return out


class RedisCohorts:
    def __init__(self, client: RedisClient) -> None:
        self._redis = client

    async def change(
        self, key: str, edit: Callable[[Cohort | None], tuple[Cohort | None, T]], ttl_s: float
    ) -> T:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        cohort, out = edit(Cohort.model_validate_json(raw) if raw else None)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if cohort is not None:
                            pipe.set(key, cohort.model_dump_json(), px=max(1, int(ttl_s * 1000)))
                        await pipe.execute()
                        return out
                    except WatchError:
                        continue  # another gateway changed the group meanwhile: again
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise QueueUnavailableError(f"redis: {exc}") from exc


def cohort_store_for(queue: JobQueue) -> CohortStore:
    """Groups kept where the queue is: in its Redis (shared by all gateways) or the process."""
    from rmserve.service.queue.redis_streams import StreamQueue

    return RedisCohorts(queue.client) if isinstance(queue, StreamQueue) else MemoryCohorts()


# -- the gateway's side -------------------------------------------------------------------------


@dataclass
class Waiting:
    """A request's items in one group: what it waits for."""

    key: str
    model: str
    job: str
    size: int
    expires_at: float
    deadline: float  # this request's
    group_deadline: float  # the latest of the group's requests
    slots: list[tuple[int, str | None, int]]  # (index in the request, item id, place in group)
    refused: list[ItemResult] = field(default_factory=list)
    follower: Follower | None = None


@dataclass
class Follower:
    """This gateway's receiver of a group job's result, shared by its waiting requests."""

    result: asyncio.Future[ItemResult]
    task: asyncio.Task[None] | None  # None: the result was known already
    waiters: int = 0


class Cohorts:
    """Joins pieces to their groups, enqueues complete groups, and answers each request."""

    def __init__(
        self,
        store: CohortStore,
        queue: JobQueue,
        metrics: Metrics,
        partial: Literal["error", "judge"],
        keep_s: float,
    ) -> None:
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._partial = partial
        self._keep_s = keep_s  # how long a finished group's state answers resent items
        self._followers: dict[str, Follower] = {}
        self._recent: OrderedDict[str, ItemResult] = OrderedDict()

    async def join(self, piece: Piece, job: Job, scope: str, wait_s: float) -> Waiting:
        """Add the piece's items to their group (enqueueing its judging if they complete it).
        `job` has the request's model, options and deadline."""
        key = f"rmserve:cohort:{_digest([scope, job.model, piece.group])}"
        options = job.model_dump(mode="json", include={"aggregate", "judge", "render"})
        channel = self._queue.reply_channel
        now = time.time()

        def edit(
            cohort: Cohort | None,
        ) -> tuple[Cohort, tuple[Cohort, list[Outcome], bool, bool]]:
            was_open = cohort is not None and cohort.status == "open"
            joined, outcomes, completed = join(
                cohort, piece, options, channel, now, wait_s, job.deadline
            )
            return joined, (joined, outcomes, completed, was_open and joined.status == "expired")

        ttl_s = max(wait_s, job.deadline - now) + self._keep_s
        cohort, outcomes, completed, expired = await self._store.change(key, edit, ttl_s)
        if expired:  # this request found the group past its wait
            await self._conclude(cohort, job.model)
        if cohort.opened_at == now and cohort.ids:
            self._metrics.groups.labels(job.model, "opened").inc()
        waiting = Waiting(
            key,
            job.model,
            cohort.job,
            cohort.size,
            cohort.expires_at,
            job.deadline,
            cohort.deadline,
            [],
        )
        for (index, item), outcome in zip(piece.members, outcomes, strict=True):
            if isinstance(outcome, int):
                waiting.slots.append((index, item.id, outcome))
            else:
                waiting.refused.append(ItemResult(id=item.id, index=index, error=outcome))
        if waiting.slots:
            waiting.follower = self._follow(waiting)
        if completed:
            self._metrics.groups.labels(job.model, "completed").inc()
            self._metrics.group_wait.labels(job.model).observe(now - cohort.opened_at)
            await self._enqueue(cohort, job.model, len(cohort.ids))
        return waiting

    async def _enqueue(self, cohort: Cohort, model: str, judged: int) -> None:
        """Enqueue the judging of a group (or of the part that arrived); if the queue refuses
        it, every waiting request gets the error."""
        first = cohort.first
        item = Trajectory.model_validate(
            {
                "id": first["id"],
                "messages": first["prompt"],
                "candidates": [
                    Candidate(id=item_id, messages=response).model_dump(mode="json")
                    for item_id, response in zip(
                        cohort.ids[:judged], cohort.responses[:judged], strict=True
                    )
                ],
                **{k: first[k] for k in ("reference", "documents", "metadata") if first[k]},
            }
        )
        job = Job.model_validate(
            {
                **cohort.options,
                "id": cohort.job,
                "model": model,
                "index": 0,
                "item": item,
                "enqueued_at": time.time(),
                "deadline": cohort.deadline,
                "prefix_key": prefix_key(item),
                "cohort_channels": cohort.channels,
            }
        )
        try:
            await self._queue.enqueue([job])
        except (QueueFullError, QueueUnavailableError) as exc:
            log.warning("group %s could not be enqueued: %s", cohort.job, exc)
            result = error_result(job, "queue_full", f"the group could not be enqueued: {exc}")
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.post(job.model, cohort.job, result, cohort.channels)

    def _follow(self, waiting: Waiting) -> Follower:
        """The group job's receiver on this gateway (one per job, shared by its requests)."""
        follower = self._followers.get(waiting.job)
        if follower is None:
            result: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
            if (known := self._recent.get(waiting.job)) is not None:  # a resent item
                result.set_result(known)
                follower = Follower(result, None)
            else:
                self._queue.watch(waiting.model, [waiting.job])
                task = asyncio.create_task(
                    self._receive(waiting.job, waiting.group_deadline, result)
                )
                follower = self._followers[waiting.job] = Follower(result, task)
        follower.waiters += 1
        return follower

    async def _receive(self, job_id: str, deadline: float, result: asyncio.Future[Any]) -> None:
        try:
            async for _, delivered in self._queue.results([job_id], deadline):
                self._recent[job_id] = delivered
                while len(self._recent) > 10_000:
                    self._recent.popitem(last=False)
                if not result.done():
                    result.set_result(delivered)
        finally:
            self._followers.pop(job_id, None)
            if not result.done():
                result.cancel()

    async def wait(self, waiting: Waiting) -> list[ItemResult]:
        """The results of a request's items in a group: scored with the group, or errors."""
        follower = waiting.follower
        if follower is None:
            return list(waiting.refused)
        try:
            result = await self._await(waiting, follower.result)
        finally:
            follower.waiters -= 1
            if follower.waiters == 0 and follower.task is not None and not follower.result.done():
                follower.task.cancel()
        return waiting.refused + self._mine(waiting, result)

    async def _await(
        self, waiting: Waiting, result: asyncio.Future[ItemResult]
    ) -> ItemResult | None:
        while True:
            now = time.time()
            until = min(waiting.expires_at, waiting.deadline)
            if now >= waiting.expires_at:
                until = waiting.deadline
            try:
                return await asyncio.wait_for(asyncio.shield(result), max(0.0, until - now))
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if not result.cancelled():  # this request was cancelled
                    raise
            if result.cancelled() or time.time() >= waiting.deadline:
                return None
            if time.time() < waiting.expires_at:  # a timer may fire a little early (uvloop)
                continue
            if await self._give_up(waiting):
                waiting.expires_at = waiting.deadline  # given up, by this request or another
            else:  # still open by the store's clock: look again shortly
                waiting.expires_at = time.time() + 0.05

    async def _give_up(self, waiting: Waiting) -> bool:
        """End the group if it is past its wait; whether it is no longer open."""
        now = time.time()

        def edit(cohort: Cohort | None) -> tuple[Cohort | None, tuple[Cohort | None, bool]]:
            changed, expired = expire(cohort, now)
            return changed, (changed, expired)

        cohort, expired = await self._store.change(waiting.key, edit, self._keep_s)
        if expired and cohort is not None:
            await self._conclude(cohort, waiting.model)
        return cohort is None or cohort.status != "open"

    async def _conclude(self, cohort: Cohort, model: str) -> None:
        """A group given up after its wait: its items' errors, or its partial judging."""
        self._metrics.groups.labels(model, "timed_out").inc()
        arrived = len(cohort.ids)
        if self._partial == "judge" and arrived >= 2:
            await self._enqueue(cohort, model, arrived)
            return
        message = (
            f"{arrived} of the group's {cohort.size} responses arrived within its wait "
            f"({cohort.expires_at - cohort.opened_at:g} s: options.group_wait_s or the "
            "server's group_wait_s); a listwise judge compares whole groups only"
        )
        result = ItemResult(index=0, error=ItemErrorBody(type="group_incomplete", message=message))
        await self._queue.post(model, cohort.job, result, cohort.channels)

    def _mine(self, waiting: Waiting, result: ItemResult | None) -> list[ItemResult]:
        if result is None:
            error = ItemErrorBody(
                type="timeout", message="the item's group was not judged within timeout_s"
            )
            return [ItemResult(id=i, index=index, error=error) for index, i, _ in waiting.slots]
        judged = len(result.scores) if result.scores is not None else waiting.size
        members = [GroupMember(index=-1) for _ in range(max(judged, waiting.size))]
        for index, item_id, slot in waiting.slots:
            members[slot] = GroupMember(index=index, id=item_id)
        unfolded = {r.index: r for r in unfold(result, members[: max(judged, 1)])}
        partial = judged if result.error is None and judged < waiting.size else None
        out = []
        for index, item_id, _ in waiting.slots:
            mine = unfolded.get(index) or ItemResult(id=item_id, index=index, error=result.error)
            out.append(mine.model_copy(update={"partial_group": partial}))
        return out
