"""What code that takes a Redis client needs to know of the two kinds (service.redis_connect
makes them): `RedisClient`, a single server's (or Sentinel's primary) or a Redis Cluster's.

A cluster client routes each command to the node of its key's slot. Every key carries its model
as hash tag (one slot per model), and what a cluster client cannot do is kept apart: a
transaction (MULTI) holds the keys of one slot only and no PUBLISH (redis-py refuses PUBLISH and
TIME in a cluster pipeline; announcements follow the transaction: `publish_all`), and a script is
not called through a pipeline (a cluster pipeline does not load a script a node lacks).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

RedisClient = aioredis.Redis | RedisCluster


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


async def publish_all(client: RedisClient, messages: Sequence[tuple[str, str]]) -> None:
    """PUBLISH each (channel, message): one round trip on a single server; on a cluster, one
    command each (redis-py refuses PUBLISH in a cluster pipeline)."""
    if not messages:
        return
    if isinstance(client, RedisCluster):
        for channel, message in messages:
            await client.publish(channel, message)
        return
    pipe = client.pipeline(transaction=False)
    for channel, message in messages:
        pipe.publish(channel, message)
    await pipe.execute()
