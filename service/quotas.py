"""Per-key quotas: a request rate (token bucket) and the items a key has in flight (leases).

A request of a key with quotas is admitted by one atomic check: it takes a token from the key's
bucket (`requests_per_s`, `burst`) and, under `max_concurrent_items`, adds a lease holding the
request's items. When either limit would be exceeded nothing is taken, and the answer is 429
`rate_limited` (Retry-After: when the bucket has a token again) or `too_many_items_in_flight`.
The lease is released when the request ends: its response was sent (streamed ones too, however
the client left) or it failed; for an async batch, when the batch is done.

Two limiters, one interface. Embedded mode keeps the state in the process. Distributed mode keeps
it in the queue's Redis, so that the limits hold in total across gateways; each check is one Lua
script (atomic, one round trip), on two keys of one hash slot:

    rmserve:quota:{<key name>}:bucket   hash: tokens, at (ms, Redis' clock)
    rmserve:quota:{<key name>}:leases   sorted set: member "<items>:<lease id>", score: expiry

A lease expires `lease_ttl_s` after it was taken or last renewed, and the gateway holding it
renews it every lease_ttl_s / 3 while the request lives (at most `max_lifetime_s`: no request
outlives max_timeout_s). A gateway that dies stops renewing: its leases stop counting after at
most lease_ttl_s, so nothing leaks. A check first drops expired leases. Time is Redis' (TIME), so
gateways' clocks do not matter.

Redis unreachable during a check: 503, like other queue errors. That fails closed: the request's
jobs would go to the same Redis, so it could not have been served anyway, and failing open would
let every key past its limits whenever Redis blips. A release that fails is left to the expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rmserve.service.metrics import Metrics
from rmserve.service.queue.base import JobQueue, QueueUnavailableError
from rmserve.service.queue.redis_streams import LUA, StreamQueue, available
from rmserve.service.redis_cluster import RedisClient
from rmserve.web.errors import PayloadTooLarge, RateLimited, TooManyItemsInFlight, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Limit = Literal["rate", "concurrency"]


@dataclass(frozen=True)
class Quota:
    """A key's limits; None: no limit. `burst` is set whenever `requests_per_s` is."""

    requests_per_s: float | None = None
    burst: int | None = None
    max_concurrent_items: int | None = None

    @property
    def limited(self) -> bool:
        return self.requests_per_s is not None or self.max_concurrent_items is not None


class QuotaExceeded(Exception):
    """A limiter refused a request; nothing was taken. `held`: the key's items in flight."""

    def __init__(self, limit: Limit, retry_after_s: float, held: int = 0) -> None:
        super().__init__(f"{limit} limit exceeded")
        self.limit, self.retry_after_s, self.held = limit, retry_after_s, held


@dataclass(eq=False)
class Lease:
    """A request's hold on its key's quota. Release it when the request ends (idempotent)."""

    key: str
    items: int  # counted against max_concurrent_items; 0: nothing is held
    renew_until: float = math.inf  # time.monotonic()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _quotas: Quotas | None = None

    @property
    def member(self) -> str:
        return f"{self.items}:{self.id}"

    async def release(self) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None:
            await quotas.release(self)

    async def released_on_error(self, work: Awaitable[T]) -> T:
        """Await `work`; release the lease if it fails (else the caller releases it later)."""
        try:
            return await work
        except BaseException:
            await self.release()
            raise

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.release()


class Limiter(Protocol):
    async def acquire(self, lease: Lease, quota: Quota) -> None:
        """Take a token and (when the lease holds items) add the lease, in one atomic step;
        or raise QuotaExceeded and take nothing. QueueUnavailableError: store unreachable."""
        ...

    async def renew(self, key: str, leases: Sequence[Lease]) -> None:
        """Extend the leases still held (an expired or released one is not brought back)."""
        ...

    async def release(self, lease: Lease) -> None: ...


