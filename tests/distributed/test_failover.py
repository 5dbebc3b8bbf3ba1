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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rmserve.service.launcher import RedisSentinel, RedisServer
from tests.distributed.conftest import Fleet, wait_for_workers
from tests.distributed.traffic import Load, check, first_admitted_after, reference

pytestmark = pytest.mark.engine

RECOVERY_S = 30.0  # from the kill to the first request admitted again, at most


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
        scores = reference(http)
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
        statuses = check(http, sent, scores, allowed={503})
        for s in sent:
            if s.status == 503:
                assert "unreachable" in s.message or "replicas" in s.message, s
        recovery = first_admitted_after(sent, marks["killed"])
        print(f"statuses {dict(statuses)}; first admitted {recovery} s after the kill; "
              f"promoted after {marks['promoted'] - marks['killed']:.1f} s")  # fmt: skip
        assert recovery is not None and recovery < RECOVERY_S, (statuses, marks)
        assert sum(1 for s in sent if s.status == 200 and s.started > marks["promoted"]) > 0
    assert gateway.process.poll() is None and worker.process.poll() is None  # no restarts
