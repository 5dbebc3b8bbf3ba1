"""Two tenants sharing one real fleet (redis-server, `rmserve gateway`, `rmserve worker` of
tiny-rm), their keys and tenants in a keys file: an interactive tenant's request is scored
ahead of a training tenant's backlog, which waits in Redis's waiting room; a batch tenant's
waits behind all of it. Each tenant's items are counted by the worker's metrics
and in the usage the gateway reports, each key seeing its own tenant only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from rmserve.service.auth import hash_key, new_key
from tests.distributed.conftest import Fleet, counter_total, items, wait_for_workers

pytestmark = pytest.mark.engine

BACKLOG = 600  # the training tenant's async batch, one item per prompt
CONCURRENCY = 4  # RMSERVE_WORKER_CONCURRENCY: the rest of the backlog waits in Redis


def keys_file(path: Path, priority: str) -> dict[str, str]:
    """Keys of tenants `bulk` (training) and `live` (of class `priority`), both of weight 1."""
    keys = {"bulk": new_key(), "live": new_key()}
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"name": "bulk", "weight": 1, "priority": "training"},
                    {"name": "live", "weight": 1, "priority": priority},
                ],
                "keys": [
                    {"name": f"key-{name}", "sha256": hash_key(key), "tenants": [name]}
                    for name, key in keys.items()
                ],
            }
        )
    )
    return keys


def until(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def client(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_an_interactive_request_overtakes_a_training_backlog_and_a_batch_one_waits(
    fleet: Fleet, tmp_path: Path, priority: str
) -> None:
    keys = keys_file(tmp_path / "keys.yaml", priority)
    env = {
        "RMSERVE_API_KEYS_FILE": str(tmp_path / "keys.yaml"),
        "RMSERVE_WORKER_CONCURRENCY": str(CONCURRENCY),
    }
    gateway = fleet.gateway(**env)
    (worker,) = fleet.workers(1, **env)
    with (
        client(gateway.base_url, keys["bulk"]) as bulk,
        client(gateway.base_url, keys["live"]) as live,
    ):
        wait_for_workers(bulk, "tiny-rm", 1)
        started = bulk.post("/v1/jobs", json={"model": "tiny-rm", "items": items(BACKLOG, "b")})
        assert started.status_code == 202, started.text
        batch = started.json()["id"]
        until(lambda: bulk.get(f"/v1/jobs/{batch}").json()["finished"] > 0)  # being scored

        answer = live.post("/v1/score", json={"model": "tiny-rm", "items": items(4, "l")})
        assert answer.status_code == 200, answer.text
        assert all(r["error"] is None for r in answer.json()["results"]), answer.text
        behind = BACKLOG - bulk.get(f"/v1/jobs/{batch}").json()["finished"]
        if priority == "interactive":
            # Ahead of all but what the worker held: most of the backlog is still to come.
            assert behind >= BACKLOG // 4, behind
        else:  # released only once the whole backlog was: it waited behind all of it
            assert behind <= CONCURRENCY, behind

        until(lambda: bulk.get(f"/v1/jobs/{batch}").json()["status"] == "done")
        status = bulk.get(f"/v1/jobs/{batch}").json()
        assert all(r["error"] is None for r in status["results"])
        assert counter_total(worker, "rmserve_tenant_items", tenant="live", outcome="ok") == 4
        assert counter_total(worker, "rmserve_tenant_items", tenant="bulk", outcome="ok") == BACKLOG
        until(lambda: bool(live.get("/v1/usage").json()["tenants"]))  # flushed every second
        usage = live.get("/v1/usage").json()
        assert [t["tenant"] for t in usage["tenants"]] == ["live"], usage
        assert sum(m["items"] for m in usage["tenants"][0]["models"]) == 4, usage
