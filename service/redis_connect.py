"""The Redis client of distributed mode: one server (`RMSERVE_REDIS_URL`), a primary with
replicas behind Sentinel (`RMSERVE_REDIS_SENTINELS`), whose client asks the sentinels for the
primary and follows a failover to the promoted replica without a restart, or a Redis Cluster
(`RMSERVE_REDIS_CLUSTER`, the URL naming any node), whose client routes each command to the
node of its key's slot (what code taking either kind must keep in mind: service.redis_cluster).

A blocking pool for one server or Sentinel: at a burst of requests (one per sample, as OpenRLHF
sends them) a command waits for a free connection instead of failing with "Too many
connections" (redis-py's default pool is capped and does not wait). The cluster client's pools
(one per node) do not wait: see `cluster_client`. Blocking reads wait at most a second (worker
fetch 0.5 s, batch follow 1 s), so the socket timeout (RMSERVE_REDIS_TIMEOUT_S, at least 2 s)
only fires when Redis stops answering.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from rmserve.service.config import Settings
from rmserve.service.redis_cluster import RedisClient

__all__ = ["RedisClient", "cluster_client", "redis_client", "sentinel_addresses"]

MAX_CONNECTIONS = 512  # per process; Redis takes 10000 clients by default
CONNECT_TIMEOUT_S = 2.0


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Connections to the primary the sentinels name, waiting for a free one when all are in
    use (SentinelConnectionPool's connection class with BlockingConnectionPool's queue)."""


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (the port defaults to 26379); ValueError naming the setting."""
    out = []
    for part in (p.strip() for p in value.split(",")):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "26379")
        if not host or not port.isdigit():
            raise ValueError(
                f"RMSERVE_REDIS_SENTINELS: {part!r} is not host:port (e.g. "
                "sentinel-0:26379,sentinel-1:26379)"
            )
        out.append((host, int(port)))
    return out


def redis_client(settings: Settings) -> RedisClient:
    """The client of gateways, workers and the CLI; ValueError when neither a URL nor
    sentinels are configured."""
    if settings.redis_cluster:
        return cluster_client(settings)
    common: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": settings.redis_timeout_s,
        "health_check_interval": 10,
        "max_connections": MAX_CONNECTIONS,
        "timeout": 10,  # for a free connection
    }
    if not settings.redis_sentinels:
        if not settings.redis_url:
            raise ValueError(
                "distributed mode needs Redis: RMSERVE_REDIS_URL (--redis-url), or "
                "RMSERVE_REDIS_SENTINELS for a primary behind Sentinel"
            )
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, **common)
        return aioredis.Redis(connection_pool=pool)
    # Credentials, database and TLS from the URL (its host and port are the sentinels' to say).
    options: dict[str, Any] = dict(parse_url(settings.redis_url or "redis://"))
    options.pop("host", None)
    options.pop("port", None)
    connection_class = options.pop("connection_class", None)
    if connection_class is not None and connection_class is not aioredis.Connection:
        options["ssl"] = True  # rediss://: SentinelManagedSSLConnection
    secret = settings.redis_sentinel_password
    sentinel = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        sentinel_kwargs={
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": settings.redis_timeout_s,
            **({"password": secret.get_secret_value()} if secret else {}),
        },
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_sentinel_service,
        connection_pool_class=BlockingSentinelPool,
        **common,
        **options,
    )
    return client


def cluster_client(settings: Settings) -> RedisCluster:
    """A Redis Cluster client from any node's URL (credentials and TLS from it too). Its pools
    are per node, capped at MAX_CONNECTIONS each; unlike the blocking pool above, a command that
    finds all of a node's connections busy fails (MaxConnectionsError: a 503) instead of
    waiting."""
    if settings.redis_sentinels or settings.redis_wait_replicas:  # Settings refuse these too
        raise ValueError(
            "RMSERVE_REDIS_CLUSTER goes with neither RMSERVE_REDIS_SENTINELS nor "
            "RMSERVE_REDIS_WAIT_REPLICAS"
        )
    if not settings.redis_url:
        raise ValueError(
            "RMSERVE_REDIS_CLUSTER needs RMSERVE_REDIS_URL (--redis-url): any node of the cluster"
        )
    return RedisCluster.from_url(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=10,
        max_connections=MAX_CONNECTIONS,
    )
