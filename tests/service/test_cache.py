"""The result cache: canonical keys, TTL, bounded size, errors never cached."""

from __future__ import annotations

import asyncio
import time

from rmserve.models.spec import DiscriminativeSpec
from rmserve.service.cache import MemoryResultCache, cache_key
from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemErrorBody, ItemResult
from rmserve.wire.trajectory import Trajectory

SPEC = DiscriminativeSpec(name="rm", kind="discriminative", weights="org/rm", revision="v1")


def job(item: dict[str, object], **kwargs: object) -> Job:
    now = time.time()
    fields = {"id": "r:0", "model": "rm", "index": 0, "enqueued_at": now, "deadline": now + 1}
    return Job.model_validate({**fields, "item": Trajectory.model_validate(item), **kwargs})


MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_key_covers_content_not_identity() -> None:
    base = cache_key(SPEC, job({"messages": MESSAGES}))
    assert base == cache_key(SPEC, job({"id": "other", "messages": MESSAGES, "metadata": {"x": 1}}))
    assert base != cache_key(SPEC, job({"messages": MESSAGES, "reference": "a"}))
    assert base != cache_key(SPEC, job({"messages": MESSAGES[:1]}))
    assert base != cache_key(SPEC, job({"messages": MESSAGES}, aggregate="min"))
    assert base != cache_key(
        SPEC.model_copy(update={"revision": "v2"}), job({"messages": MESSAGES})
    )
    options = SPEC.options.model_copy(update={"too_long": "truncate_left"})
    assert base != cache_key(
        SPEC.model_copy(update={"options": options}), job({"messages": MESSAGES})
    )


def test_key_covers_the_candidates_a_judge_compares() -> None:
    conversation = MESSAGES[:1]
    one = cache_key(SPEC, job({"messages": conversation, "candidates": ["a", "b"]}))
    assert one != cache_key(SPEC, job({"messages": conversation, "candidates": ["a", "c"]}))
    assert one != cache_key(SPEC, job({"messages": conversation, "candidates": ["b", "a"]}))


async def test_ttl_bound_and_errors() -> None:
    cache = MemoryResultCache(ttl_s=0.2, max_entries=2)
    error = ItemErrorBody(type="too_long", message="x")
    await cache.put_many({
        "a": ItemResult(index=0, score=1.0),
        "b": ItemResult(index=0, score=2.0),
        "c": ItemResult(index=0, score=3.0),
        "e": ItemResult(index=0, error=error),
    })  # fmt: skip
    assert set(await cache.get_many(["a", "b", "c", "e"])) == {"b", "c"}  # "a" evicted
    await asyncio.sleep(0.25)
    assert await cache.get_many(["b", "c"]) == {}
