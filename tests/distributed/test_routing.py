"""Prefix routing in a real fleet (redis-server, `rmserve gateway`, two `rmserve worker`
processes): every item of a prompt goes to one worker, which then finds the prompt in its
engine's prefix cache; a loaded preferred worker makes the gateway fall back to the other one;
a worker killed with jobs waiting in its own stream loses none of them."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest

from rmserve.service.launcher import ServerProcess
from tests.distributed.conftest import (
    Fleet,
    counter_total,
    grpo_group,
    jobs_done,
    kill_tree,
    wait_for_workers,
)

pytestmark = pytest.mark.engine

PROMPTS = 12  # all on one of two workers by chance: 2 in 2**12
GROUP = 4
CONCURRENCY = 4  # = GROUP: a worker holding one group's items has no room for another's


def cache(worker: ServerProcess) -> tuple[float, float]:
    """The worker engine's prefix-cache queries and hits (tokens)."""
    queries = counter_total(worker, "rmserve_engine_prefix_cache_queries", model="tiny-rm")
    hits = counter_total(worker, "rmserve_engine_prefix_cache_hits", model="tiny-rm")
    return queries, hits


def score(client: httpx.Client, items: list[dict[str, object]]) -> None:
    response = client.post("/v1/score", json={"model": "tiny-rm", "items": items})
    assert response.status_code == 200, response.text
    errors = [result["error"] for result in response.json()["results"] if result["error"]]
    assert not errors, errors


def wait_for_batch(client: httpx.Client, batch_id: str, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := client.get(f"/v1/jobs/{batch_id}").json())["status"] != "done":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert len(status["results"]) == n
    assert all(result["error"] is None for result in status["results"]), status["results"]


def test_prompts_stay_on_one_worker_fall_back_under_load_and_survive_a_kill(
    fleet: Fleet,
) -> None:
    gateway = fleet.gateway()
    workers = fleet.workers(2, RMSERVE_WORKER_CONCURRENCY=str(CONCURRENCY))
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        wait_for_workers(client, "tiny-rm", 2)
        time.sleep(2.5)  # both workers' streams announced (ready comes with the stream)

        # Each prompt's group, twice: all of it on one worker, the same both times.
        owner: dict[int, int] = {}
        before_second = [cache(worker) for worker in workers]
        for round_ in range(2):
            if round_ == 1:
                before_second = [cache(worker) for worker in workers]
            for prompt in range(PROMPTS):
                done = [jobs_done(worker) for worker in workers]
                score(client, grpo_group(prompt, GROUP, tag=f"r{round_}-"))
                delta = [jobs_done(w) - d for w, d in zip(workers, done, strict=True)]
                assert sorted(delta) == [0, GROUP], (prompt, delta)
                took = delta.index(GROUP)
                assert owner.setdefault(prompt, took) == took, prompt
        assert set(owner.values()) == {0, 1}  # the prompts are spread over both workers
        routed = counter_total(gateway, "rmserve_routed_jobs", model="tiny-rm", route="affinity")
        assert routed == 2 * PROMPTS * GROUP

        # The second round found its prompts cached on the worker that computed them.
        for worker, (queries, hits) in zip(workers, before_second, strict=True):
            now_queries, now_hits = cache(worker)
            assert now_queries > queries
            assert (now_hits - hits) / (now_queries - queries) > 0.5, (now_hits, now_queries)

        # The preferred worker is loaded (stopped, a group waiting in its stream): the next
        # group of the same prompt is scored by the other one.
        busy_index = owner[0]
        busy, other = workers[busy_index], workers[1 - busy_index]
        stopped = psutil.Process(busy.process.pid)
        stopped.send_signal(signal.SIGSTOP)
        try:
            waiting = client.post(
                "/v1/jobs", json={"model": "tiny-rm", "items": grpo_group(0, GROUP, "held")}
            )
            assert waiting.status_code == 202, waiting.text
            other_done = jobs_done(other)
            score(client, grpo_group(0, GROUP, tag="fallback"))
            assert jobs_done(other) - other_done == GROUP
        finally:
            stopped.send_signal(signal.SIGCONT)
        wait_for_batch(client, waiting.json()["id"], GROUP, timeout_s=60)
        fallback = counter_total(gateway, "rmserve_routed_jobs", model="tiny-rm", route="fallback")
        assert fallback == GROUP

        # Killed with two groups waiting in its own stream: the survivor scores them.
        stopped.send_signal(signal.SIGSTOP)
        survivor_done = jobs_done(other)
        prompts = [p for p, w in owner.items() if w == busy_index][:2]
        items = [item for p in prompts for item in grpo_group(p, 2, "orphaned")]
        orphaned = client.post("/v1/jobs", json={"model": "tiny-rm", "items": items})
        assert orphaned.status_code == 202, orphaned.text
        kill_tree(busy)
        wait_for_batch(client, orphaned.json()["id"], len(items), timeout_s=90)
        assert jobs_done(other) - survivor_done == len(items)
        wait_for_workers(client, "tiny-rm", 1)
        # Later requests for its prompts go to the survivor.
        score(client, grpo_group(prompts[0], GROUP, tag="after"))
