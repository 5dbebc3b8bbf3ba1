"""The Redis Streams queue of distributed mode: many gateways and workers share one Redis.

    rmserve:{<model>}:jobs            the shared stream of a model's jobs, consumer group
                                      "workers" (at-least-once delivery): any worker takes them
    rmserve:{<model>}:jobs:<worker>   a worker's own stream (prefix routing): jobs routed to it
    rmserve:{<model>}:streams         set of the model's worker streams (depth and orphans)
    rmserve:{<model>}:workers         the workers' states (service.fleet), read by admission
    rmserve:{<model>}:suspects        orphan streams suspected, and since when (see _ORPHANS)
    rmserve:{<model>}:dead            dead-letter stream: jobs delivered over max_deliveries times
    rmserve:{<model>}:result:<job>    the result, stored (with a TTL) before the job is acknowledged
    rmserve:{<model>}:batch:<id>      stream of an async batch: a header entry, then each result
    rmserve:batch:<id>:model          the model of a batch (its stream's key needs the model)
    rmserve:replies:<gw id>           pub/sub channel of a gateway: workers announce its results

A model's keys share its name as hash tag ({<model>}): one Redis Cluster slot, so the scripts
and transactions of a model never cross slots (the result cache's keys carry it too). Scripts
declare the keys they name; the worker streams they reach through the model's set share the
tag. Keys of different models are never touched together.

A gateway enqueues all jobs of a request in one round trip (a Lua script, atomic across
gateways: all or none, while the backlog summed over the model's streams and its waiting room is
below the capacity: service.queue.base). With fair scheduling (the default) the jobs wait in
the model's waiting room and are released into the streams in the fair scheduler's order as the
workers have room (service.queue.redis_scheduler); with fifo they go straight to the streams.
The gateway waits on its channel; a result announcement it missed (e.g. during a reconnect) is
found by a slow sweep of the result keys, so nothing waits forever.

Routing (`routing="prefix"`): jobs with the same `prefix_key` (a hash of the item's prompt) go
to the same worker, whose engine then computes the shared prompt once (vLLM prefix cache). The
admission script ranks the live ready workers that announced a stream by rendezvous hashing
(highest sha1(prefix_key, worker name) first: stable when workers join or leave) and puts all
jobs of one key of the request into the stream of the first worker whose backlog (pending + lag
of its stream) is below its announced concurrency; when every one is loaded, into the shared
stream (fall back to load: any free worker takes it). Jobs without a key go to the shared
stream. `routing="shared"` puts every job into the shared stream (the behaviour before routing);
`routing="round_robin"` puts each job into the next routable worker's stream in turn (a
benchmark baseline that ignores prompts and load).

Workers read their own stream and the shared stream (alternating which comes first, so neither
starves), up to their free slots, and every `reclaim_every_s` look for orphan streams: the
streams of workers that are not live and ready (withdrawn when draining, stale when killed,
out of service). Every worker reads the orphans' undelivered entries and reclaims their idle
pending entries, and an orphan stream that is empty is deleted (atomically, so that no admission
adds to it meanwhile). Workers keep their in-flight entries fresh (XCLAIM JUSTID) so that nobody
steals long jobs, and reclaim entries of dead consumers (XAUTOCLAIM) of the shared stream, their
own and the orphans once idle longer than `reclaim_idle_s`. A stored result makes a redelivered
job idempotent: it is answered from the store, not scored again. A worker that drains on
shutdown releases the jobs it could not finish (they become reclaimable at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
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
from rmserve.service.queue.redis_scheduler import SCHED, fixed_keys, sched_key
from rmserve.service.redis_cluster import RedisClient, is_cluster, publish_all
from rmserve.service.scheduling import PRIORITIES, STARVATION_S

log = logging.getLogger(__name__)

GROUP = "workers"
# Scripts start with a shebang (Redis 7): in a Cluster, Redis then refuses one that would reach
# a key of another slot, instead of running it on the wrong node.
LUA = "#!lua\n"
T = TypeVar("T")
Routing = Literal["prefix", "round_robin", "shared"]
Entry = tuple[str, str, dict[bytes, bytes]]  # stream, entry id, fields

# Every key a script touches is declared in KEYS (Redis Cluster requires it, e.g. while a slot
# migrates). The worker streams a script reaches through the model's set (or the workers'
# announcements) are passed by the caller as it last knew them; a script that finds one not
# declared touches nothing and returns UNDECLARED followed by every stream it needs, and the
# caller calls again with those.
UNDECLARED = "undeclared"
_DECLARED = """
local declared = {}
for _, key in ipairs(KEYS) do declared[key] = true end
local function undeclared(streams)
  for _, stream in ipairs(streams) do
    if not declared[stream] then
      local needed = {'undeclared'}
      for _, s in ipairs(streams) do needed[#needed + 1] = s end
      return needed
    end
  end
  return nil
end
"""

# The backlog of a stream (what is not finished: undelivered, i.e. lag, or the stream length
# when Redis cannot say, plus delivered but unacknowledged), nil without stream or group.
_BACKLOG = (
    _DECLARED
    + """
local function backlog_of(stream, group)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local field = {}
    for i = 1, #info, 2 do field[info[i]] = info[i + 1] end
    if field['name'] == group then
      return field['pending'] + (field['lag'] or redis.call('XLEN', stream)), field['pending']
    end
  end
  return nil
end
local function ensure_group(stream, group)
  local backlog = backlog_of(stream, group)
  if backlog == nil then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    backlog = redis.call('XLEN', stream)
  end
  return backlog
end
-- The workers that take routed jobs: live (reported within stale_s), ready, with a stream.
local function routable(hash, stale)
  local now = redis.call('TIME')
  now = tonumber(now[1]) + tonumber(now[2]) / 1e6
  local workers, raw = {}, redis.call('HGETALL', hash)
  for i = 1, #raw, 2 do
    local ok, state = pcall(cjson.decode, raw[i + 1])
    if ok and type(state) == 'table' and state['status'] == 'ready'
        and type(state['stream']) == 'string' and type(state['at']) == 'number'
        and now - state['at'] <= stale then
      workers[#workers + 1] = {
        name = raw[i], stream = state['stream'], room = tonumber(state['concurrency']) or 1}
    end
  end
  return workers
end
"""
)

# Routing (prefix, shared, round_robin; see the module docstring) of the jobs of one prompt, as
# a table R: R.route(key, payloads). Needs _BACKLOG. `backlog`: the streams' backlogs as read.
_ROUTER = """
local function ready_room(hash, stale)
  local now = redis.call('TIME')
  now = tonumber(now[1]) + tonumber(now[2]) / 1e6
  local room, raw = 0, redis.call('HGETALL', hash)
  for i = 1, #raw, 2 do
    local ok, state = pcall(cjson.decode, raw[i + 1])
    if ok and type(state) == 'table' and state['status'] == 'ready'
        and type(state['at']) == 'number' and now - state['at'] <= stale then
      room = room + (tonumber(state['concurrency']) or 0)
    end
  end
  return room
end
local function router(shared, hash, set, turn_key, group, maxlen, stale, routing, backlog)
  local R = {routed = {0, 0, 0, 0}, workers = {}}
  if routing ~= 'shared' then R.workers = routable(hash, stale) end
  table.sort(R.workers, function(a, b) return a.name < b.name end)
  local workers = R.workers
  local function add(target, payloads, route)
    if target ~= shared and backlog[target] == nil then
      backlog[target] = ensure_group(target, group)
      redis.call('SADD', set, target)
    end
    for _, payload in ipairs(payloads) do
      redis.call('XADD', target, 'MAXLEN', '~', maxlen, '*', 'job', payload)
    end
    if target ~= shared then backlog[target] = backlog[target] + #payloads end
    R.routed[route] = R.routed[route] + #payloads
  end
  function R.route(key, payloads)
    if routing == 'round_robin' and #workers > 0 then
      -- The baseline that ignores prompts and load: each job to the next worker in turn.
      local turn = redis.call('INCRBY', turn_key, #payloads) - #payloads
      for i, payload in ipairs(payloads) do
        add(workers[(turn + i - 1) % #workers + 1].stream, {payload}, 4)
      end
      return
    end
    if routing ~= 'prefix' or key == '' or #workers == 0 then
      add(shared, payloads, 3)
      return
    end
    local ranked = {}
    for _, w in ipairs(workers) do
      local weight = tonumber(string.sub(redis.sha1hex(key .. '\\n' .. w.name), 1, 12), 16)
      ranked[#ranked + 1] = {weight = weight, worker = w}
    end
    table.sort(ranked, function(a, b)
      if a.weight ~= b.weight then return a.weight > b.weight end
      return a.worker.name < b.worker.name
    end)
    for rank, r in ipairs(ranked) do
      if (backlog[r.worker.stream] or 0) < r.worker.room then
        add(r.worker.stream, payloads, rank == 1 and 1 or 2)
        return
      end
    end
    add(shared, payloads, 2)
  end
  return R
end
-- Bundles from the waiting room into the streams, in the scheduler's order, while `have` (jobs
-- in the streams, as the caller counts them) is below `target`.
local function release(S, R, have, target, now)
  sched_age(S, now)
  local released = 0
  while have < target do
    local id, meta = sched_next(S)
    if id == nil then break end
    R.route(meta.k, sched_take(S, id, meta))
    have, released = have + meta.n, released + meta.n
  end
  return released
end
local function redis_now()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1e6
end
"""

# Admission and enqueue of a request's jobs in one round trip, atomic across gateways. Creates
# streams and groups when missing (also after Redis lost its data). KEYS: the shared stream, the
# workers hash, the set of worker streams, the round-robin turn, the scheduler's fixed keys
# (redis_scheduler.fixed_keys), then the dynamic ones: worker streams (in the set, and of
# routable workers) and the scheduler's wait keys (see UNDECLARED). ARGV: group, capacity,
# MAXLEN ~ bound, stale_s, routing, scheduling (fair or fifo), the model's key prefix,
# starvation_s, the jobs' tenant, class (level), weight, then each job's prefix key ('' for
# none), deadline and payload. With fair scheduling the jobs wait in the waiting room as
# bundles (one per prefix key; a job without one is a bundle of its own), and as many as the
# ready workers' room allows are released into the streams at once; with fifo they go straight
# to the streams. Returns {backlog before the jobs (streams and waiting room), or -1 when they
# do not fit (nothing is added); jobs routed by affinity (first choice), by fallback (another
# worker, or the shared stream as all were loaded), to the shared stream, in turn
# (round_robin)}.
_ADMIT = (
    _BACKLOG
    + SCHED
    + _ROUTER
    + """
local shared, hash, set, turn_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, capacity, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local stale, routing, fair = tonumber(ARGV[4]), ARGV[5], ARGV[6] == 'fair'
local S = sched_of(ARGV[7], tonumber(ARGV[8]))
local tenant, level, weight = ARGV[9], tonumber(ARGV[10]), ARGV[11]
local FIRST = 12
local jobs = (#ARGV - FIRST + 1) / 3
local workers = {}
if routing ~= 'shared' then workers = routable(hash, stale) end
local members = redis.call('SMEMBERS', set)
local needed = {}
for _, stream in ipairs(members) do needed[#needed + 1] = stream end
for _, w in ipairs(workers) do needed[#needed + 1] = w.stream end
if fair then
  for _, key in ipairs(sched_needs(S, {tenant})) do needed[#needed + 1] = key end
end
local missing = undeclared(needed)
if missing then return missing end
local total = ensure_group(shared, group)
local backlog = {}
for _, stream in ipairs(members) do
  local b = backlog_of(stream, group)
  backlog[stream] = b
  total = total + (b or 0)
end
local waiting = 0
if fair then waiting = sched_waiting(S) end
if total + waiting >= capacity then
  return {-1, 0, 0, 0, 0}
end
local order, by_key = {}, {}
for i = 0, jobs - 1 do
  local key = ARGV[FIRST + 3 * i]
  local group_key = key
  if fair and key == '' then group_key = '\\0' .. i end  -- a bundle of its own
  if by_key[group_key] == nil then
    by_key[group_key] = {key = key, deadline = tonumber(ARGV[FIRST + 3 * i + 1]), payloads = {}}
    order[#order + 1] = group_key
  end
  local bundle = by_key[group_key]
  bundle.deadline = math.min(bundle.deadline, tonumber(ARGV[FIRST + 3 * i + 1]))
  table.insert(bundle.payloads, ARGV[FIRST + 3 * i + 2])
end
local R = router(shared, hash, set, turn_key, group, maxlen, stale, routing, backlog)
if fair then
  local now = redis_now()
  for _, k in ipairs(order) do
    local b = by_key[k]
    sched_add(S, b.payloads, tenant, level, weight, b.deadline, b.key, now)
  end
  release(S, R, total, ready_room(hash, stale), now)
else
  for _, k in ipairs(order) do R.route(by_key[k].key, by_key[k].payloads) end
end
return {total + waiting, R.routed[1], R.routed[2], R.routed[3], R.routed[4]}
"""
)

# A worker about to read: release bundles from the waiting room until the undelivered jobs of
# the streams it reads cover its free slots. KEYS and ARGV as _ADMIT's up to the jobs' tenant
# (ARGV[9] is the caller's own stream, '' for none; ARGV[10] its free slots). Returns the jobs
# released by route, as _ADMIT's.
_RELEASE = (
    _BACKLOG
    + SCHED
    + _ROUTER
    + """
local shared, hash, set, turn_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, maxlen = ARGV[1], ARGV[3]
local stale, routing = tonumber(ARGV[4]), ARGV[5]
local S = sched_of(ARGV[7], tonumber(ARGV[8]))
local own, want = ARGV[9], tonumber(ARGV[10])
if sched_waiting(S) <= 0 then return {0, 0, 0, 0} end
local workers = {}
if routing ~= 'shared' then workers = routable(hash, stale) end
local members = redis.call('SMEMBERS', set)
local needed = {}
for _, stream in ipairs(members) do needed[#needed + 1] = stream end
for _, w in ipairs(workers) do needed[#needed + 1] = w.stream end
for _, key in ipairs(sched_needs(S, {})) do needed[#needed + 1] = key end
local missing = undeclared(needed)
if missing then return missing end
local backlog = {}
for _, stream in ipairs(members) do backlog[stream] = backlog_of(stream, group) end
local lag = 0
for _, stream in ipairs({shared, own}) do
  if stream ~= '' then
    local b, held = backlog_of(stream, group)
    if b ~= nil then lag = lag + b - held end
  end
end
local R = router(shared, hash, set, turn_key, group, maxlen, stale, routing, backlog)
release(S, R, lag, want, redis_now())
return R.routed
"""
)

# A worker's look for orphan streams. KEYS: the workers hash, the set of worker streams, the hash of
# suspected orphans, then worker streams (those in the set, see UNDECLARED). ARGV: group, stale_s,
# the caller's own stream (never an orphan to itself). Returns the orphans that hold entries (read
# and reclaimed by all). A stream whose worker is not routable is only suspected at first: it is
# deleted, if empty, once its worker's announcement has stayed the same for stale_s more (by Redis
# time) since the suspicion began. After a Redis stall every announcement is stale, but live workers
# announce again within a heartbeat, so their streams are never deleted under them (no admission
# adds to a suspect: its worker is not routable, by the same test).
_ORPHANS = (
    _BACKLOG
    + """
local hash, set, suspects = KEYS[1], KEYS[2], KEYS[3]
local group, stale = ARGV[1], tonumber(ARGV[2])
local members = redis.call('SMEMBERS', set)
local missing = undeclared(members)
if missing then return missing end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local owned = {[ARGV[3]] = true}
for _, w in ipairs(routable(hash, stale)) do owned[w.stream] = true end
local announced = {}
local raw = redis.call('HGETALL', hash)
for i = 1, #raw, 2 do
  local ok, state = pcall(cjson.decode, raw[i + 1])
  if ok and type(state) == 'table' and type(state['stream']) == 'string' then
    announced[state['stream']] = tostring(state['at']) .. '/' .. tostring(state['status'])
  end
end
local orphans = {}
for _, stream in ipairs(members) do
  if owned[stream] then
    redis.call('HDEL', suspects, stream)
  elseif redis.call('EXISTS', stream) == 0 then
    redis.call('SREM', set, stream)
    redis.call('HDEL', suspects, stream)
  else
    local seen = announced[stream] or 'none'
    local suspect = redis.call('HGET', suspects, stream)
    local since = nil
    if suspect then
      local sep = string.find(suspect, ' ', 1, true)
      if string.sub(suspect, sep + 1) == seen then
        since = tonumber(string.sub(suspect, 1, sep - 1))
      end
    end
    if since == nil then
      redis.call('HSET', suspects, stream, tostring(now) .. ' ' .. seen)
      since = now
    end
    if ensure_group(stream, group) == 0 then
      if now - since >= stale then
        redis.call('DEL', stream)
        redis.call('SREM', set, stream)
        redis.call('HDEL', suspects, stream)
      end
    else
      orphans[#orphans + 1] = stream
    end
  end
end
return orphans
"""
)

# Undelivered entries of several streams, in order, up to a total count (XREADGROUP with
# several streams takes COUNT from each). KEYS: the streams. ARGV: group, consumer, count,
# how many leading streams must have the group (else the error is returned: NOGROUP recovery);
# later ones (orphans, which may vanish) are skipped when they fail.
_READ = """
local group, consumer = ARGV[1], ARGV[2]
local count, required = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i, stream in ipairs(KEYS) do
  if count <= 0 then break end
  local reply = redis.pcall(
    'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, '>')
  if type(reply) == 'table' and reply['err'] then
    if i <= required then return reply end
  elseif reply then
    local entries = reply[1][2]
    count = count - #entries
    out[#out + 1] = {stream, entries}
  end
end
return out
"""

# The backlog summed over the shared stream, the worker streams and the waiting room (lag).
# KEYS: the shared stream, the set of worker streams, the scheduler's hash, then worker streams
# (those in the set, see UNDECLARED). ARGV: group. Returns {pending, lag}.
_DEPTH = (
    _BACKLOG
    + """
local pending, lag = 0, tonumber(redis.call('HGET', KEYS[3], 'waiting') or '0')
local streams = redis.call('SMEMBERS', KEYS[2])
local missing = undeclared(streams)
if missing then return missing end
table.insert(streams, 1, KEYS[1])
for _, stream in ipairs(streams) do
  local backlog, held = backlog_of(stream, ARGV[1])
  if backlog ~= nil then
    pending = pending + held
    lag = lag + backlog - held
  end
end
return {pending, lag}
"""
)


@dataclass(frozen=True)
class StreamSettings:
    capacity: int = 100_000
    max_deliveries: int = 3
    reclaim_idle_s: float = 60.0
    result_ttl_s: float = 3600.0
    # How often a waiting gateway checks the result store for announcements it missed.
    sweep_s: float = 2.0
    # prefix: jobs with a prefix key go to a worker's own stream (see the module docstring);
    # shared: all jobs to the shared stream.
    routing: Routing = "prefix"
    # A worker that has not reported its state for this long is gone (service.fleet.STALE_S).
    stale_s: float = 10.0
    # fair: jobs wait in the model's waiting room and go to the streams in the order of
    # service.scheduling (redis_scheduler); fifo: straight to the streams, in arrival order.
    scheduling: Literal["fair", "fifo"] = "fair"
    starvation_s: float = STARVATION_S
    # Admission waits for this many replicas to have the jobs (WAIT), at most wait_timeout_s.
    wait_replicas: int = 0
    wait_timeout_s: float = 1.0

    @property
    def reclaim_every_s(self) -> float:
        """How often a worker looks for jobs to reclaim (dead consumers', released ones) and
        for orphan streams."""
        return min(self.reclaim_idle_s / 2, 5.0)


# Every key of a model carries the model's name as its hash tag ({...}): a model's keys share
# one Redis Cluster slot, so its scripts and transactions never cross slots.


def model_prefix(model: str) -> str:
    return f"rmserve:{{{model}}}"


def jobs_key(model: str) -> str:
    return f"{model_prefix(model)}:jobs"


def worker_stream_key(model: str, worker: str) -> str:
    return f"{model_prefix(model)}:jobs:{worker}"


def streams_key(model: str) -> str:
    return f"{model_prefix(model)}:streams"


def workers_key(model: str) -> str:
    return f"{model_prefix(model)}:workers"


def turn_key(model: str) -> str:
    """The round-robin turn of a model's workers."""
    return f"{model_prefix(model)}:turn"


def suspects_key(model: str) -> str:
    return f"{model_prefix(model)}:suspects"


def dead_key(model: str) -> str:
    return f"{model_prefix(model)}:dead"


def result_key(model: str, job_id: str) -> str:
    return f"{model_prefix(model)}:result:{job_id}"


def batch_key(model: str, batch_id: str) -> str:
    return f"{model_prefix(model)}:batch:{batch_id}"


def batch_model_key(batch_id: str) -> str:
    """Which model a batch is of (its stream's key needs the model's tag)."""
    return f"rmserve:batch:{batch_id}:model"


class StreamQueue:
    def __init__(
        self,
        client: RedisClient,
        settings: StreamSettings,
        name: str | None = None,
        events: QueueEvents | None = None,
    ) -> None:
        if settings.wait_replicas and is_cluster(client):
            raise ValueError(
                "wait_replicas (RMSERVE_REDIS_WAIT_REPLICAS) is not supported on a Redis Cluster"
            )
        self._redis = client
        self._events = events or NoEvents()
        self._settings = settings
        self.name = name or f"rmserve-{uuid.uuid4().hex[:12]}"
        self._channel = f"rmserve:replies:{self.name}"
        self._groups: set[str] = set()
        self._inboxes = Inboxes()
        self._model_of: dict[str, str] = {}  # job id -> model, of the jobs waited for here
        self._listener: asyncio.Task[None] | None = None
        self._in_flight: dict[str, dict[str, str]] = {}  # stream -> entry id -> job id
        self._early: dict[str, list[Job]] = {}  # model -> delivered beyond a fetch's count
        self._orphans: dict[str, list[str]] = {}  # model -> streams of workers gone
        self._streams: dict[str, list[str]] = {}  # model -> worker streams, as last known
        self._turn = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_reclaim = 0.0
        self._admit = client.register_script(LUA + _ADMIT)
        self._release = client.register_script(LUA + _RELEASE)
        self._find_orphans = client.register_script(LUA + _ORPHANS)
        self._read = client.register_script(LUA + _READ)
        self._depth = client.register_script(LUA + _DEPTH)

    @property
    def client(self) -> RedisClient:
        return self._redis

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: StreamSettings,
        name: str | None = None,
        events: QueueEvents | None = None,
        cluster: bool = False,
    ) -> StreamQueue:
        """A queue on its own client (tests, benchmarks); `cluster`: a Redis Cluster client,
        `url` naming any node."""
        options: dict[str, Any] = {
            "socket_connect_timeout": 2,
            "socket_timeout": None,
            "health_check_interval": 10,
        }
        client: RedisClient = (
            RedisCluster.from_url(url, **options)
            if cluster
            else aioredis.Redis.from_url(url, **options)
        )
        return cls(client, settings, name, events)

    def own_stream(self, model: str) -> str | None:
        """The stream of jobs routed to this worker (None: shared routing, no own stream)."""
        routed = self._settings.routing != "shared"
        return worker_stream_key(model, self.name) if routed else None

    # -- gateway side ------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        model = jobs[0].model
        # Jobs of an async batch are recorded in the batch by the worker; nobody waits here.
        waited = [job.id for job in jobs if job.batch is None and job.cohort_channels is None]
        if waited:
            self._ensure_listener()
            self._open(model, waited)  # before the jobs exist: no result can be missed
        keyed: list[str | float] = []
        for job in jobs:
            keyed.append(job.prefix_key or "")
            keyed.append(job.deadline)
            keyed.append(
                job.model_copy(
                    update={"reply_to": self._channel if job.id in waited else None}
                ).model_dump_json()
            )
        settings = self._settings
        first = jobs[0]  # a request's jobs share their tenancy (service.tenants)

        # With wait_replicas, WAIT on the same connection, right after: when it returns, the
        # replicas have every write up to the jobs (the replication stream is ordered). Without,
        # the script alone (a Redis Cluster has no wait_replicas, and its pipelines do not load
        # a script a node lacks).
        async def admit(dynamic: list[str]) -> list[Any]:
            keys = [*self._fixed_keys(model), *dynamic]
            args: list[Any] = [
                *self._script_args(model),
                first.tenant,
                PRIORITIES.index(first.priority),
                first.weight,
                *keyed,
            ]
            if not settings.wait_replicas:
                return [await available(self._admit(keys=keys, args=args))]
            assert isinstance(self._redis, aioredis.Redis)  # no wait_replicas on a cluster
            pipe = self._redis.pipeline(transaction=False)
            await self._admit(keys=keys, args=args, client=pipe)
            pipe.wait(settings.wait_replicas, int(settings.wait_timeout_s * 1000))
            replies: list[Any] = await available(pipe.execute())
            return replies

        try:
            replies = await self._declaring(model, admit)
        except QueueUnavailableError:
            self._forget(waited)
            raise
        backlog, affinity, fallback, shared, turns = (int(n) for n in replies[0])
        if backlog < 0:
            self._forget(waited)
            raise QueueFullError(model, retry_after_s=max(1, int(settings.sweep_s)))
        if settings.wait_replicas and int(replies[1]) < settings.wait_replicas:
            self._forget(waited)
            raise QueueUnavailableError(
                f"only {int(replies[1])} of the {settings.wait_replicas} Redis replicas "
                f"required (RMSERVE_REDIS_WAIT_REPLICAS) confirmed the jobs within "
                f"{settings.wait_timeout_s:g} s; they may still be scored"
            )
        self._count_routes(model, [affinity, fallback, shared, turns])

    def _count_routes(self, model: str, routed: list[int]) -> None:
        """Jobs put into the streams by route (affinity, fallback, shared, round_robin)."""
        for route, n in zip(("affinity", "fallback", "shared", "round_robin"), routed, strict=True):
            if n:
                self._events.routed(model, route, n)

    def results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        return self._results(job_ids, deadline)

    async def _results(
        self, job_ids: Sequence[str], deadline: float
    ) -> AsyncGenerator[tuple[str, ItemResult], None]:
        model = self._model_of.get(job_ids[0]) if job_ids else None
        try:
            async for delivery in self._inboxes.wait(
                job_ids, deadline, functools.partial(self._stored, model), self._settings.sweep_s
            ):
                yield delivery
        finally:
            self._forget(job_ids)

    def _open(self, model: str, job_ids: Sequence[str]) -> None:
        """Wait for these jobs of `model` (the result keys carry the model's tag)."""
        self._inboxes.open(job_ids)
        self._model_of.update(dict.fromkeys(job_ids, model))

    def _forget(self, job_ids: Sequence[str]) -> None:
        self._inboxes.discard(job_ids)
        for job_id in job_ids:
            self._model_of.pop(job_id, None)

    @property
    def reply_channel(self) -> str | None:
        return self._channel

    def watch(self, model: str, job_ids: Sequence[str]) -> None:
        self._ensure_listener()
        self._open(model, job_ids)

    async def post(
        self, model: str, job_id: str, result: ItemResult, channels: Sequence[str]
    ) -> None:
        body = json.dumps(result.model_dump(mode="json"))
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(result_key(model, job_id), body, ex=int(self._settings.result_ttl_s), nx=True)
        await self._execute_and_announce(pipe, job_id, body, channels)

    async def _execute_and_announce(
        self, pipe: Any, job_id: str, body: str, channels: Sequence[str]
    ) -> None:
        """Run the transaction `pipe` (keys of the model's slot) and announce the result on
        `channels`: in the same MULTI on a single server; after EXEC on a Redis Cluster, whose
        client keeps PUBLISH out of a transaction (a channel is no key of the slot). A crash in
        between loses only the announcement: the waiter's sweep finds the stored result."""
        messages = [(c, f'{{"job_id":{json.dumps(job_id)},"result":{body}}}') for c in channels]
        if is_cluster(self._redis):
            await available(pipe.execute())
            await available(publish_all(self._redis, messages))
            return
        for channel, message in messages:
            pipe.publish(channel, message)
        await available(pipe.execute())

    async def _stored(self, model: str | None, job_ids: list[str]) -> list[tuple[str, ItemResult]]:
        if model is None:
            return []
        with contextlib.suppress(QueueUnavailableError):
            values = await available(self._redis.mget([result_key(model, j) for j in job_ids]))
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

    def _fixed_keys(self, model: str) -> list[str]:
        """The keys _ADMIT and _RELEASE declare before the dynamic ones."""
        fixed = [jobs_key(model), workers_key(model), streams_key(model), turn_key(model)]
        return [*fixed, *fixed_keys(model_prefix(model))]

    def _script_args(self, model: str) -> list[Any]:
        """The arguments _ADMIT and _RELEASE share (up to the jobs' tenant)."""
        settings = self._settings
        return [
            GROUP,
            settings.capacity,
            settings.capacity * 4,
            settings.stale_s,
            settings.routing,
            settings.scheduling,
            model_prefix(model),
            settings.starvation_s,
        ]

    async def _release_waiting(self, model: str, want: int) -> None:
        """Before reading: jobs from the waiting room into the streams (fair scheduling), so
        that the undelivered jobs of the streams this worker reads cover its free slots.
        Whatever this worker's own setting: a gateway's decides where jobs wait."""
        own = self.own_stream(model) or ""

        async def release(dynamic: list[str]) -> list[Any]:
            keys = [*self._fixed_keys(model), *dynamic]
            args = [*self._script_args(model), own, want]
            return [await available(self._release(keys=keys, args=args))]

        routed = (await self._declaring(model, release))[0]
        self._count_routes(model, [int(n) for n in routed])

    def _primary(self, model: str) -> list[str]:
        """The streams this worker always reads: its own (prefix routing) and the shared one,
        first one then the other in turn, so that neither starves the other."""
        own = self.own_stream(model)
        if own is None:
            return [jobs_key(model)]
        self._turn += 1
        return [own, jobs_key(model)] if self._turn % 2 else [jobs_key(model), own]

    async def fetch(self, model: str, max_jobs: int, wait_s: float) -> list[Job]:
        await self._ensure_group(model)
        self._ensure_heartbeat()
        early = self._early.get(model, [])
        if early:  # delivered to this worker beyond an earlier fetch's count
            taken, self._early[model] = early[:max_jobs], early[max_jobs:]
            return taken
        reclaimed: list[Job] = []
        fresh: list[Entry] = []
        primary = self._primary(model)
        try:
            if time.monotonic() - self._last_reclaim > self._settings.reclaim_every_s:
                self._last_reclaim = time.monotonic()
                await self._look_for_orphans(model)
                again = await self._accept_redelivered(model, await self._reclaim(model, max_jobs))
                # Of the jobs whose worker died holding them, the one delivered the fewest
                # times first: a poison job that killed each worker it reached waits while the
                # innocent jobs that died beside it are scored, each alone, and then runs out
                # its deliveries alone.
                redelivered = [job for job in again if job.deliveries > 1]
                suspect = min(redelivered, key=lambda job: job.deliveries, default=None)
                if suspect is not None:
                    self._events.redelivered(model)
                    return await self._alone(suspect, again)
                reclaimed = again
                for _ in reclaimed:
                    self._events.redelivered(model)
            streams = primary + self._orphans.get(model, [])
            if len(reclaimed) < max_jobs:
                await self._release_waiting(model, max_jobs - len(reclaimed))
                fresh = _entries(
                    await available(
                        self._read(
                            keys=streams,
                            args=[GROUP, self.name, max_jobs - len(reclaimed), len(primary)],
                        )
                    )
                )
            if not reclaimed and not fresh and wait_s > 0:
                response: Any = await available(
                    self._redis.xreadgroup(
                        GROUP,
                        self.name,
                        dict.fromkeys(primary, ">"),
                        count=max_jobs,
                        block=max(1, int(wait_s * 1000)),
                    )
                )
                fresh = _entries(response)
        except ResponseError as exc:
            if not _gone(exc):
                raise
            log.warning(
                "a stream or consumer group of %s is gone (%s: another worker took this one "
                "for stopped, or Redis lost data); recreating it",
                model,
                exc,
            )
            self._groups.discard(model)  # recreated by the next fetch
        # A first delivery has no stored result and a delivery count of 1: nothing to check.
        jobs = reclaimed + self._take(fresh)
        if len(jobs) > max_jobs:  # a blocking read of several streams took COUNT from each
            self._early[model] = jobs[max_jobs:]
        return jobs[:max_jobs]

    async def _alone(self, suspect: Job, reclaimed: list[Job]) -> list[Job]:
        """Hand out a job whose worker died holding it, alone: if it is what killed that worker
        (a poison job), the next crash takes no other job with it, so only the poison reaches
        the dead-letter stream. The others reclaimed with it go back, their delivery undone,
        and the next fetch reclaims again at once."""
        await self.release([job for job in reclaimed if job is not suspect])
        self._last_reclaim = 0.0
        log.info(
            "job %s of %s was delivered %d times (a worker died holding it): scoring it alone",
            suspect.id,
            suspect.model,
            suspect.deliveries,
        )
        return [suspect]

    def _take(self, entries: list[Entry]) -> list[Job]:
        return self._hold([_parse(*entry) for entry in entries])

    def _hold(self, jobs: list[Job]) -> list[Job]:
        """Jobs this worker now holds: renewed by the heartbeat until finished or released."""
        for job in jobs:
            stream, entry_id = _receipt(job)
            self._in_flight.setdefault(stream, {})[entry_id] = job.id
        return jobs

    async def _declaring(
        self, model: str, call: Callable[[list[str]], Awaitable[list[Any]]]
    ) -> list[Any]:
        """Run `call` (replies whose first is a script's) with the worker streams of `model`
        declared as last known, again with the streams the script needs while it names some
        not declared (UNDECLARED). Workers come and go rarely: one call, seldom two."""
        for _ in range(8):
            replies = await call(self._streams.get(model, []))
            reply = replies[0]
            if not (isinstance(reply, list) and reply and as_text(reply[0]) == UNDECLARED):
                return replies
            self._streams[model] = sorted({as_text(stream) for stream in reply[1:]})
        raise QueueUnavailableError(
            f"the worker streams of {model} changed on each of 8 attempts to declare them"
        )

    async def _look_for_orphans(self, model: str) -> None:
        """The streams of workers that are gone (or not ready): read and reclaimed by all."""

        async def look(streams: list[str]) -> list[Any]:
            reply = await available(
                self._find_orphans(
                    keys=[workers_key(model), streams_key(model), suspects_key(model), *streams],
                    args=[GROUP, self._settings.stale_s, self.own_stream(model) or ""],
                )
            )
            return [reply]

        orphans: list[Any] = (await self._declaring(model, look))[0]
        found = sorted(as_text(stream) for stream in orphans)
        if set(found) - set(self._orphans.get(model, [])):
            log.warning("taking over the jobs of stopped workers of %s: %s", model, found)
        self._orphans[model] = found

    async def _reclaim(self, model: str, max_jobs: int) -> list[Entry]:
        idle_ms = int(self._settings.reclaim_idle_s * 1000)
        own = self.own_stream(model)
        claimed: list[Entry] = []
        streams = [jobs_key(model), *([own] if own else []), *self._orphans.get(model, [])]
        for stream in streams:
            if len(claimed) >= max_jobs:
                break
            try:
                reply: Any = await available(
                    self._redis.xautoclaim(
                        stream, GROUP, self.name, idle_ms, "0-0", max_jobs - len(claimed)
                    )
                )
            except ResponseError as exc:  # an orphan deleted meanwhile
                if "NOGROUP" not in str(exc) or stream in (jobs_key(model), own):
                    raise
                continue
            claimed += [
                (stream, as_text(entry_id), fields) for entry_id, fields in reply[1] if fields
            ]
        if claimed:
            log.info("reclaimed %d jobs of %s from stopped consumers", len(claimed), model)
        for stream in streams[: 2 if own else 1]:
            await self._forget_dead_consumers(stream)
        return claimed

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Remove consumers that hold nothing and have been silent for long (crashed workers
        leave their names behind), so the group does not grow without bound."""
        idle_ms = int(max(3600.0, 10 * self._settings.reclaim_idle_s) * 1000)
        for consumer in await self._consumers(stream):
            name = as_text(consumer["name"])
            if name != self.name and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await available(self._redis.xgroup_delconsumer(stream, GROUP, name))

    async def _consumers(self, stream: str) -> list[Any]:
        """The consumers of the group on `stream`; none when the stream is gone (another
        worker removed it as an empty orphan while this one was slow to report, or Redis lost
        it): the next read meets NOGROUP and recreates it."""
        try:
            consumers: Any = await available(self._redis.xinfo_consumers(stream, GROUP))
        except ResponseError as exc:
            if "no such key" not in str(exc) and "NOGROUP" not in str(exc):
                raise
            return []
        return list(consumers)

    async def _accept_redelivered(self, model: str, entries: list[Entry]) -> list[Job]:
        """Jobs to score again; entries past max_deliveries go to the dead-letter stream,
        entries with a stored result (a crash after the store) are answered from it."""
        if not entries:
            return []
        counts: dict[tuple[str, str], int] = {}
        by_stream: dict[str, list[str]] = defaultdict(list)
        for stream, entry_id, _ in entries:
            by_stream[stream].append(entry_id)
        for stream, entry_ids in by_stream.items():
            counts.update(await self._delivery_counts(stream, entry_ids))
        parsed = [_parse(*entry) for entry in entries]
        stored_results: list[Any] = await available(
            self._redis.mget([result_key(model, job.id) for job in parsed])
        )
        jobs: list[Job] = []
        for (stream, entry_id, fields), job, stored in zip(
            entries, parsed, stored_results, strict=True
        ):
            deliveries = counts.get((stream, entry_id), 1)
            if stored is not None:  # already recorded in its batch, if any
                self._events.redelivered(model)
                await self._finish(job, ItemResult.model_validate_json(stored), record=False)
            elif deliveries > self._settings.max_deliveries:
                self._events.redelivered(model)
                await self._dead_letter(job, fields[b"job"], deliveries)
            else:
                jobs += self._hold([job.model_copy(update={"deliveries": deliveries})])
        return jobs

    async def _delivery_counts(
        self, stream: str, entry_ids: list[str]
    ) -> dict[tuple[str, str], int]:
        pending: Any = await available(
            self._redis.xpending_range(
                stream,
                GROUP,
                min(entry_ids, key=_order),
                max(entry_ids, key=_order),
                len(entry_ids) + len(self._in_flight.get(stream, {})),
                consumername=self.name,
            )
        )
        return {(stream, as_text(p["message_id"])): int(p["times_delivered"]) for p in pending}

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
        stream, entry_id = _receipt(job)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(result_key(job.model, job.id), body, ex=int(self._settings.result_ttl_s))
        if record and job.batch is not None:  # NOMKSTREAM: an expired batch stays gone
            pipe.xadd(batch_key(job.model, job.batch), {"result": body}, nomkstream=True)
        pipe.xack(stream, GROUP, entry_id)
        channels = [job.reply_to] if job.reply_to else job.cohort_channels or []
        try:
            await self._execute_and_announce(pipe, job.id, body, channels)
        finally:  # stored, or (Redis gone) left to be reclaimed once idle: no more renewals
            self._in_flight.get(stream, {}).pop(entry_id, None)
        self._events.acked(job.model)

    async def complete(self, job: Job, result: ItemResult) -> None:
        await self._finish(job, result)

    async def release(self, jobs: Sequence[Job]) -> None:
        """Give up jobs without a result (a draining worker): they look idle for long, so the
        next worker to look for jobs to reclaim takes them. Their delivery is undone (the count
        set back by one): a job handed back was not a job its worker died with."""
        idle_ms = int(self._settings.reclaim_idle_s * 1000) * 10
        by_stream: dict[str, list[str]] = defaultdict(list)
        for job in jobs:
            if job.receipt:
                stream, entry_id = _receipt(job)
                by_stream[stream].append(entry_id)
        for stream, entry_ids in by_stream.items():
            counts = await self._delivery_counts(stream, entry_ids)
            by_count: dict[int, list[Any]] = defaultdict(list)
            for entry_id in entry_ids:
                self._in_flight.get(stream, {}).pop(entry_id, None)
                by_count[max(0, counts.get((stream, entry_id), 1) - 1)].append(entry_id)
            for before, receipts in by_count.items():
                await available(
                    self._redis.xclaim(
                        stream,
                        GROUP,
                        self.name,
                        0,
                        receipts,
                        idle=idle_ms,
                        retrycount=before,
                        justid=True,
                    )
                )

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._keep_in_flight_fresh())

    async def _keep_in_flight_fresh(self) -> None:
        """Reset the idle time of in-flight entries so that no one reclaims a long job."""
        while True:
            await asyncio.sleep(self._settings.reclaim_idle_s / 3)
            for stream, receipts in list(self._in_flight.items()):
                if receipts:
                    with contextlib.suppress(QueueUnavailableError):
                        await available(
                            self._redis.xclaim(
                                stream, GROUP, self.name, 0, list(receipts), justid=True
                            )
                        )

    # -- both --------------------------------------------------------------------------------

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups:
            return
        own = self.own_stream(model)
        for stream in [jobs_key(model), *([own] if own else [])]:
            try:
                await available(self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True))
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        if own:
            await available(self._redis.sadd(streams_key(model), own))
        self._groups.add(model)

    async def depth(self, model: str) -> Depth:
        """Summed over the shared stream and the worker streams."""

        async def depth(streams: list[str]) -> list[Any]:
            keys = [jobs_key(model), streams_key(model), sched_key(model_prefix(model)), *streams]
            return [await available(self._depth(keys=keys, args=[GROUP]))]

        reply = (await self._declaring(model, depth))[0]
        return Depth(pending=int(reply[0]), lag=int(reply[1]))

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
        if self._heartbeat is not None:  # a worker: hand back what it holds, leave the groups
            with contextlib.suppress(QueueUnavailableError, ResponseError):
                early = [job for jobs in self._early.values() for job in jobs]
                self._early.clear()
                await self.release(early)
                for model in self._groups:
                    await self._leave_group(model)
        await self._redis.aclose()

    async def _leave_group(self, model: str) -> None:
        own = self.own_stream(model)
        for stream in [jobs_key(model), *([own] if own else [])]:
            for consumer in await self._consumers(stream):
                if as_text(consumer["name"]) == self.name and consumer["pending"] == 0:
                    await available(self._redis.xgroup_delconsumer(stream, GROUP, self.name))


def _gone(exc: ResponseError) -> bool:
    """A stream or its group was deleted: NOGROUP, or a blocked read on a deleted stream."""
    text = str(exc)
    return "NOGROUP" in text or "UNBLOCKED" in text or "no such key" in text


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


def _entries(response: Any) -> list[Entry]:
    """(stream, id, fields) of an XREADGROUP reply, or of the _READ script's (flat fields)."""
    entries: list[Entry] = []
    for stream, stream_entries in response or []:
        for entry_id, fields in stream_entries:
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            entries.append((as_text(stream), as_text(entry_id), fields))
    return entries


def _receipt(job: Job) -> tuple[str, str]:
    """The stream and entry id a job was delivered from ("<entry id> <stream>")."""
    entry_id, _, stream = (job.receipt or "0-0").partition(" ")
    return stream or jobs_key(job.model), entry_id


def _parse(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Job:
    job = Job.model_validate_json(fields[b"job"])
    return job.model_copy(update={"receipt": f"{entry_id} {stream}"})
