"""Per-key quotas over real HTTP on loopback: the request rate (token bucket, 429 + Retry-After,
refill) and the items in flight (held until the results are delivered: plain, streamed and async
batch requests), embedded (in the process) and distributed (two gateways on one real Redis),
a crashed holder's lease expiring, and Redis away (503).

Gateways are apps served by uvicorn in the test's event loop. Their model is a real rule-based
verifier (exact match) scored by a real Worker on the same queue, started only when the test
lets the queued items finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from rmserve.models.base import RewardModel
from rmserve.models.loader import load_model
from rmserve.models.spec import ModelSpec, load_registry
from rmserve.service.auth import hash_key, new_key
from rmserve.service.batches import BatchStore, RedisBatchStore
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.jobs import Job
from rmserve.service.launcher import RedisServer, free_port
from rmserve.service.metrics import Metrics
from rmserve.service.queue import InProcessQueue, JobQueue
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
from rmserve.service.quotas import Quota, Quotas, RedisLimiter
from rmserve.service.scoring import ScoringService
from rmserve.service.worker import Worker
from rmserve.web.errors import TooManyItemsInFlight

REPO = Path(__file__).resolve().parents[2]
KEY, OTHER_KEY = new_key(), new_key()
MODEL = "exact"
FAST = StreamSettings(sweep_s=0.5, reclaim_idle_s=5)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    registry = tmp_path_factory.mktemp("registry") / "registry.yaml"
    registry.write_text(
        f"models:\n  {MODEL}:\n    kind: similarity\n    options: {{metric: exact}}\n"
    )
    return load_registry(registry).models[MODEL]


@pytest.fixture(scope="module")
def exact(spec: ModelSpec) -> RewardModel:
    return load_model(spec)


def keyed(tmp_path: Path, other: str = "", **quota: float) -> Settings:
    """Settings whose keys file has KEY ('team-q', with `quota`) and OTHER_KEY ('team-o', with
    the fields in `other`)."""
    fields = "".join(f", {name}: {value}" for name, value in quota.items())
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {{name: team-q, sha256: {hash_key(KEY)}{fields}}}\n"
        f"  - {{name: team-o, sha256: {hash_key(OTHER_KEY)}{other}}}\n"
    )
    return Settings(api_keys_file=path)


def gateway_app(settings: Settings, queue: JobQueue, spec: ModelSpec) -> FastAPI:
    """A gateway whose model is ready; with a Redis queue, a distributed one (batches in Redis,
    as `rmserve gateway` has them)."""
    directory = ModelDirectory([spec])
    directory.mark_ready(MODEL)
    batches = None
    if isinstance(queue, StreamQueue):
        client = queue.client

        def batches(scoring: ScoringService) -> BatchStore:
            return RedisBatchStore(client, scoring, limit=1000, ttl_s=60)

    return create_app(settings, queue, directory, Metrics(), batches=batches, wait_for_models=False)


@contextlib.asynccontextmanager
async def serving(app: FastAPI, key: str = KEY) -> AsyncIterator[httpx.AsyncClient]:
    """The app on a loopback port; a client sending `key`."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def working(model: RewardModel, queue: JobQueue) -> AsyncIterator[None]:
    """A real worker scoring the queued items of the model, until the block ends."""
    worker = Worker(model, queue, Metrics(), concurrency=16)
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        await worker.stop(grace_s=5)
        await task


def body(items: int, stream: bool = False) -> dict[str, Any]:
    item = {"messages": [{"role": "assistant", "content": "yes"}], "reference": "yes"}
    return {"model": MODEL, "items": [item] * items, "options": {"stream": stream}}


async def score(client: httpx.AsyncClient, items: int) -> httpx.Response:
    return await client.post("/v1/score", json=body(items))


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def queued(queue: JobQueue, jobs: int) -> None:
    async def check() -> bool:
        return (await queue.depth(MODEL)).lag == jobs

    await until(check)


