"""Tenants of a shared deployment (service.tenants): their configuration in the keys file and
its errors, a request's tenant and class (403 naming the option), and the in-process queue
taking jobs by tenant share, class and deadline, answering `timeout` early what cannot finish."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from rmserve.service.auth import KeysFileError, hash_key, load_keys, new_key
from rmserve.service.config import Settings
from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult
from rmserve.service.queue import InProcessQueue
from rmserve.service.tenants import Tenancy
from rmserve.service.worker import Worker
from rmserve.wire.trajectory import Trajectory
from tests.e2e.test_cli import rmserve
from tests.service.test_gateway_auth import ITEM, bearer, gateway_app, serving
from tests.service.test_worker_isolation import Recording

SHARED, TEAM = new_key(), new_key()
KEYS = f"""
tenants:
  - {{name: rl-team, weight: 3, priority: training}}
  - {{name: evals, weight: 1, priority: batch}}
  - {{name: demo, priority: interactive}}
keys:
  - {{name: platform, sha256: {hash_key(SHARED)}, tenants: [rl-team, evals]}}
  - {{name: team-a, sha256: {hash_key(TEAM)}}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_keys_name_their_tenants_weights_and_classes(tmp_path: Path) -> None:
    keys = {key.name: key for key in load_keys(write(tmp_path, KEYS)).values()}
    platform, team = keys["platform"], keys["team-a"]
    assert platform.tenancy() == Tenancy("rl-team", 3.0, "training")
    assert platform.tenancy("evals") == Tenancy("evals", 1.0, "batch")
    assert platform.tenancy("rl-team", "batch") == Tenancy("rl-team", 3.0, "batch")
    # A key without `tenants` is a tenant of its own: weight 1, training.
    assert team.tenancy() == Tenancy("team-a", 1.0, "training")


@pytest.mark.parametrize(
    ("tenant", "priority", "says"),
    [
        ("demo", None, "key 'platform' may not act for tenant 'demo'; allowed: rl-team, evals"),
        ("rl-team", "interactive", "tenant 'rl-team' may not use priority 'interactive'; "
         "allowed: training, batch"),
        ("evals", "training", "tenant 'evals' may not use priority 'training'; allowed: batch"),
    ],
)  # fmt: skip
def test_a_key_may_not_choose_another_tenant_or_a_higher_class(
    tmp_path: Path, tenant: str, priority: str | None, says: str
) -> None:
    (platform,) = [k for k in load_keys(write(tmp_path, KEYS)).values() if k.name == "platform"]
    with pytest.raises(Exception, match="may not") as refused:
        platform.tenancy(tenant, priority)  # type: ignore[arg-type]
    assert str(refused.value) == says


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (KEYS.replace("tenants: [rl-team, evals]", "tenants: [rl-team, nope]"),
         "keys[0] ('platform').tenants: unknown tenant 'nope'; defined: demo, evals, rl-team"),
        (KEYS.replace("weight: 3", "weight: 0"),
         "tenants[0] ('rl-team').weight: Input should be greater than 0"),
        (KEYS.replace("weight: 3", "weight: -1"), "tenants[0] ('rl-team').weight"),
        (KEYS.replace("priority: batch", "priority: urgent"),
         "tenants[1] ('evals').priority: Input should be 'interactive', 'training' or 'batch'"),
        (KEYS.replace("name: demo", "name: evals"), "tenants[2] ('evals').name: defined twice"),
        (KEYS.replace("priority: interactive", "priority: training, priorities: [batch]"),
         "tenants[2] ('demo'): Value error, priorities must include the tenant's priority"),
    ],
)  # fmt: skip
def test_bad_tenant_configuration_fails_naming_the_field(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(KeysFileError) as failed:
        load_keys(write(tmp_path, text))
    assert says in str(failed.value)


def test_check_registry_validates_a_keys_file(tmp_path: Path) -> None:
    good = write(tmp_path, KEYS)
    done = rmserve("check-registry", "default", "--keys", str(good))
    assert done.returncode == 0, done.stderr
    assert "key platform\ttenant evals\tweight 1\tbatch (batch)" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(KEYS.replace("weight: 3", "weight: 0"))
    done = rmserve("check-registry", "default", "--keys", str(bad))
    assert done.returncode == 2
    assert "tenants[0] ('rl-team').weight: Input should be greater than 0" in done.stderr


def test_a_request_naming_a_tenant_or_class_its_key_may_not_use_gets_403(tmp_path: Path) -> None:
    app = gateway_app(Settings(api_keys_file=write(tmp_path, KEYS)))
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        for options, param, says in [
            ({"tenant": "demo"}, "options.tenant", "may not act for tenant 'demo'"),
            ({"priority": "interactive"}, "options.priority", "may not use priority"),
        ]:
            body = {"model": "ready", "items": [ITEM], "options": options}
            for path in ("/v1/score", "/v1/jobs"):
                refused = http.post(path, json=body, headers=bearer(SHARED))
                assert refused.status_code == 403, refused.text
                error = refused.json()["error"]
                assert error["param"] == param and says in error["message"]
        bad = {"model": "ready", "items": [ITEM], "options": {"priority": "urgent"}}
        refused = http.post("/v1/score", json=bad, headers=bearer(SHARED))
        assert refused.status_code == 422 and "options.priority" in refused.text


def job(job_id: str, tenant: str, weight: float = 1.0, timeout_s: float = 600) -> Job:
    now = time.time()
    item = Trajectory.model_validate({"id": job_id, "messages": [{"role": "user", "content": "x"}]})
    return Job(
        id=job_id,
        model="m",
        index=0,
        item=item,
        enqueued_at=now,
        deadline=now + timeout_s,
        tenant=tenant,
        weight=weight,
    )


async def test_the_in_process_queue_takes_jobs_by_tenant_share() -> None:
    queue = InProcessQueue(10_000)
    await queue.enqueue([job(f"a{i}", "a", weight=3) for i in range(400)])  # a big batch first
    await queue.enqueue([job(f"b{i}", "b") for i in range(400)])
    taken = [j.tenant for _ in range(50) for j in await queue.fetch("m", 8, wait_s=1)]
    assert 0.70 < taken.count("a") / len(taken) < 0.80  # 3:1, not first come first served
    await queue.close()


async def test_a_job_that_cannot_finish_in_time_is_answered_timeout_without_a_worker() -> None:
    metrics = Metrics()
    queue = InProcessQueue(100, metrics)
    doomed, fine = job("doomed", "a", timeout_s=0.5), job("fine", "a")
    await queue.enqueue([doomed, fine])
    answered: dict[str, ItemResult] = {}

    async def collect() -> None:
        async for job_id, result in queue.results(["doomed"], time.time() + 5):
            answered[job_id] = result

    waiting = asyncio.create_task(collect())
    assert await queue.fetch("m", 8, wait_s=1, margin_s=1.0) == [fine]
    await waiting
    error = answered["doomed"].error
    assert error is not None and error.type == "timeout"
    assert "deadline was less than the 1.00 s scoring takes" in error.message
    assert answered["doomed"].timing.queue_s >= 0
    labels = {"tenant": "a", "model": "m", "outcome": "timeout"}
    assert metrics.registry.get_sample_value("rmserve_tenant_items_total", labels) == 1
    await queue.close()


async def test_a_worker_answers_timeout_for_an_item_that_cannot_finish_in_time() -> None:
    queue, model = InProcessQueue(100), Recording()  # 0.2 s per item
    worker = Worker(model, queue, Metrics(), concurrency=1)  # type: ignore[arg-type]
    running = asyncio.create_task(worker.run())
    try:
        first = job("first", "a")
        await queue.enqueue([first])
        await anext(queue.results(["first"], time.time() + 5))
        # 0.1 s left: the fastest recent item took 0.2 s.
        short, long = job("short", "a", timeout_s=0.1), job("long", "a", timeout_s=5)
        await queue.enqueue([short, long])
        results = {j: r async for j, r in queue.results(["short", "long"], time.time() + 5)}
    finally:
        await worker.stop(grace_s=1)
        await running
    error = results["short"].error
    assert error is not None and error.type == "timeout"
    assert "the fastest recent item of m took 0.2" in error.message
    assert results["long"].error is None
    assert "short" not in model.beside  # never computed
