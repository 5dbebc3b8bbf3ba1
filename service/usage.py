"""What each tenant used, hour by hour, for chargeback: items (and those that failed), prompt
and generated tokens, seconds queued and computing, by model. Workers record each finished item;
`GET /v1/usage` and `rmserve usage` sum the hours of a window.

Embedded mode keeps the hours in the process; distributed mode in Redis, one hash per tenant
and hour (`rmserve:usage:{<tenant>}:<hour>`, fields `<model>|<counter>`), kept for
`usage_retention_days`. A worker adds its counts up in memory and writes them every
FLUSH_S seconds and when it stops, in one round trip; a write that fails is kept and retried
under the same ids, applied once. A worker killed with kill -9 loses at most its last second of
counts (the items it held are redelivered, and counted when scored again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from fastapi import FastAPI
from pydantic import BaseModel

from rmserve.service.auth import ANONYMOUS, Caller
from rmserve.service.config import Settings
from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import QueueUnavailableError
from rmserve.service.queue.redis_streams import LUA, as_text, available
from rmserve.service.redis_cluster import RedisClient
from rmserve.web.errors import Forbidden, Unavailable, UnprocessableEntity

log = logging.getLogger(__name__)

HOUR_S = 3600
FLUSH_S = 1.0


@dataclass
class Counts:
    items: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def of(cls, result: ItemResult) -> Counts:
        return cls(
            items=1,
            errors=int(result.error is not None),
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            queue_s=result.timing.queue_s,
            compute_s=result.timing.compute_s,
        )


COUNTERS = tuple(f.name for f in fields(Counts))


class ModelUsage(BaseModel):
    model: str
    items: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    compute_s: float


class TenantUsage(BaseModel):
    tenant: str
    models: list[ModelUsage]


class UsageReport(BaseModel):
    """Usage in [start, end) (unix seconds, whole hours: the window asked for, widened)."""

    start: int
    end: int
    tenants: list[TenantUsage]


Key = tuple[str, int, str]  # tenant, hour, model


class UsageLedger(Protocol):
    def record(self, job: Job, result: ItemResult) -> None:
        """Count a finished item for its tenant (in memory; written by flush)."""
        ...

    async def report(self, start: float, end: float, tenants: Iterable[str] | None) -> UsageReport:
        """The usage of `tenants` (None: every tenant) in the hours that cover [start, end)."""
        ...

    async def close(self) -> None: ...


def hours(start: float, end: float) -> range:
    """The hours (unix seconds // 3600) whose span meets [start, end)."""
    return range(int(start // HOUR_S), int(-(-end // HOUR_S)))


def _report(
    found: dict[Key, Counts], start: float, end: float, tenants: Iterable[str] | None
) -> UsageReport:
    wanted = None if tenants is None else set(tenants)
    window = hours(start, end)
    totals: dict[str, dict[str, Counts]] = defaultdict(lambda: defaultdict(Counts))
    for (tenant, hour, model), counts in found.items():
        if hour in window and (wanted is None or tenant in wanted):
            totals[tenant][model].add(counts)
    return UsageReport(
        start=window.start * HOUR_S,
        end=window.stop * HOUR_S,
        tenants=[
            TenantUsage(
                tenant=tenant,
                models=[
                    ModelUsage(model=model, **vars(counts))
                    for model, counts in sorted(totals[tenant].items())
                ],
            )
            for tenant in sorted(totals)
        ],
    )


class MemoryUsage:
    """Embedded mode: the hours in the process, the last `retention_days`."""

    def __init__(self, retention_days: float) -> None:
        self._retention_s = retention_days * 86400
        self._hours: dict[Key, Counts] = defaultdict(Counts)

    def record(self, job: Job, result: ItemResult) -> None:
        now = time.time()
        self._hours[(job.tenant, int(now // HOUR_S), job.model)].add(Counts.of(result))
        oldest = (now - self._retention_s) // HOUR_S
        for key in [key for key in self._hours if key[1] < oldest]:
            del self._hours[key]

    async def report(self, start: float, end: float, tenants: Iterable[str] | None) -> UsageReport:
        return _report(dict(self._hours), start, end, tenants)

    async def close(self) -> None:
        pass


def usage_key(tenant: str, hour: int) -> str:
    return f"rmserve:usage:{{{tenant}}}:{hour}"


def written_key(tenant: str, write_id: str) -> str:
    """Marks one write as applied, so that a retry of a write whose reply was lost does not
    count it twice."""
    return f"rmserve:usage:{{{tenant}}}:written:{write_id}"


def tenants_key() -> str:
    """The tenants that have usage recorded (a set), for reports of every tenant."""
    return "rmserve:usage:tenants"


# Add counts to a tenant's hour once: a write retried after its reply was lost finds its
# marker and adds nothing. KEYS: the write's marker, the hour's hash. ARGV: the hash's time to
# live, then field and increment pairs.
_ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


class RedisUsage:
    """Distributed mode: hashes per tenant and hour in Redis, written every FLUSH_S."""

    def __init__(self, client: RedisClient, retention_days: float) -> None:
        self._redis = client
        self._ttl_s = int(retention_days * 86400) + HOUR_S
        self._unwritten: dict[Key, Counts] = defaultdict(Counts)
        self._writes: deque[tuple[str, dict[Key, Counts]]] = deque()  # not yet applied
        self._add_once = client.register_script(LUA + _ADD_ONCE)
        self._flusher: asyncio.Task[None] | None = None

    def record(self, job: Job, result: ItemResult) -> None:
        key = (job.tenant, int(time.time() // HOUR_S), job.model)
        self._unwritten[key].add(Counts.of(result))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_every())

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except QueueUnavailableError as exc:  # kept, and written with the next flush
                log.warning("usage counts not written yet (%s); retrying", exc)

    async def flush(self) -> None:
        """Write the counts recorded since the last flush; on failure they are kept and
        written again under the same ids (applied once: see _ADD_ONCE)."""
        if self._unwritten:
            self._writes.append((uuid.uuid4().hex, self._unwritten))
            self._unwritten = defaultdict(Counts)
        while self._writes:
            write_id, counts = self._writes[0]
            by_hour: dict[tuple[str, int], list[str | float]] = defaultdict(list)
            for (tenant, hour, model), c in counts.items():
                by_hour[(tenant, hour)] += [
                    x for name in COUNTERS for x in (f"{model}|{name}", getattr(c, name))
                ]
            # One script call per tenant and hour (a Cluster runs no script in a pipeline).
            for (tenant, hour), pairs in by_hour.items():
                await available(
                    self._add_once(
                        keys=[written_key(tenant, f"{write_id}:{hour}"), usage_key(tenant, hour)],
                        args=[self._ttl_s, *pairs],
                    )
                )
            await available(self._redis.sadd(tenants_key(), *{t for t, _ in by_hour}))
            self._writes.popleft()

    async def report(self, start: float, end: float, tenants: Iterable[str] | None) -> UsageReport:
        names: Sequence[str]
        if tenants is None:
            members = await available(self._redis.smembers(tenants_key()))
            names = sorted(as_text(m) for m in members)
        else:
            names = sorted(tenants)
        window = hours(start, end)
        pipe = self._redis.pipeline(transaction=False)
        keys = [(tenant, hour) for tenant in names for hour in window]
        for tenant, hour in keys:
            pipe.hgetall(usage_key(tenant, hour))
        found: dict[Key, Counts] = defaultdict(Counts)
        for (tenant, hour), raw in zip(keys, await available(pipe.execute()), strict=True):
            for field, value in raw.items():
                model, _, name = as_text(field).rpartition("|")
                if name in COUNTERS:
                    counts = found[(tenant, hour, model)]
                    kind = type(getattr(counts, name))
                    setattr(counts, name, kind(float(value)))
        return _report(found, start, end, tenants)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        try:
            await self.flush()
        except QueueUnavailableError as exc:
            log.warning("usage counts of the last second not written (%s)", exc)


def add_usage_route(app: FastAPI, usage: UsageLedger, settings: Settings) -> None:
    @app.get("/v1/usage", response_model=UsageReport, tags=["usage"])
    async def usage_report(
        key: Caller,
        start: float | None = None,
        end: float | None = None,
        tenant: str | None = None,
    ) -> UsageReport:
        """Each tenant's usage, for chargeback: items (and errors), prompt and generated
        tokens, seconds queued and computing, by model, summed over the hours that cover
        [start, end) (unix seconds; default: the last 24 hours). A key sees the tenants it may
        act for (all of them with authentication off)."""
        end = time.time() if end is None else end
        start = end - 86400 if start is None else start
        if start >= end:
            message = f"start ({start:g}) must be before end ({end:g})"
            raise UnprocessableEntity(message, param="start")
        oldest = time.time() - settings.usage_retention_days * 86400
        if start < oldest - HOUR_S:
            raise UnprocessableEntity(
                f"start ({start:g}) is before the oldest usage kept "
                f"(usage_retention_days={settings.usage_retention_days:g}: {oldest:.0f})",
                param="start",
            )
        allowed = None if key.name == ANONYMOUS else [t.name for t in key.tenancies()]
        if tenant is not None and allowed is not None and tenant not in allowed:
            raise Forbidden(
                f"key {key.name!r} may not see tenant {tenant!r}; allowed: {', '.join(allowed)}",
                param="tenant",
            )
        wanted = [tenant] if tenant is not None else allowed
        try:
            return await usage.report(start, end, wanted)
        except QueueUnavailableError as exc:
            raise Unavailable(f"usage is unreachable: {exc}") from None