class MemoryLimiter:
    """Embedded mode: the same limits, in the process."""

    def __init__(self, lease_ttl_s: float) -> None:
        self._ttl_s = lease_ttl_s
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._leases: dict[str, dict[str, tuple[int, float]]] = {}  # key -> id -> (items, expiry)

    async def acquire(self, lease: Lease, quota: Quota) -> None:
        now = time.monotonic()
        tokens = None
        if quota.requests_per_s is not None and quota.burst is not None:
            rate, burst = quota.requests_per_s, quota.burst
            tokens, at = self._buckets.get(lease.key, (float(burst), now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens < 1:
                raise QuotaExceeded("rate", (1 - tokens) / rate)
        if quota.max_concurrent_items is not None and lease.items:
            held = {i: v for i, v in self._leases.get(lease.key, {}).items() if v[1] > now}
            self._leases[lease.key] = held
            in_flight = sum(items for items, _ in held.values())
            if in_flight + lease.items > quota.max_concurrent_items:
                raise QuotaExceeded("concurrency", 1.0, in_flight)
            held[lease.id] = (lease.items, now + self._ttl_s)
        if tokens is not None:
            self._buckets[lease.key] = (tokens - 1, now)

    async def renew(self, key: str, leases: Sequence[Lease]) -> None:
        held, expiry = self._leases.get(key, {}), time.monotonic() + self._ttl_s
        for lease in leases:
            if lease.id in held:
                held[lease.id] = (lease.items, expiry)

    async def release(self, lease: Lease) -> None:
        self._leases.get(lease.key, {}).pop(lease.id, None)


# KEYS: the key's bucket, its leases. ARGV: requests_per_s (0: no rate limit), burst, max items
# (0: no limit), the request's items, the lease's member, lease TTL (ms). Returns {0, 0} when
# admitted, {1, ms until a token} over the rate, {2, items held} when the items do not fit.
# The items held are summed over the live leases (O(the key's requests in flight), bounded by
# max_concurrent_items) rather than kept in a counter: nothing can drift, an expired lease simply
# stops counting.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_items, items, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local tokens = nil
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
  if tokens < 1 then
    return {1, math.ceil((1 - tokens) * 1000 / rate)}
  end
end
if max_items > 0 and items > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local held = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    held = held + tonumber(string.match(member, '^(%d+):'))
  end
  if held + items > max_items then
    return {2, held}
  end
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if tokens ~= nil then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
return {0, 0}
"""

# KEYS: a key's leases. ARGV: lease TTL (ms), members. XX: only leases still in the set.
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""


def bucket_key(key: str) -> str:
    return f"rmserve:quota:{{{key}}}:bucket"


def leases_key(key: str) -> str:
    return f"rmserve:quota:{{{key}}}:leases"


class RedisLimiter:
    """Distributed mode: the limits in Redis, shared by every gateway."""

    def __init__(self, client: RedisClient, lease_ttl_s: float) -> None:
        self._redis = client
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._acquire = client.register_script(LUA + _ACQUIRE)
        self._renew = client.register_script(LUA + _RENEW)

    async def acquire(self, lease: Lease, quota: Quota) -> None:
        args = [quota.requests_per_s or 0, quota.burst or 0, quota.max_concurrent_items or 0,
                lease.items, lease.member, self._ttl_ms]  # fmt: skip
        reply: Any = await available(
            self._acquire(keys=[bucket_key(lease.key), leases_key(lease.key)], args=args)
        )
        code, value = int(reply[0]), int(reply[1])
        if code == 1:
            raise QuotaExceeded("rate", value / 1000)
        if code == 2:
            raise QuotaExceeded("concurrency", 1.0, value)

    async def renew(self, key: str, leases: Sequence[Lease]) -> None:
        members = [lease.member for lease in leases]
        await available(self._renew(keys=[leases_key(key)], args=[self._ttl_ms, *members]))

    async def release(self, lease: Lease) -> None:
        await available(self._redis.zrem(leases_key(lease.key), lease.member))


class Quotas:
    """What the gateway uses: admit a key's request (429 / 413 / 503) and hold its lease."""

    def __init__(
        self, limiter: Limiter, metrics: Metrics, lease_ttl_s: float, max_lifetime_s: float
    ) -> None:
        self._limiter, self._metrics = limiter, metrics
        self._ttl_s, self._max_lifetime_s = lease_ttl_s, max_lifetime_s
        self._held: set[Lease] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Task[None]] = set()

    async def admit(self, key: str, quota: Quota, items: int) -> Lease:
        """Admit a request of `items` items, or raise the ApiError saying which limit it hit."""
        if not quota.limited:
            return Lease(key, 0)
        limit = quota.max_concurrent_items
        if limit is not None and items > limit:
            self._metrics.quota_rejections.labels("concurrency").inc()
            raise PayloadTooLarge(
                f"{items} items in one request; key {key!r} may have at most {limit} items in "
                "flight at once: split the request",
                param="items",
            )
        lease = Lease(key, items if limit is not None else 0)
        lease.renew_until = time.monotonic() + self._max_lifetime_s
        try:
            await self._limiter.acquire(lease, quota)
        except QuotaExceeded as exc:
            self._metrics.quota_rejections.labels(exc.limit).inc()
            raise _refusal(key, quota, items, exc) from None
        except QueueUnavailableError as exc:
            raise Unavailable(f"the quota store is unreachable: {exc}") from None
        if lease.items:
            lease._quotas = self
            self._held.add(lease)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew())
        return lease

    async def release(self, lease: Lease) -> None:
        self._held.discard(lease)
        try:
            await self._limiter.release(lease)
        except Exception as exc:  # never fail the request for this: the lease expires
            log.warning("cannot release a lease of key %r (%s); it expires", lease.key, exc)

    def release_when(self, lease: Lease, done: Callable[[], Awaitable[object]]) -> None:
        """Release `lease` once `done()` returns (an async batch: once it is done)."""
        if lease not in self._held:
            return
        task = asyncio.create_task(self._release_when(lease, done))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    @staticmethod
    async def _release_when(lease: Lease, done: Callable[[], Awaitable[object]]) -> None:
        try:
            await done()
        except Exception as exc:  # e.g. Redis away for long: the items stop counting now
            log.warning("stopped following a request of key %r: %s", lease.key, exc)
        finally:
            await lease.release()

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl_s / 3)
            now = time.monotonic()
            by_key: dict[str, list[Lease]] = {}
            for lease in list(self._held):
                if lease.renew_until <= now:  # past any deadline: left to expire
                    self._held.discard(lease)
                    log.warning("a lease of key %r outlived max_timeout_s; not renewed", lease.key)
                else:
                    by_key.setdefault(lease.key, []).append(lease)
            for key, leases in by_key.items():
                try:
                    await self._limiter.renew(key, leases)
                except Exception as exc:  # keep renewing the others, and these next time
                    log.warning("cannot renew the leases of key %r: %s", key, exc)

    async def close(self) -> None:
        """Stop renewing and release what is held (a gateway shutting down)."""
        tasks = [*self._waiting, *([self._renewer] if self._renewer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lease in list(self._held):
            with contextlib.suppress(Exception):
                await lease.release()


def _refusal(key: str, quota: Quota, items: int, exc: QuotaExceeded) -> Exception:
    retry_after = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if exc.limit == "rate":
        return RateLimited(
            f"key {key!r} is over its rate limit of {quota.requests_per_s:g} requests/s "
            f"(burst {quota.burst}); retry after {retry_after['Retry-After']} s",
            headers=retry_after,
        )
    return TooManyItemsInFlight(
        f"key {key!r} has {exc.held} items in flight; {items} more would exceed its limit of "
        f"{quota.max_concurrent_items}: retry when some are done",
        param="items",
        headers=retry_after,
    )


class LeasedStream(StreamingResponse):
    """A streamed response that releases its lease once the response is over, however it ends
    (the client may leave before the body is ever iterated)."""

    def __init__(self, content: AsyncIterable[bytes], lease: Lease, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._lease.release()


def quotas_for(
    queue: JobQueue, metrics: Metrics, lease_ttl_s: float, max_lifetime_s: float
) -> Quotas:
    """Quotas kept where the queue is: in its Redis (shared by all gateways) or the process."""
    limiter: Limiter = (
        RedisLimiter(queue.client, lease_ttl_s)
        if isinstance(queue, StreamQueue)
        else MemoryLimiter(lease_ttl_s)
    )
    return Quotas(limiter, metrics, lease_ttl_s, max_lifetime_s)
