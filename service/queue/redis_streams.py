"""The Redis Streams queue of distributed mode: many gateways and workers share one Redis.

    rmserve:jobs:<model>     stream of jobs, consumer group "workers" (at-least-once delivery)
    rmserve:dead:<model>     dead-letter stream: jobs delivered more than max_deliveries times
    rmserve:result:<job id>  the result, stored (with a TTL) before the job is acknowledged
    rmserve:replies:<gw id>  pub/sub channel on which workers announce results to their gateway
    rmserve:batch:<id>       stream of an async batch: a header entry, then each result

A gateway enqueues all jobs of a request in one pipelined round trip and waits on its channel;
a result announcement it missed (e.g. during a reconnect) is found by a slow sweep of the result
keys, so nothing waits forever. Workers read as many jobs as they have free slots, keep their
in-flight entries fresh (XCLAIM JUSTID) so that nobody steals long jobs, and reclaim entries of
dead consumers (XAUTOCLAIM) once idle longer than `reclaim_idle_s`. A stored result makes a
redelivered job idempotent: it is answered from the store, not scored again. A worker that
drains on shutdown releases the jobs it could not finish (they become reclaimable at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rmserve.service.jobs import Job, error_result
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import (
    Depth,
    NoEvents,
    QueueEvents,
    QueueFullError,
    QueueUnavailableError,
)
from rmserve.service.queue.inbox import Inboxes

log = logging.getLogger(__name__)

GROUP = "workers"
T = TypeVar("T")

# Admission and enqueue of a request's jobs in one round trip, atomic across gateways. The
# backlog is what is not finished: undelivered (lag; the stream length when Redis cannot say)
# plus delivered but unacknowledged. Creates the stream and group when missing (also after
# Redis lost its data). KEYS: the jobs stream. ARGV: group, capacity, MAXLEN ~ bound, payloads.
# Returns the backlog before the jobs, or -1 when they do not fit (nothing is added).
_ADMIT = """
local stream, group = KEYS[1], ARGV[1]
local capacity, jobs = tonumber(ARGV[2]), #ARGV - 3
local backlog = nil
if redis.call('EXISTS', stream) == 1 then
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local field = {}
    for i = 1, #info, 2 do field[info[i]] = info[i + 1] end
    if field['name'] == group then
      backlog = field['pending'] + (field['lag'] or redis.call('XLEN', stream))
    end
  end
end
if backlog == nil then
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  backlog = redis.call('XLEN', stream)
end
if backlog + jobs > capacity then
  return -1
