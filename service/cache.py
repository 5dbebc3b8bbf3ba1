"""Optional result cache: a retried request does not redo work.

Keyed by model name, weights, revision, registry options, the per-request options that change a
score, and a canonical hash of the item's content (messages, candidates and reference; not its
`id` or `metadata`).
Only results without an error are kept, for `ttl_s` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from rmserve.models.spec import ModelSpec
from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import QueueUnavailableError
from rmserve.service.queue.redis_streams import available, model_prefix
from rmserve.service.redis_cluster import RedisClient


def cache_key(spec: ModelSpec, job: Job) -> str:
    content = {
        "model": spec.name,
        "weights": spec.weights,
        "remote": remote.model_dump() if (remote := getattr(spec, "remote", None)) else None,
        "revision": spec.revision,
        "options": spec.options.model_dump(mode="json"),
        "aggregate": job.aggregate,
        "judge": job.judge.model_dump() if job.judge is not None else None,
        # Only when not the default, so the keys of earlier results still match.
        **({"render": job.render} if job.render != "chat_template" else {}),
        # What is scored: not the item's id or metadata.
        "item": job.item.model_dump(mode="json", exclude={"id", "metadata"}),
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # The model's hash tag: a request's keys (one model) share a Redis Cluster slot (MGET).
    return f"{model_prefix(spec.name)}:cache:" + hashlib.sha256(canonical.encode()).hexdigest()


class ResultCache(Protocol):
    async def get_many(self, keys: Sequence[str]) -> dict[str, ItemResult]: ...

    async def put_many(self, results: dict[str, ItemResult]) -> None:
        """Keep the results that have no error."""
        ...


class MemoryResultCache:
    """In-process cache of embedded mode: TTL plus a bound on entries (oldest evicted first)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self._ttl_s, self._max = ttl_s, max_entries
        self._entries: OrderedDict[str, tuple[float, ItemResult]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> dict[str, ItemResult]:
        now, found = time.monotonic(), {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                found[key] = entry[1]
            elif entry is not None:
                del self._entries[key]
        return found

    async def put_many(self, results: dict[str, ItemResult]) -> None:
        expires = time.monotonic() + self._ttl_s
        for key, result in results.items():
            if result.error is None:
                self._entries[key] = (expires, result)
                self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class RedisResultCache:
    """Shared by all gateways of distributed mode; Redis expires the entries."""

    def __init__(self, client: RedisClient, ttl_s: float) -> None:
        self._redis, self._ttl_ms = client, max(1, int(ttl_s * 1000))

    async def get_many(self, keys: Sequence[str]) -> dict[str, ItemResult]:
        if not keys:
            return {}
        values: list[Any] = await available(self._redis.mget(list(keys)))
        return {
            key: ItemResult.model_validate_json(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }

    async def put_many(self, results: dict[str, ItemResult]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key, result in results.items():
            if result.error is None:
                pipe.set(key, result.model_dump_json(), px=self._ttl_ms)
        with contextlib.suppress(QueueUnavailableError):  # costs a recomputation later, no more
            await available(pipe.execute())
