"""Distributed mode: which workers serve each model, and in what state.

Every worker writes its state into the hash `rmserve:{<model>}:workers` (field: its consumer name;
value: JSON status, reason, time and, with prefix routing, its own stream and concurrency, by
which the gateways' admission routes jobs: service.queue.redis_streams) every HEARTBEAT_S;
every gateway reads the hashes every REFRESH_S into its ModelDirectory, so requests are checked
against memory, not Redis. Times are Redis server time (no clock skew between machines). A
worker silent for STALE_S is gone: the gateway drops its entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from rmserve.service.directory import ModelDirectory
from rmserve.service.protocol import ModelStatus
from rmserve.service.queue.base import QueueUnavailableError
from rmserve.service.queue.redis_streams import available, workers_key
from rmserve.service.redis_cluster import RedisClient

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
STALE_S = 10.0
REFRESH_S = 1.0

__all__ = ["WorkerAnnouncer", "model_state", "watch_workers", "workers_key"]


async def _redis_time(client: RedisClient, model: str) -> float:
    """Redis' clock; on a Redis Cluster, that of the node holding `model`'s keys, the clock the
    admission script reads there (the nodes' clocks may differ a little)."""
    node = None
    if isinstance(client, RedisCluster):
        await available(client.initialize())  # the slot map (once)
        with contextlib.suppress(RedisClusterException):  # a slot unknown for now: any node
            node = client.get_node_from_key(workers_key(model))
    if node is not None:
        seconds, micros = await available(client.time(target_nodes=node))
    else:
        seconds, micros = await available(client.time())
    return float(seconds) + micros / 1e6


class WorkerAnnouncer:
    """The worker side: publishes this worker's state until withdrawn."""

    def __init__(self, client: RedisClient, model: str, worker: str) -> None:
        self._redis, self.model, self.worker = client, model, worker
        self.status: ModelStatus = "loading"
        self.reason: str | None = None
        # Where jobs routed to this worker go, and how many it takes (prefix routing).
        self.routing: dict[str, Any] = {}
        self._changed = asyncio.Event()
        # Withdrawn (draining, stopping): never announced again. The lock keeps a publish that
        # is under way from landing after the withdrawal.
        self._withdrawn = False
        self._lock = asyncio.Lock()

    def take_jobs(self, concurrency: int, stream: str | None = None) -> None:
        """Announce how many jobs the worker takes at once (the fair scheduler releases that
        many into the streams: service.queue.redis_scheduler) and its own stream, if any:
        gateways route jobs to it while it is ready (prefix routing)."""
        self.routing = {"concurrency": concurrency, **({"stream": stream} if stream else {})}
        self._changed.set()

    def set(self, status: ModelStatus, reason: str | None = None) -> None:
        self.status, self.reason = status, reason
        self._changed.set()

    async def run(self) -> None:
        while not self._withdrawn:
            self._changed.clear()
            try:
                await self._publish()
            except QueueUnavailableError as exc:
                log.warning("cannot announce the worker's state: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), HEARTBEAT_S)

    async def _publish(self) -> None:
        async with self._lock:
            if self._withdrawn:
                return
            at = await _redis_time(self._redis, self.model)
            state = {"status": self.status, "reason": self.reason, "at": at, **self.routing}
            await available(
                self._redis.hset(workers_key(self.model), self.worker, json.dumps(state))
            )

    async def withdraw(self) -> None:
        """Leave the fleet for good: gateways stop routing to this worker at once."""
        self._withdrawn = True
        self._changed.set()
        async with self._lock:
            with contextlib.suppress(QueueUnavailableError):
                await available(self._redis.hdel(workers_key(self.model), self.worker))


async def _read_workers(
    client: RedisClient, names: list[str]
) -> tuple[list[float], list[dict[bytes, bytes]]]:
    """The clock each model's announcements are stamped with, and the announcements: one
    round trip on a single server; on a Redis Cluster (no TIME in its pipelines), each model's
    node's clock, the node the model's workers stamp their states with."""
    pipe = client.pipeline(transaction=False)
    if isinstance(client, RedisCluster):
        clocks = list(await asyncio.gather(*(_redis_time(client, name) for name in names)))
    else:
        pipe.time()
    for name in names:
        pipe.hgetall(workers_key(name))
    replies: list[Any] = await available(pipe.execute())
    if not isinstance(client, RedisCluster):
        (seconds, micros), *replies = replies
        clocks = [float(seconds) + micros / 1e6] * len(names)
    return clocks, replies


def model_state(workers: dict[str, dict[str, Any]], model: str) -> tuple[ModelStatus, str | None]:
    """One model's state from its live workers' states."""
    if any(w["status"] == "ready" for w in workers.values()):
        return "ready", None
    if any(w["status"] == "loading" for w in workers.values()):
        return "loading", None
    if workers:
        name, worker = sorted(workers.items())[0]
        return "unavailable", f"no worker is ready ({name}: {worker['reason']})"
    return "unavailable", f"no worker is running (start one: rmserve worker --model {model})"


async def watch_workers(client: RedisClient, directory: ModelDirectory) -> None:
    """The gateway side: keep `directory` up to date, for as long as the gateway runs.

    After a gap between two reads (Redis stalled, or was unreachable, or this gateway was
    frozen), every announcement looks old: nobody could report meanwhile. The workers then get
    two heartbeats to report again before any is dropped as stale."""
    names, lost = directory.names(), False
    previous, grace_until = None, 0.0
    while True:
        try:
            clocks, hashes = await _read_workers(client, names)
            now = max(clocks, default=0.0)
            if previous is not None and now - previous > REFRESH_S + HEARTBEAT_S:
                grace_until = now + 2 * HEARTBEAT_S
            previous = now
            for name, raw, clock in zip(names, hashes, clocks, strict=True):
                states = {key.decode(): json.loads(value) for key, value in raw.items()}
                live = {
                    k: v
                    for k, v in states.items()
                    if clock - v["at"] <= STALE_S or now < grace_until
                }
                if stale := [k for k in states if k not in live]:
                    await available(client.hdel(workers_key(name), *stale))
                    log.warning("workers of %s stopped reporting: %s", name, ", ".join(stale))
                directory.set(name, *model_state(live, name), workers=len(live))
            if lost:
                log.info("redis is back; model states are current again")
            lost = False
        except QueueUnavailableError as exc:
            if not lost:
                log.warning("cannot read worker states (%s); keeping the last known", exc)
            lost = True
        await asyncio.sleep(REFRESH_S)
