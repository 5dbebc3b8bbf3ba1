"""Distributed mode on a real 3-node Redis Cluster (RMSERVE_REDIS_CLUSTER): the client follows
each model's slot to its node, so two models whose slots live on different nodes are queued,
scored and answered through the same cluster client; prefix routing, async batches, quotas, the
result cache and announcements through pub/sub work there; and the settings that cannot work
with a cluster are refused."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from rmserve.models.base import RewardModel
from rmserve.models.spec import DiscriminativeSpec, ModelSpec
from rmserve.service import fleet
from rmserve.service.cache import RedisResultCache
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.fleet import WorkerAnnouncer, watch_workers, workers_key
from rmserve.service.jobs import Job
from rmserve.service.launcher import RedisClusterNodes
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings, jobs_key
from rmserve.service.quotas import Quota, Quotas, RedisLimiter
from rmserve.service.redis_connect import redis_client
from rmserve.web.errors import TooManyItemsInFlight
from tests.conftest import TINY_REGISTRY
from tests.service.test_fleet_states import wait_until
from tests.service.test_quotas import (
    FAST as QUOTA_FAST,
)
from tests.service.test_quotas import (  # noqa: F401  (module-scoped fixtures)
    body,
    exact,
    gateway_app,
    keyed,
    refused,
    score,
    serving,
    spec,
    until,
    working,
)
from tests.service.test_stream_queue import (
    FAST,
    announce,
    gather,
    jobs,
    preferred,
    recording,
)
from tests.service.test_stream_queue import (
    keyed as keyed_jobs,
)
from tests.service.test_stream_queue import (
    serving as serving_workers,
)

CANDIDATES = ["n", "o", "p", "q", "r", "s", "t", "u", "v"]


@pytest.fixture
def cluster(redis_cluster3: RedisClusterNodes) -> RedisClusterNodes:
    redis_cluster3.flush()
    return redis_cluster3


def other_model(cluster: RedisClusterNodes, model: str) -> str:
    """A model whose keys live on another node than `model`'s (CLUSTER KEYSLOT, SLOTS)."""
    home = cluster.node_of(jobs_key(model))
    return next(name for name in CANDIDATES if cluster.node_of(jobs_key(name)) != home)


def keys_by_node(cluster: RedisClusterNodes) -> dict[int, set[str]]:
    return {
        node.port: {key.decode() for key in redis.Redis(port=node.port).keys("rmserve:*")}
        for node in cluster.nodes
    }


def of_model(batch: list[Job], model: str) -> list[Job]:
    return [job.model_copy(update={"model": model}) for job in batch]