end
for i = 4, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', 'job', ARGV[i])
end
return backlog
"""


@dataclass(frozen=True)
class StreamSettings:
    capacity: int = 100_000
    max_deliveries: int = 3
    reclaim_idle_s: float = 60.0
    result_ttl_s: float = 3600.0
    # How often a waiting gateway checks the result store for announcements it missed.
    sweep_s: float = 2.0

    @property
    def reclaim_every_s(self) -> float:
        """How often a worker looks for jobs to reclaim (dead consumers', released ones)."""
        return min(self.reclaim_idle_s / 2, 5.0)


def jobs_key(model: str) -> str:
    return f"rmserve:jobs:{model}"


def dead_key(model: str) -> str:
    return f"rmserve:dead:{model}"


def result_key(job_id: str) -> str:
    return f"rmserve:result:{job_id}"


def batch_key(batch_id: str) -> str:
    return f"rmserve:batch:{batch_id}"


class StreamQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: StreamSettings,
        name: str | None = None,
        events: QueueEvents | None = None,
    ) -> None:
        self._redis = client
        self._events = events or NoEvents()
        self._settings = settings
        self.name = name or f"rmserve-{uuid.uuid4().hex[:12]}"
        self._channel = f"rmserve:replies:{self.name}"
        self._groups: set[str] = set()
        self._inboxes = Inboxes()
        self._listener: asyncio.Task[None] | None = None
        self._in_flight: dict[str, dict[str, str]] = {}  # model -> receipt -> job id
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_reclaim = 0.0
        self._admit = client.register_script(_ADMIT)

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: StreamSettings,
        name: str | None = None,
        events: QueueEvents | None = None,
    ) -> StreamQueue:
        client = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=None, health_check_interval=10
        )
        return cls(client, settings, name, events)

    # -- gateway side ------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        model = jobs[0].model
        # Jobs of an async batch are recorded in the batch by the worker; nobody waits here.
        waited = [job.id for job in jobs if job.batch is None]
        if waited:
            self._ensure_listener()
            self._inboxes.open(waited)  # before the jobs exist: no result can be missed
        payloads = [
            job.model_copy(
                update={"reply_to": self._channel if job.batch is None else None}
            ).model_dump_json()
            for job in jobs
        ]
        try:
            backlog: int = await available(
                self._admit(
                    keys=[jobs_key(model)],
                    args=[GROUP, self._settings.capacity, self._settings.capacity * 4, *payloads],
                )
            )
        except QueueUnavailableError:
            self._inboxes.discard(waited)
            raise
        if backlog < 0:
            self._inboxes.discard(waited)
            raise QueueFullError(model, retry_after_s=max(1, int(self._settings.sweep_s)))

    def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        return self._inboxes.wait(job_ids, deadline, self._stored, self._settings.sweep_s)

    async def _stored(self, job_ids: list[str]) -> list[tuple[str, ItemResult]]:
        with contextlib.suppress(QueueUnavailableError):
            values = await available(self._redis.mget([result_key(j) for j in job_ids]))
            return [
                (job_id, ItemResult.model_validate_json(value))
                for job_id, value in zip(job_ids, values, strict=True)
                if value is not None
            ]
        return []

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        """Route result announcements on this gateway's channel to the waiting requests."""
        lost = False
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    if lost:
                        log.info("result channel back")
                    lost = False
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._route(message["data"])
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if not lost:
                    log.warning("result channel lost (%s); resubscribing", exc)
                lost = True
                await asyncio.sleep(0.5)  # missed announcements are found by the sweep

    def _route(self, data: bytes) -> None:
        announcement = json.loads(data)
        self._inboxes.deliver(
            announcement["job_id"], ItemResult.model_validate(announcement["result"])
        )

    # -- worker side -------------------------------------------------------------------------

    async def fetch(self, model: str, max_jobs: int, wait_s: float) -> list[Job]:
        await self._ensure_group(model)
        self._ensure_heartbeat()
        reclaimed: list[tuple[str, dict[bytes, bytes]]] = []
        fresh: list[tuple[str, dict[bytes, bytes]]] = []
        try:
            if time.monotonic() - self._last_reclaim > self._settings.reclaim_every_s:
                self._last_reclaim = time.monotonic()
                reclaimed = await self._reclaim(model, max_jobs)
            if len(reclaimed) < max_jobs:
                response: Any = await available(
                    self._redis.xreadgroup(
                        GROUP,
                        self.name,
                        {jobs_key(model): ">"},
                        count=max_jobs - len(reclaimed),
                        block=max(1, int(wait_s * 1000)),
                    )
                )
                for _stream, stream_entries in response or []:
                    fresh += [(as_text(entry_id), fields) for entry_id, fields in stream_entries]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the consumer group of %s vanished (Redis lost data?); recreating", model)
            self._groups.discard(model)  # recreated by the next fetch
        # A first delivery has no stored result and a delivery count of 1: nothing to check.
        return await self._accept_redelivered(model, reclaimed) + self._take(model, fresh)

    def _take(self, model: str, entries: list[tuple[str, dict[bytes, bytes]]]) -> list[Job]:
        return self._hold(model, [_parse(entry_id, fields) for entry_id, fields in entries])

    def _hold(self, model: str, jobs: list[Job]) -> list[Job]:
        """Jobs this worker now holds: renewed by the heartbeat until finished or released."""
        in_flight = self._in_flight.setdefault(model, {})
        for job in jobs:
            in_flight[job.receipt or ""] = job.id
        return jobs

    async def _reclaim(self, model: str, max_jobs: int) -> list[tuple[str, dict[bytes, bytes]]]:
        idle_ms = int(self._settings.reclaim_idle_s * 1000)
        reply: Any = await available(
            self._redis.xautoclaim(jobs_key(model), GROUP, self.name, idle_ms, "0-0", max_jobs)
        )
        claimed = [(as_text(entry_id), fields) for entry_id, fields in reply[1] if fields]
        if claimed:
            log.warning("reclaimed %d jobs of %s from stopped consumers", len(claimed), model)
        await self._forget_dead_consumers(model)
        return claimed

    async def _forget_dead_consumers(self, model: str) -> None:
        """Remove consumers that hold nothing and have been silent for long (crashed workers
        leave their names behind), so the group does not grow without bound."""
        idle_ms = int(max(3600.0, 10 * self._settings.reclaim_idle_s) * 1000)
        consumers: Any = await available(self._redis.xinfo_consumers(jobs_key(model), GROUP))
        for consumer in consumers:
            name = as_text(consumer["name"])
            if name != self.name and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await available(self._redis.xgroup_delconsumer(jobs_key(model), GROUP, name))

    async def _accept_redelivered(
        self, model: str, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[Job]:
        """Jobs to score again; entries past max_deliveries go to the dead-letter stream,
        entries with a stored result (a crash after the store) are answered from it."""
        if not entries:
            return []
        counts = await self._delivery_counts(model, [entry_id for entry_id, _ in entries])
        parsed = [_parse(entry_id, fields) for entry_id, fields in entries]
        stored_results: list[Any] = await available(
            self._redis.mget([result_key(job.id) for job in parsed])
        )
        jobs: list[Job] = []
        for (entry_id, fields), job, stored in zip(entries, parsed, stored_results, strict=True):
            deliveries = counts.get(entry_id, 1)
            self._events.redelivered(model)
            if stored is not None:  # already recorded in its batch, if any
                await self._finish(job, ItemResult.model_validate_json(stored), record=False)
            elif deliveries > self._settings.max_deliveries:
                await self._dead_letter(job, fields[b"job"], deliveries)
            else:
                jobs += self._hold(model, [job])
        return jobs

    async def _delivery_counts(self, model: str, entry_ids: list[str]) -> dict[str, int]:
        pending: Any = await available(
            self._redis.xpending_range(
                jobs_key(model),
                GROUP,
                min(entry_ids, key=_order),
                max(entry_ids, key=_order),
                len(entry_ids) + len(self._in_flight.get(model, {})),
                consumername=self.name,
            )
        )
        return {as_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def _dead_letter(self, job: Job, payload: bytes, deliveries: int) -> None:
        reason = (
            f"delivered {deliveries} times (max_deliveries {self._settings.max_deliveries}); "
            "the worker failed each time"
        )
        await available(
            self._redis.xadd(dead_key(job.model), {"job": payload, "reason": reason}, maxlen=10_000)
        )
        log.error("job %s of %s dead-lettered: %s", job.id, job.model, reason)
        self._events.dead_lettered(job.model)
        message = f"the item could not be scored: {reason}"
        await self._finish(job, error_result(job, "dead_lettered", message))

    async def _finish(self, job: Job, result: ItemResult, record: bool = True) -> None:
        """Store the result, record it in its batch, acknowledge and announce, atomically
        (MULTI): a crash before redelivers the job; after, the stored result answers it."""
        body = json.dumps(result.model_dump(mode="json"))
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(result_key(job.id), body, ex=int(self._settings.result_ttl_s))
        if record and job.batch is not None:  # NOMKSTREAM: an expired batch stays gone
            pipe.xadd(batch_key(job.batch), {"result": body}, nomkstream=True)
        pipe.xack(jobs_key(job.model), GROUP, job.receipt or "0-0")
        if job.reply_to:
            pipe.publish(job.reply_to, f'{{"job_id":{json.dumps(job.id)},"result":{body}}}')
        try:
            await available(pipe.execute())
        finally:  # stored, or (Redis gone) left to be reclaimed once idle: no more renewals
            self._in_flight.get(job.model, {}).pop(job.receipt or "", None)
        self._events.acked(job.model)

    async def complete(self, job: Job, result: ItemResult) -> None:
        await self._finish(job, result)

    async def release(self, jobs: Sequence[Job]) -> None:
        """Give up jobs without a result (a draining worker): they look idle for long, so the
        next worker to look for jobs to reclaim takes them. Their delivery count is kept."""
        idle_ms = int(self._settings.reclaim_idle_s * 1000) * 10
        for model in {job.model for job in jobs}:
            receipts: list[Any] = [j.receipt for j in jobs if j.model == model and j.receipt]
            for receipt in receipts:
                self._in_flight.get(model, {}).pop(receipt, None)
            if receipts:
                await available(
                    self._redis.xclaim(
                        jobs_key(model), GROUP, self.name, 0, receipts, idle=idle_ms, justid=True
                    )
                )

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._keep_in_flight_fresh())

    async def _keep_in_flight_fresh(self) -> None:
        """Reset the idle time of in-flight entries so that no one reclaims a long job."""
        while True:
            await asyncio.sleep(self._settings.reclaim_idle_s / 3)
            for model, receipts in list(self._in_flight.items()):
                if receipts:
                    with contextlib.suppress(QueueUnavailableError):
                        await available(
                            self._redis.xclaim(
                                jobs_key(model), GROUP, self.name, 0, list(receipts), justid=True
                            )
                        )

    # -- both --------------------------------------------------------------------------------

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups:
            return
        try:
            await available(
                self._redis.xgroup_create(jobs_key(model), GROUP, id="0", mkstream=True)
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    async def depth(self, model: str) -> Depth:
        try:
            groups: Any = await available(self._redis.xinfo_groups(jobs_key(model)))
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return Depth(pending=0, lag=0)  # no job was ever enqueued (or Redis lost its data)
        for group in groups:
            if as_text(group["name"]) == GROUP:
                lag = group.get("lag")
                if lag is None:  # Redis cannot tell (after trimming): at most the length
                    lag = await available(self._redis.xlen(jobs_key(model)))
                return Depth(pending=int(group["pending"]), lag=int(lag))
        return Depth(pending=0, lag=0)

    async def dead_letters(self, model: str) -> list[dict[str, str]]:
        entries: Any = await available(self._redis.xrange(dead_key(model)))
        return [{as_text(k): as_text(v) for k, v in fields.items()} for _, fields in entries]

    async def ping(self) -> None:
        await available(self._redis.ping())

    async def close(self) -> None:
        for task in (self._listener, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._heartbeat is not None:  # a worker: leave the group if it holds nothing
            with contextlib.suppress(QueueUnavailableError, ResponseError):
                for model in self._groups:
                    await self._leave_group(model)
        await self._redis.aclose()

    async def _leave_group(self, model: str) -> None:
        consumers: Any = await available(self._redis.xinfo_consumers(jobs_key(model), GROUP))
        for consumer in consumers:
            if as_text(consumer["name"]) == self.name and consumer["pending"] == 0:
                await available(self._redis.xgroup_delconsumer(jobs_key(model), GROUP, self.name))


async def available(call: Awaitable[T]) -> T:
    """Await a Redis call; an unreachable Redis becomes QueueUnavailableError."""
    try:
        return await call
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise QueueUnavailableError(f"redis: {exc}") from exc


def as_text(value: Any) -> str:
    """A Redis reply field (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _parse(entry_id: str, fields: dict[bytes, bytes]) -> Job:
    return Job.model_validate_json(fields[b"job"]).model_copy(update={"receipt": entry_id})
