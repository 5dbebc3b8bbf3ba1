"""Chaos under load: real redis-server, gateway, workers and sandbox processes; while clients
keep sending requests, a worker is killed (kill -9), the sandbox is killed and restarted, and
Redis is restarted. Every accepted item ends with a score or an explicit error, exactly once,
within its deadline; requests that are not accepted get 429 or 503 in the error envelope."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TESTS, start_sandbox
from tests.distributed.conftest import Fleet, items, kill_tree, wait_for_workers

pytestmark = pytest.mark.engine

TIMEOUT_S = 45.0
CODE = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS_OF_ADD = [{"code": "assert add(2, 3) == 5"}, {"code": "assert add(-1, 1) == 0"}]


@dataclass
class Outcome:
    model: str
    items: int
    started: float
    elapsed: float
    status: int | str  # HTTP status, or the transport error's name
    results: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None


def request_body(n: int, model: str, stream: bool) -> dict[str, Any]:
    if model == "unit-tests":
        batch = [
            {"messages": [{"role": "user", "content": "add"},
                          {"role": "assistant", "content": CODE}], "tests": TESTS_OF_ADD}
            for _ in range(2)
        ]  # fmt: skip
    else:
        batch = items(6, prefix=f"c{n}-")
    return {"model": model, "items": batch, "options": {"timeout_s": TIMEOUT_S, "stream": stream}}


class Load(threading.Thread):
    """One client sending requests back to back (tiny-rm and code_tests, some streamed)."""

    def __init__(self, base_url: str, number: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base_url, self.number, self.stop = base_url, number, stop
        self.outcomes: list[Outcome] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=TIMEOUT_S + 30) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                model = "unit-tests" if n % 3 == 0 else "tiny-rm"
                self.outcomes.append(self.send(client, request_body(n, model, n % 4 == 0)))
                if self.outcomes[-1].status not in (200,):
                    time.sleep(0.2)  # a refused request: back off a little, like a client

    def send(self, client: httpx.Client, body: dict[str, Any]) -> Outcome:
        started = time.monotonic()
        outcome = Outcome(body["model"], len(body["items"]), started, 0.0, 0)
        try:
            with client.stream("POST", "/v1/score", json=body) as response:
                outcome.status = response.status_code
                text = response.read().decode()
            if outcome.status != 200:
                outcome.error = json.loads(text)["error"]
            elif body["options"]["stream"]:
                outcome.results = [json.loads(line) for line in text.splitlines() if line]
            else:
                outcome.results = json.loads(text)["results"]
        except httpx.HTTPError as exc:
            outcome.status = type(exc).__name__
        outcome.elapsed = time.monotonic() - started
        return outcome


def test_kill_worker_kill_sandbox_restart_redis_under_load(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path, TESTS / "registry.verifiers.yaml")
    sandbox = start_sandbox(tmp_path / "sandbox.log")
    stop = threading.Event()
    clients: list[Load] = []
    try:
        gateway = fleet.gateway()
        victim, _ = fleet.workers(2, "tiny-rm")
        fleet.workers(1, "unit-tests", RMSERVE_SANDBOX_URL=sandbox.base_url)
        with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
            wait_for_workers(http, "tiny-rm", 2)
            wait_for_workers(http, "unit-tests", 1)
        clients = [Load(gateway.base_url, i, stop) for i in range(3)]
        for client in clients:
            client.start()
        marks = {"start": time.monotonic()}

        time.sleep(3)
        kill_tree(victim, signal.SIGKILL)  # its in-flight jobs are reclaimed by the other
        marks["worker killed"] = time.monotonic()
        time.sleep(4)

        kill_tree(sandbox, signal.SIGKILL)  # code runs fail explicitly until it is back
        marks["sandbox killed"] = time.monotonic()
        time.sleep(3)
        sandbox = start_sandbox(tmp_path / "sandbox-restarted.log", port=sandbox.port)
        marks["sandbox back"] = time.monotonic()
        time.sleep(3)

        fleet.redis.stop()  # 503s while it is down; jobs survive in the AOF
        marks["redis stopped"] = time.monotonic()
        time.sleep(3)
        fleet.redis.start()
        marks["redis back"] = time.monotonic()
        time.sleep(8)
    finally:
        stop.set()
        for client in clients:
            client.join(TIMEOUT_S + 60)
        sandbox.stop()
        fleet.stop()

    outcomes = [outcome for client in clients for outcome in client.outcomes]
    assert not any(client.is_alive() for client in clients), "a client hangs"
    statuses = Counter(outcome.status for outcome in outcomes)
    assert set(statuses) <= {200, 429, 503}, statuses  # no 5xx but 503, no broken connection
    for outcome in outcomes:
        assert outcome.elapsed < TIMEOUT_S + 10, outcome  # nothing waits past its deadline
        if outcome.status != 200:
            assert outcome.error is not None and outcome.error["message"], outcome
            continue
        indexes = Counter(result["index"] for result in outcome.results)
        assert indexes == Counter(range(outcome.items)), outcome  # none lost, none twice
        for result in outcome.results:
            explicit = result["error"] is not None and result["error"]["type"]
            assert (result["score"] is not None) != bool(explicit), result

    def accepted_after(mark: str) -> int:
        return sum(1 for o in outcomes if o.status == 200 and o.started > marks[mark])

    assert accepted_after("worker killed") > 0 and accepted_after("redis back") > 0
    scored = Counter(
        (o.model, r["error"]["type"] if r["error"] else "ok")
        for o in outcomes
        if o.status == 200
        for r in o.results
    )
    assert scored[("tiny-rm", "ok")] > 0 and scored[("unit-tests", "ok")] > 0, scored
    allowed = {("tiny-rm", "ok"), ("unit-tests", "ok"), ("unit-tests", "sandbox_error")}
    assert set(scored) <= allowed, scored
    # Code runs fail (explicitly) only while the sandbox is down, and work again after.
    for outcome in outcomes:
        for result in outcome.results:
            if result["error"] is not None:
                assert "sandbox is unreachable" in result["error"]["message"], result
                assert outcome.started < marks["sandbox back"], (outcome, marks)
    assert any(
        o.model == "unit-tests" and o.status == 200 and o.started > marks["sandbox back"]
        and all(r["error"] is None for r in o.results)
        for o in outcomes
    )  # fmt: skip