async def admitted(client: httpx.AsyncClient, items: int = 1) -> None:
    """Until a request of `items` is admitted and scored (a release may trail the response)."""

    async def check() -> bool:
        response = await score(client, items)
        assert response.status_code in (200, 429), response.text
        return response.status_code == 200

    await until(check)


def refused(response: httpx.Response, type_: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_
    return error


async def rejections(client: httpx.AsyncClient, limit: str) -> float:
    text = (await client.get("/metrics")).text
    match = re.search(rf'^rmserve_quota_rejections_total\{{limit="{limit}"\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


# -- embedded mode -------------------------------------------------------------------------------


async def test_the_rate_allows_a_burst_then_429_with_retry_after_then_refills(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path
) -> None:
    queue = InProcessQueue(1000)
    app = gateway_app(keyed(tmp_path, requests_per_s=1, burst=2), queue, spec)
    async with serving(app) as client, working(exact, queue):
        for _ in range(2):
            assert (await score(client, 1)).status_code == 200
        error = refused(await score(client, 1), "rate_limited")
        assert error["message"] == (
            "key 'team-q' is over its rate limit of 1 requests/s (burst 2); retry after 1 s"
        )
        assert await rejections(client, "rate") == 1
        await asyncio.sleep(1.1)  # one token back, not two
        assert (await score(client, 1)).status_code == 200
        refused(await score(client, 1), "rate_limited")
        assert await rejections(client, "concurrency") == 0

        async with serving(app, OTHER_KEY) as other:  # another key has its own (no) limits
            for _ in range(4):
                assert (await score(other, 1)).status_code == 200


async def test_every_request_that_submits_work_counts_against_the_rate(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path
) -> None:
    queue = InProcessQueue(1000)
    app = gateway_app(keyed(tmp_path, requests_per_s=0.1, burst=4), queue, spec)
    grader = {"type": "string_check", "name": "s", "input": "{{ sample.output_text }}",
              "reference": "yes", "operation": "eq"}  # fmt: skip
    async with serving(app) as client, working(exact, queue):
        reward = await client.post(
            f"/get_reward?model={MODEL}", json={"query": ["yes"], "labels": ["yes"]}
        )
        assert reward.status_code == 200, reward.text
        graded = await client.post(
            "/v1/fine_tuning/alpha/graders/run", json={"grader": grader, "model_sample": "yes"}
        )
        assert graded.status_code == 200 and graded.json()["reward"] == 1.0
        batch = await client.post("/v1/jobs", json=body(2))
        assert batch.status_code == 202
        assert (await score(client, 1)).status_code == 200
        for path in ("/get_reward", "/v1/score", "/v1/jobs"):
            json = {"query": ["yes"]} if path == "/get_reward" else body(1)
            error = refused(await client.post(f"{path}?model={MODEL}", json=json), "rate_limited")
            assert error["message"].endswith("retry after 10 s")  # a token every 10 s
        # Reading is not limited: models, a batch's progress.
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get(batch.headers["location"])).status_code == 200


async def test_items_in_flight_are_limited_until_their_results_are_delivered(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path
) -> None:
    queue = InProcessQueue(1000)
    app = gateway_app(keyed(tmp_path, max_concurrent_items=4), queue, spec)
    async with serving(app) as client:
        first = asyncio.create_task(score(client, 3))
        await queued(queue, 3)  # admitted, waiting for a worker
        error = refused(await score(client, 2), "too_many_items_in_flight")
        assert error["param"] == "items"
        assert error["message"] == (
            "key 'team-q' has 3 items in flight; 2 more would exceed its limit of 4: retry "
            "when some are done"
        )
        too_big = await score(client, 5)  # could never fit: 413, not a 429 to retry forever
        assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "items"
        assert "at most 4 items in flight" in too_big.json()["error"]["message"]
        assert await rejections(client, "concurrency") == 2

        second = asyncio.create_task(score(client, 1))  # fits beside the first
        await queued(queue, 4)
        async with working(exact, queue):
            assert [(await r).status_code for r in (first, second)] == [200, 200]
            assert (await score(client, 4)).status_code == 200  # all four were released


async def test_a_streamed_response_holds_its_items_until_it_ends(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path
) -> None:
    queue = InProcessQueue(1000)
    app = gateway_app(keyed(tmp_path, max_concurrent_items=4), queue, spec)
    async with (
        serving(app) as client,
        client.stream("POST", "/v1/score", json=body(4, stream=True)) as streamed,
    ):
        assert streamed.status_code == 200
        refused(await score(client, 1), "too_many_items_in_flight")
        async with working(exact, queue):
            lines = [line async for line in streamed.aiter_lines() if line]
            assert len(lines) == 4
            await admitted(client, 4)


async def test_an_async_batch_holds_its_items_until_it_is_done(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path
) -> None:
    queue = InProcessQueue(1000)
    app = gateway_app(keyed(tmp_path, max_concurrent_items=4), queue, spec)
    async with serving(app) as client:
        started = await client.post("/v1/jobs", json=body(4))
        assert started.status_code == 202
        refused(await score(client, 1), "too_many_items_in_flight")
        async with working(exact, queue):

            async def done() -> bool:
                status = await client.get(started.headers["location"])
                return bool(status.json()["status"] == "done")

            await until(done)
            await admitted(client, 4)


# -- distributed mode: the state in Redis --------------------------------------------------------


async def test_the_limits_hold_in_total_across_two_gateways(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path, redis_url: str
) -> None:
    settings = keyed(tmp_path, ", requests_per_s: 0.2, burst: 3", max_concurrent_items=4)
    queues = [StreamQueue.from_url(redis_url, FAST, name=f"gateway{i}") for i in range(2)]
    worker_queue = StreamQueue.from_url(redis_url, FAST, name="worker")
    apps = [gateway_app(settings, queue, spec) for queue in queues]
    try:
        async with serving(apps[0]) as a, serving(apps[1]) as b:
            # Items in flight: 3 on gateway a leave room for 1 in total, wherever it comes.
            first = asyncio.create_task(score(a, 3))
            await queued(worker_queue, 3)
            error = refused(await score(b, 2), "too_many_items_in_flight")
            assert error["message"].startswith("key 'team-q' has 3 items in flight")
            second = asyncio.create_task(score(b, 1))
            await queued(worker_queue, 4)
            refused(await score(a, 1), "too_many_items_in_flight")
            async with working(exact, worker_queue):
                assert [(await r).status_code for r in (first, second)] == [200, 200]
                await admitted(b, 4)

                # The request rate of team-o: a burst of 3 in total, then a token every 5 s.
                async with serving(apps[0], OTHER_KEY) as oa, serving(apps[1], OTHER_KEY) as ob:
                    started = time.monotonic()
                    for client in (oa, ob, oa):
                        assert (await score(client, 1)).status_code == 200
                    error = refused(await score(ob, 1), "rate_limited")
                    # The next token comes 5 s after the first request, however slow this machine.
                    waited = time.monotonic() - started
                    retry = int(error["message"].removesuffix(" s").rsplit(" ", 1)[1])
                    assert math.ceil(5 - waited) <= retry <= 5, (error, waited)
                    refused(await score(oa, 1), "rate_limited")
                    assert await rejections(oa, "rate") == await rejections(ob, "rate") == 1
    finally:
        for queue in [*queues, worker_queue]:
            await queue.close()


async def test_a_batch_in_redis_is_its_keys_and_holds_its_items_until_done(
    spec: ModelSpec, exact: RewardModel, tmp_path: Path, redis_url: str
) -> None:
    settings = keyed(tmp_path, max_concurrent_items=4)
    queues = [StreamQueue.from_url(redis_url, FAST, name=f"gateway{i}") for i in range(2)]
    worker_queue = StreamQueue.from_url(redis_url, FAST, name="worker")
    apps = [gateway_app(settings, queue, spec) for queue in queues]
    try:
        async with serving(apps[0]) as a, serving(apps[1]) as b:
            started = await a.post("/v1/jobs", json=body(4))
            assert started.status_code == 202, started.text
            location = started.headers["location"]
            refused(await score(b, 1), "too_many_items_in_flight")
            assert (await b.get(location)).json()["status"] == "running"
            async with serving(apps[1], OTHER_KEY) as other:
                assert (await other.get(location)).status_code == 404
                assert (await other.get(f"{location}/stream")).status_code == 404
            async with working(exact, worker_queue):

                async def done() -> bool:
                    return bool((await b.get(location)).json()["status"] == "done")

                await until(done)
                await admitted(b, 4)  # gateway a saw the batch done and released its items
    finally:
        for queue in [*queues, worker_queue]:
            await queue.close()


HOLDER = """
import asyncio, sys

import redis.asyncio as aioredis

from rmserve.service.metrics import Metrics
from rmserve.service.quotas import Quota, Quotas, RedisLimiter


async def main() -> None:
    quotas = Quotas(RedisLimiter(aioredis.Redis.from_url(sys.argv[1]), 1.0), Metrics(), 1.0, 3600)
    await quotas.admit("crashy", Quota(max_concurrent_items=3), 3)
    print("holding", flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
"""


async def test_the_lease_of_a_holder_that_crashed_expires(redis_url: str) -> None:
    """A gateway renews its leases (TTL 1 s here) while its requests live; killed, it stops,
    and its items stop counting within the TTL."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, redis_url, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    client = aioredis.Redis.from_url(redis_url)
    quotas = Quotas(RedisLimiter(client, 1.0), Metrics(), 1.0, 3600)
    quota = Quota(max_concurrent_items=3)
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"holding\n"
        renewed_until = time.monotonic() + 2.5  # beyond the TTL: renewed, still held
        while time.monotonic() < renewed_until:
            with pytest.raises(TooManyItemsInFlight, match="'crashy' has 3 items in flight"):
                await quotas.admit("crashy", quota, 1)
            await asyncio.sleep(0.2)
        holder.kill()
        await holder.wait()
        killed = time.monotonic()
        while True:
            try:
                lease = await quotas.admit("crashy", quota, 3)
                break
            except TooManyItemsInFlight:
                assert time.monotonic() - killed < 2.0, "the dead holder's lease did not expire"
                await asyncio.sleep(0.05)
        await lease.release()
        assert await client.exists("rmserve:quota:{crashy}:leases") == 0  # nothing left over
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await quotas.close()
        await client.aclose()


async def test_redis_unreachable_during_the_check_is_503(spec: ModelSpec, tmp_path: Path) -> None:
    queue = StreamQueue.from_url(f"redis://127.0.0.1:{free_port()}/0", FAST)  # nobody listens
    try:
        app = gateway_app(keyed(tmp_path, max_concurrent_items=4), queue, spec)
        async with serving(app) as client:
            response = await score(client, 1)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "unavailable"
        assert error["message"].startswith("the quota store is unreachable: redis:")
    finally:
        await queue.close()


class DyingQueue(StreamQueue):
    """A Redis queue whose server dies the moment the first jobs are enqueued: after an async
    batch's header is written, before its jobs are."""

    server: RedisServer

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        self.server.stop()
        await super().enqueue(jobs)


async def test_redis_lost_while_an_async_batch_is_submitted_is_503(
    spec: ModelSpec, tmp_path: Path
) -> None:
    """The batch's clean-up cannot reach Redis either; the client still gets the 503 that says
    why (found as a 500 in the failover test)."""
    server = RedisServer(tmp_path)
    server.start()
    queue = DyingQueue.from_url(server.url, FAST)
    queue.server = server
    try:
        app = gateway_app(keyed(tmp_path), queue, spec)
        async with serving(app) as client:
            response = await client.post("/v1/jobs", json=body(2))
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "unavailable"
        assert error["message"].startswith("the job queue is unreachable: redis:")
    finally:
        await queue.close()
        server.stop()
