"""Distributed mode end to end: real redis-server, `rmserve gateway` and `rmserve worker`
processes with vLLM engines, HTTP on loopback. Workers are killed, drained and starved; Redis is
restarted; nothing accepted is lost and every item is answered exactly once."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import redis

from rmserve.service.queue.redis_streams import jobs_key, streams_key
from tests.distributed.conftest import (
    RECLAIM_IDLE_S,
    Fleet,
    items,
    jobs_done,
    kill_tree,
    stream_lines,
    wait_for_workers,
)

pytestmark = pytest.mark.engine


class StreamingClient(threading.Thread):
    """POST /v1/score with options.stream in the background; collects the NDJSON lines."""

    def __init__(self, base_url: str, request: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.base_url, self.request = base_url, request
        self.results: list[dict[str, Any]] = []
        self.finished_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=300) as http,
                http.stream("POST", "/v1/score", json=self.request) as response,
            ):
                assert response.status_code == 200, response.read()
                for result in stream_lines(response):
                    self.results.append(result)
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.results) < count and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.results) >= count, (len(self.results), self.error)

    def exactly_once(self, n: int) -> None:
        self.join(300)
        assert self.error is None, self.error
        counts = Counter(result["index"] for result in self.results)
        assert counts == Counter(range(n)), {i: c for i, c in counts.items() if c != 1}
        errors = [r["error"] for r in self.results if r["error"] is not None]
        assert not errors, errors[:3]


def score_request(n: int, prefix: str = "q") -> dict[str, Any]:
    return {"model": "tiny-rm", "items": items(n, prefix), "options": {"stream": True}}


def test_two_workers_share_a_batch_and_score_as_embedded_does(
    fleet: Fleet, client: httpx.Client
) -> None:
    gateway = fleet.gateway()
    # Each worker takes at most 16 jobs at a time, so a batch of 200 must be shared.
    workers = fleet.workers(2, RMSERVE_WORKER_CONCURRENCY="16")
    with httpx.Client(base_url=gateway.base_url, timeout=120) as http:
        wait_for_workers(http, "tiny-rm", 2)
        batch = items(200)
        response = http.post("/v1/score", json={"model": "tiny-rm", "items": batch})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(200))
    assert all(r["error"] is None for r in results)
    done = [jobs_done(worker) for worker in workers]
    assert sum(done) == 200 and min(done) > 0, done
    # The same scores as the embedded service (session server) gives for the same items.
    embedded = client.post("/v1/score", json={"model": "tiny-rm", "items": batch[:16]}).json()
    for ours, theirs in zip(results, embedded["results"], strict=False):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


def test_kill_9_of_a_worker_mid_batch_loses_nothing(fleet: Fleet) -> None:
    gateway = fleet.gateway()
    victim, survivor = fleet.workers(2, RMSERVE_WORKER_CONCURRENCY="4")
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        wait_for_workers(http, "tiny-rm", 2)
    client = StreamingClient(gateway.base_url, score_request(500))
    client.start()
    client.wait_for(100)
    kill_tree(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    client_redis = redis.Redis.from_url(fleet.redis.url)
    streams = [jobs_key("tiny-rm"), *client_redis.smembers(streams_key("tiny-rm"))]
    consumers = {
        c["name"].decode(): c["pending"]
        for stream in streams
        for c in client_redis.xpending(stream, "workers")["consumers"]
    }
    assert any(name.endswith(f":{victim.process.pid}") for name in consumers), consumers
    client.exactly_once(500)
    assert client.finished_at is not None
    assert client.finished_at - killed_at < RECLAIM_IDLE_S + 20
    assert jobs_done(survivor) > 0
    assert "reclaimed" in survivor.log_tail(200)


@pytest.mark.parametrize("grace_s", [30, 0])
def test_sigterm_drain_loses_nothing(fleet: Fleet, grace_s: int) -> None:
    """With a grace period in-flight jobs finish; without, they are released to the other
    worker at once. Either way every item is answered exactly once."""
    gateway = fleet.gateway()
    draining, other = fleet.workers(
        2, RMSERVE_WORKER_CONCURRENCY="8", RMSERVE_DRAIN_GRACE_S=str(grace_s)
    )
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        wait_for_workers(http, "tiny-rm", 2)
    client = StreamingClient(gateway.base_url, score_request(400))
    client.start()
    client.wait_for(50)
    assert draining.stop(grace_s=120) in (0, -signal.SIGTERM)
    client.exactly_once(400)
    log = draining.log_tail(100)
    assert "drained:" in log and "Application shutdown complete" in log, log
    # Under load the worker always has jobs in flight: they finish, or are released.
    assert (", 0 released" in log) == bool(grace_s), log
    assert jobs_done(other) > 0


def test_a_full_queue_answers_429_with_retry_after(fleet: Fleet) -> None:
    gateway = fleet.gateway(RMSERVE_QUEUE_CAPACITY="20")
    (worker,) = fleet.workers(1)
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        wait_for_workers(http, "tiny-rm", 1)
        kill_tree(worker, signal.SIGSTOP)  # the worker takes nothing; the gateway still sees it
        try:
            accepted = http.post("/v1/jobs", json={"model": "tiny-rm", "items": items(20)})
            assert accepted.status_code == 202
            full = http.post("/v1/jobs", json={"model": "tiny-rm", "items": items(10)})
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["type"] == "overloaded"
            also_full = http.post("/v1/score", json={"model": "tiny-rm", "items": items(6)})
            assert also_full.status_code == 429
        finally:
            kill_tree(worker, signal.SIGCONT)
        batch = accepted.json()["id"]
        with http.stream("GET", f"/v1/jobs/{batch}/stream") as response:
            assert sorted(r["index"] for r in stream_lines(response)) == list(range(20))
        again = http.post("/v1/score", json={"model": "tiny-rm", "items": items(10)})
        assert again.status_code == 200


def answers_again(http: httpx.Client, request: dict[str, Any], within_s: float = 60) -> None:
    """Resend `request` until it is scored (200, every item without error), with nothing but
    503 meanwhile; fail after `within_s`."""
    deadline, response = time.monotonic() + within_s, None
    while time.monotonic() < deadline:
        response = http.post("/v1/score", json=request)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        time.sleep(0.5)
    assert response is not None and response.status_code == 200, response
    assert all(r["error"] is None for r in response.json()["results"])


def test_redis_restart_gives_503s_then_recovers_without_restarting(fleet: Fleet) -> None:
    gateway = fleet.gateway()
    (worker,) = fleet.workers(1)
    request = {"model": "tiny-rm", "items": items(8)}
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        wait_for_workers(http, "tiny-rm", 1)
        before = http.post("/v1/jobs", json=request).json()["id"]
        with http.stream("GET", f"/v1/jobs/{before}/stream") as response:
            assert len(list(stream_lines(response))) == 8

        fleet.redis.stop()
        for path in ("/v1/score", "/v1/jobs"):
            started = time.monotonic()
            down = http.post(path, json=request)
            assert down.status_code == 503, down.text
            assert "unreachable" in down.json()["error"]["message"]
            assert time.monotonic() - started < 3
        assert http.get("/readyz").status_code == 503
        assert http.get(f"{worker.base_url}/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200

        fleet.redis.start()  # same port and directory: the AOF brings the data back
        answers_again(http, request)
        kept = http.get(f"/v1/jobs/{before}").json()
        assert kept["status"] == "done" and kept["finished"] == 8
        assert http.get("/readyz").status_code == 200
    assert gateway.process.poll() is None and worker.process.poll() is None


def test_a_frozen_redis_gives_503s_within_the_redis_timeout_then_recovers(fleet: Fleet) -> None:
    """Redis accepts connections but stops answering (SIGSTOP: a stall, a partition): requests
    get 503 within RMSERVE_REDIS_TIMEOUT_S, not a hang, and the fleet recovers by itself."""
    gateway = fleet.gateway(RMSERVE_REDIS_TIMEOUT_S="2")
    (worker,) = fleet.workers(1, RMSERVE_REDIS_TIMEOUT_S="2")
    request = {"model": "tiny-rm", "items": items(4)}
    assert fleet.redis.process is not None
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        wait_for_workers(http, "tiny-rm", 1)
        assert http.post("/v1/score", json=request).status_code == 200
        fleet.redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            down = http.post("/v1/score", json=request)
            elapsed = time.monotonic() - started
        finally:
            fleet.redis.process.send_signal(signal.SIGCONT)
        assert down.status_code == 503, down.text
        assert "unreachable" in down.json()["error"]["message"]
        assert elapsed < 2 + 2, elapsed  # the timeout, and room for a loaded machine
        answers_again(http, request)
    assert gateway.process.poll() is None and worker.process.poll() is None


def test_batches_and_cache_live_in_redis_not_in_a_gateway(fleet: Fleet) -> None:
    first = fleet.gateway(RMSERVE_RESULT_CACHE_TTL_S="600")
    second = fleet.gateway(RMSERVE_RESULT_CACHE_TTL_S="600")
    fleet.workers(1, RMSERVE_RESULT_CACHE_TTL_S="600")
    batch = items(40, prefix="b")
    with (
        httpx.Client(base_url=first.base_url, timeout=60) as one,
        httpx.Client(base_url=second.base_url, timeout=60) as two,
    ):
        for gateway in (one, two):  # each reads the worker states once a second
            wait_for_workers(gateway, "tiny-rm", 1)
        submitted = one.post("/v1/jobs", json={"model": "tiny-rm", "items": batch}).json()
        first.stop()  # the gateway that accepted the batch is gone
        with two.stream("GET", f"/v1/jobs/{submitted['id']}/stream") as response:
            streamed = list(stream_lines(response))
        assert sorted(r["index"] for r in streamed) == list(range(40))
        status = two.get(f"/v1/jobs/{submitted['id']}").json()
        assert status["status"] == "done"
        assert [r["id"] for r in status["results"]] == [item["id"] for item in batch]

        # The worker cached every result: the same items again come from the cache.
        response = two.post("/v1/score", json={"model": "tiny-rm", "items": batch})
        assert response.status_code == 200, response.text
        again = response.json()
        assert all(r["cached"] for r in again["results"])
        by_index = {r["index"]: r["score"] for r in streamed}
        assert [r["score"] for r in again["results"]] == [by_index[i] for i in range(40)]

        no_worker = two.post("/v1/score", json={"model": "tiny-prm", "items": batch[:1]})
        assert no_worker.status_code == 503
        assert "no worker is running" in no_worker.json()["error"]["message"]
        assert two.get("/v1/jobs/batch-unknown").status_code == 404
