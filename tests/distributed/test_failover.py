"""Redis high availability (issue 25): a primary with two replicas behind a real Sentinel. Under
load (synchronous requests and async batches), the primary is killed with kill -9; Sentinel
promotes a replica; the gateway and the worker follow it without restarts. With
RMSERVE_REDIS_WAIT_REPLICAS=1 an accepted request is on a replica before it is admitted, so:
no accepted item is lost, none is answered twice, none is scored wrong, and the only other
answer is a 503 (Redis unreachable, or no replica to confirm) until the new primary has its
replica (two replicas, as in production: Sentinel points the other at the promoted one)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from rmserve.service.launcher import RedisSentinel, RedisServer
from tests.distributed.conftest import Fleet, items, stream_lines, wait_for_workers

pytestmark = pytest.mark.engine

POOL = items(24, prefix="f")  # every request scores items of this pool: a known score each
RECOVERY_S = 30.0  # from the kill to the first request admitted again, at most


@dataclass
class Sent:
    started: float
    status: int | str
    ids: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    batch: str | None = None


class Load(threading.Thread):
    """Back-to-back requests of 4 pool items; every 5th an async batch (POST /v1/jobs)."""

    def __init__(self, base_url: str, number: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base_url, self.number, self.stop = base_url, number, stop
        self.sent: list[Sent] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                chosen = [POOL[(self.number * 7 + n * 4 + k) % len(POOL)] for k in range(4)]
                path = "/v1/jobs" if n % 5 == 0 else "/v1/score"
                sent = Sent(time.monotonic(), 0, [item["id"] for item in chosen])
                try:
                    response = client.post(path, json={"model": "tiny-rm", "items": chosen})
                    sent.status = response.status_code
                    body = response.json()
                    if response.status_code == 200:
                        sent.results = body["results"]
                    elif response.status_code == 202:
                        sent.batch = body["id"]
                    else:
                        sent.message = body["error"]["message"]
                except httpx.HTTPError as exc:
                    sent.status = type(exc).__name__
                self.sent.append(sent)
                if sent.status not in (200, 202):
                    time.sleep(0.2)


@pytest.fixture
def ha(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Fleet, RedisSentinel]]:
    fleet = Fleet(tmp_path)  # its redis is the primary
    for name in ("replica0", "replica1", "sentinel"):
        (tmp_path / name).mkdir()
    replicas = [RedisServer(tmp_path / f"replica{i}", replica_of=fleet.redis.port) for i in (0, 1)]
    sentinel = RedisSentinel(tmp_path / "sentinel", fleet.redis.port)
    try:
        for replica in replicas:
            replica.start()
        sentinel.start()
        deadline = time.monotonic() + 30
        watcher = redis.Redis(port=sentinel.port)
        while time.monotonic() < deadline:
            linked = [redis.Redis(port=r.port).info("replication") for r in replicas]
            known = watcher.execute_command("SENTINEL", "REPLICAS", sentinel.service)
            if all(r.get("master_link_status") == "up" for r in linked) and len(known) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the replicas did not sync, or the sentinel did not find them")
        yield fleet, sentinel
    finally:
        sentinel.stop()
        for replica in replicas:
            replica.stop()
        fleet.stop()


def test_the_fleet_follows_a_failover_and_loses_nothing_accepted(
    ha: tuple[Fleet, RedisSentinel],
) -> None:
    fleet, sentinel = ha
    env = {
        "RMSERVE_REDIS_SENTINELS": sentinel.address,
        "RMSERVE_REDIS_WAIT_REPLICAS": "1",
        "RMSERVE_REDIS_TIMEOUT_S": "2",
    }
    gateway = fleet.gateway(**env)
    (worker,) = fleet.workers(1, **env)
    stop = threading.Event()
    clients = [Load(gateway.base_url, i, stop) for i in range(3)]
    marks: dict[str, float] = {}
    with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
        wait_for_workers(http, "tiny-rm", 1)
        reference = {
            r["id"]: r["score"]
            for r in http.post("/v1/score", json={"model": "tiny-rm", "items": POOL}).json()[
                "results"
            ]
        }
        try:
            for client in clients:
                client.start()
            time.sleep(3)
            assert fleet.redis.process is not None
            fleet.redis.process.kill()  # kill -9 of the primary, under load
            fleet.redis.process.wait(10)
            marks["killed"] = time.monotonic()
            deadline = time.monotonic() + RECOVERY_S
            while sentinel.primary() == fleet.redis.port:
                assert time.monotonic() < deadline, "Sentinel did not promote the replica"
                time.sleep(0.2)
            marks["promoted"] = time.monotonic()  # the other replica now follows the new one
            time.sleep(10)
        finally:
            stop.set()
            for client in clients:
                client.join(90)
        sent = [s for client in clients for s in client.sent]
        assert not any(client.is_alive() for client in clients), "a client hangs"
        statuses = Counter(s.status for s in sent)
        assert set(statuses) <= {200, 202, 503}, statuses
        for s in sent:
            if s.status == 503:
                assert "unreachable" in s.message or "replicas" in s.message, s
            if s.status == 200:
                assert Counter(r["id"] for r in s.results) == Counter(s.ids), s  # none twice
                for r in s.results:
                    assert r["error"] is None, r
                    assert r["score"] == pytest.approx(reference[r["id"]], abs=1e-4), r
        for s in sent:  # every accepted batch completes: each item once, right
            if s.batch is None:
                continue
            with http.stream("GET", f"/v1/jobs/{s.batch}/stream", timeout=60) as response:
                got = list(stream_lines(response))
            assert sorted(r["index"] for r in got) == [0, 1, 2, 3], (s, got)
            for r in got:
                assert r["error"] is None, r
                assert r["score"] == pytest.approx(reference[s.ids[r["index"]]], abs=1e-4)
        admitted_after = [
            s.started - marks["killed"]
            for s in sent
            if s.status in (200, 202) and s.started > marks["killed"]
        ]
        refused = Counter(s.message[:90] for s in sent if s.status == 503)
        assert admitted_after, (statuses, marks, refused)
        recovery = min(admitted_after)
        print(f"statuses {dict(statuses)}; first admitted {recovery:.1f} s after the kill; "
              f"promoted after {marks['promoted'] - marks['killed']:.1f} s")  # fmt: skip
        assert recovery < RECOVERY_S
        assert sum(1 for s in sent if s.status == 200 and s.started > marks["promoted"]) > 0
    assert gateway.process.poll() is None and worker.process.poll() is None  # no restarts