async def serve_model(worker: StreamQueue, model: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for job in await worker.fetch(model, 16, wait_s=0.05):
            await worker.complete(job, ItemResult(index=job.index, score=float(job.index)))


# -- the queue ------------------------------------------------------------------------------------


async def test_two_models_on_two_nodes_are_queued_scored_and_answered(
    cluster: RedisClusterNodes,
) -> None:
    other = other_model(cluster, "m")
    assert cluster.node_of(jobs_key("m")) != cluster.node_of(jobs_key(other))
    gateway = StreamQueue.from_url(cluster.url, FAST, cluster=True)
    assert isinstance(gateway.client, RedisCluster)
    workers = [StreamQueue.from_url(cluster.url, FAST, name=f"w{i}", cluster=True) for i in (0, 1)]
    other_worker = StreamQueue.from_url(cluster.url, FAST, name="x0", cluster=True)
    batch, other_batch = jobs("a", 60), of_model(jobs("b", 40), other)
    await gateway.enqueue(batch)
    await gateway.enqueue(other_batch)
    stop = asyncio.Event()
    other_task = asyncio.create_task(serve_model(other_worker, other, stop))
    try:
        async with serving_workers(*workers) as taken:
            got, other_got = await asyncio.gather(
                gather(gateway, batch), gather(gateway, other_batch)
            )
    finally:
        stop.set()
        await other_task
        await other_worker.close()
    assert got == Counter({job.id: 1 for job in batch})
    assert other_got == Counter({job.id: 1 for job in other_batch})
    assert sum(taken.values()) == 60
    # Each model's keys (streams, results) sit on its own node, nowhere else.
    placed = keys_by_node(cluster)
    for model in ("m", other):
        home = cluster.node_of(jobs_key(model))
        assert any(key.startswith(f"rmserve:{{{model}}}:result:") for key in placed[home])
        for port, keys in placed.items():
            if port != home:
                assert not any(key.startswith(f"rmserve:{{{model}}}:") for key in keys)
    await gateway.close()


async def test_prefix_routing_with_two_workers_on_a_cluster(cluster: RedisClusterNodes) -> None:
    gateway = StreamQueue.from_url(cluster.url, FAST, cluster=True)
    names = ["w0", "w1"]
    for name in names:
        await announce(gateway.client, name, concurrency=1000)  # type: ignore[arg-type]
    batch = keyed_jobs("a", prompts=10, per_prompt=4)
    await gateway.enqueue(batch)
    workers = [StreamQueue.from_url(cluster.url, FAST, name=n, cluster=True) for n in names]
    async with recording(*workers) as took:
        got = await gather(gateway, batch)
    assert got == Counter({job.id: 1 for job in batch})
    for job in batch:
        assert job.prefix_key is not None
        assert took[job.id] == preferred(job.prefix_key, names)[0], job.id
    assert set(took.values()) == set(names)
    await gateway.close()


async def test_a_posted_result_reaches_a_gateway_subscribed_through_another_node(
    cluster: RedisClusterNodes,
) -> None:
    """post (a group's result): stored in the model's slot, then announced (PUBLISH outside the
    transaction); the gateway's pub/sub connection may be on any node."""
    other = other_model(cluster, "m")
    gateway = StreamQueue.from_url(cluster.url, FAST, cluster=True)
    poster = StreamQueue.from_url(cluster.url, FAST, cluster=True)
    for model in ("m", other):
        job_id = f"{model}:0"
        gateway.watch(model, [job_id])
        await asyncio.sleep(0.2)  # subscribed
        assert gateway.reply_channel is not None
        started = time.monotonic()
        await poster.post(model, job_id, ItemResult(index=0, score=1.0), [gateway.reply_channel])
        got = [
            (job, result.score) async for job, result in gateway.results([job_id], time.time() + 5)
        ]
        assert got == [(job_id, 1.0)]
        assert time.monotonic() - started < FAST.sweep_s  # the announcement, not the sweep
    await gateway.close()
    await poster.close()


async def test_workers_of_two_models_on_two_nodes_are_seen_ready_and_stale_ones_go(
    cluster: RedisClusterNodes,
) -> None:
    """WorkerAnnouncer and watch_workers (no TIME in a cluster pipeline: each model's node's
    clock, the one the admission script reads)."""
    other = other_model(cluster, "m")
    client = redis_client(Settings(redis_url=cluster.url, redis_cluster=True))
    specs = [
        DiscriminativeSpec(name=n, kind="discriminative", weights=f"org/{n}") for n in ("m", other)
    ]
    directory = ModelDirectory(specs)
    announcers = [WorkerAnnouncer(client, model, f"{model}@host:1") for model in ("m", other)]
    tasks = [asyncio.create_task(watch_workers(client, directory))]
    tasks += [asyncio.create_task(announcer.run()) for announcer in announcers]

    def status(model: str) -> str | None:
        entry = directory.get(model)
        return None if entry is None else entry.status

    try:
        for announcer in announcers:
            announcer.set("ready")
        await wait_until(lambda: status("m") == status(other) == "ready")
        seconds, _ = await client.time()
        gone = {"status": "ready", "reason": None, "at": seconds - fleet.STALE_S - 1}
        await client.hset(workers_key(other), "gone@host:2", json.dumps(gone))
        for _ in range(100):
            if await client.hkeys(workers_key(other)) == [f"{other}@host:1".encode()]:
                break
            await asyncio.sleep(0.05)
        assert await client.hkeys(workers_key(other)) == [f"{other}@host:1".encode()]
        assert status(other) == "ready"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


# -- quotas, async batches, the result cache ---------------------------------------------------


async def test_quotas_and_async_batches_across_two_gateways_on_a_cluster(
    spec: ModelSpec,  # noqa: F811
    exact: RewardModel,  # noqa: F811
    tmp_path: Path,
    cluster: RedisClusterNodes,
) -> None:
    settings = keyed(tmp_path, max_concurrent_items=4)
    queues = [
        StreamQueue.from_url(cluster.url, QUOTA_FAST, name=f"gateway{i}", cluster=True)
        for i in range(2)
    ]
    worker_queue = StreamQueue.from_url(cluster.url, QUOTA_FAST, name="worker", cluster=True)
    apps = [gateway_app(settings, queue, spec) for queue in queues]
    try:
        async with serving(apps[0]) as a, serving(apps[1]) as b:
            started = await a.post("/v1/jobs", json=body(4))
            assert started.status_code == 202, started.text
            location = started.headers["location"]
            refused(await score(b, 1), "too_many_items_in_flight")  # the lease, in Redis
            assert (await b.get(location)).json()["status"] == "running"
            async with working(exact, worker_queue):

                async def done() -> bool:
                    return bool((await b.get(location)).json()["status"] == "done")

                await until(done)
                assert (await score(b, 4)).status_code == 200
    finally:
        for queue in [*queues, worker_queue]:
            await queue.close()


async def test_the_limiter_and_the_result_cache_on_a_cluster(cluster: RedisClusterNodes) -> None:
    client = redis_client(Settings(redis_url=cluster.url, redis_cluster=True))
    assert isinstance(client, RedisCluster)
    quotas = Quotas(RedisLimiter(client, 5.0), Metrics(), 5.0, 3600)
    try:
        leases = [await quotas.admit(name, Quota(max_concurrent_items=3), 3) for name in CANDIDATES]
        with pytest.raises(TooManyItemsInFlight):
            await quotas.admit("n", Quota(max_concurrent_items=3), 1)
        for lease in leases:
            await lease.release()
        await (await quotas.admit("n", Quota(max_concurrent_items=3), 3)).release()

        cache = RedisResultCache(client, ttl_s=60)
        other = other_model(cluster, "m")
        for model in ("m", other):
            keys = [f"rmserve:{{{model}}}:cache:{i}" for i in range(3)]
            await cache.put_many(
                {key: ItemResult(index=0, score=float(i)) for i, key in enumerate(keys)}
            )
            got = await cache.get_many([*keys, f"rmserve:{{{model}}}:cache:missing"])
            assert {key: result.score for key, result in got.items()} == {
                key: float(i) for i, key in enumerate(keys)
            }
    finally:
        await quotas.close()
        await client.aclose()


# -- settings -------------------------------------------------------------------------------------


def test_cluster_settings_give_a_cluster_client_and_refuse_what_cannot_work() -> None:
    client = redis_client(
        Settings(redis_url="redis://127.0.0.1:7000/0", redis_cluster=True, redis_timeout_s=7)
    )
    assert isinstance(client, RedisCluster)
    kwargs = client.nodes_manager.connection_kwargs
    assert kwargs["socket_timeout"] == 7 and kwargs["socket_connect_timeout"] == 2
    assert kwargs["max_connections"] == 512
    with pytest.raises(ValueError, match="RMSERVE_REDIS_CLUSTER and RMSERVE_REDIS_SENTINELS"):
        Settings(redis_url="redis://r:6379", redis_cluster=True, redis_sentinels="s:26379")
    with pytest.raises(ValueError, match="RMSERVE_REDIS_WAIT_REPLICAS is not supported"):
        Settings(redis_url="redis://r:6379", redis_cluster=True, redis_wait_replicas=1)
    with pytest.raises(ValueError, match="needs RMSERVE_REDIS_URL"):
        redis_client(Settings(redis_cluster=True))
    with pytest.raises(ValueError, match="not supported on a Redis Cluster"):
        StreamQueue(client, StreamSettings(wait_replicas=1))


def test_the_cluster_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSERVE_REDIS_CLUSTER", "true")
    assert Settings().redis_cluster is True


# -- real processes -------------------------------------------------------------------------------


@pytest.mark.engine
def test_a_gateway_and_a_worker_score_on_a_cluster(
    tiny_models: dict[str, Path], tmp_path: Path, redis_cluster3: RedisClusterNodes
) -> None:
    """`rmserve gateway` and `rmserve worker` with RMSERVE_REDIS_CLUSTER=true, the URL naming
    one node: a request of tiny-rm is scored end to end."""
    from tests.distributed.conftest import Fleet, kill_tree

    redis_cluster3.flush()
    fleet = Fleet.__new__(Fleet)  # its processes, on the shared cluster (not its own server)
    fleet.workdir, fleet.registry = tmp_path, TINY_REGISTRY
    fleet.redis = SimpleNamespace(url=redis_cluster3.url, stop=lambda: None)  # type: ignore[assignment]
    fleet.processes = []
    try:
        fleet.workers(1, RMSERVE_REDIS_CLUSTER="true")
        gateway = fleet.gateway(RMSERVE_REDIS_CLUSTER="true")
        with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                info = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
                if info["tiny-rm"]["status"] == "ready":
                    break
                time.sleep(0.5)
            response = client.post(
                "/v1/score",
                json={
                    "model": "tiny-rm",
                    "items": [{"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}],
                },
            )  # fmt: skip
            assert response.status_code == 200, response.text
            result = response.json()["results"][0]
            assert result.get("error") is None and isinstance(result["score"], float), result
    finally:
        for process in fleet.processes:
            if process.process.poll() is None:
                kill_tree(process, signal.SIGKILL)
