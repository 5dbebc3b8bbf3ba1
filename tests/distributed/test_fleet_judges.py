"""A judge worker reaches its meta reward model through Redis: the meta model's own workers rate
the judgements, and the judge says so when none is running."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.fleet import REFRESH_S
from tests.conftest import TESTS, start_sandbox
from tests.distributed.conftest import Fleet, wait_for_workers

pytestmark = pytest.mark.engine


@pytest.fixture
def judge_fleet(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path, TESTS / "registry.judge.yaml")
    try:
        yield running
    finally:
        running.stop()


def judged(client: httpx.Client) -> dict[str, Any]:
    item = {"messages": [{"role": "user", "content": "What is 12 * 7?"},
                         {"role": "assistant", "content": "84"}]}  # fmt: skip
    options = {"judge": {"samples": 4, "return_samples": True}}
    body = {"model": "tiny-judge-structured", "items": [item], "options": options}
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def test_a_judge_worker_filters_with_meta_model_workers(judge_fleet: Fleet) -> None:
    gateway = judge_fleet.gateway()
    judge_fleet.workers(1, "tiny-judge-structured")
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        wait_for_workers(client, "tiny-judge-structured", 1)
        alone = judged(client)
        assert alone["error"]["type"] == "peer_unavailable", alone
        assert "rmserve worker --model tiny-meta-rm" in alone["error"]["message"]

        judge_fleet.workers(1, "tiny-meta-rm")
        wait_for_workers(client, "tiny-meta-rm", 1)
        # The judge worker follows the fleet on its own clock (every REFRESH_S).
        deadline = time.monotonic() + 5 * REFRESH_S
        while (filtered := judged(client))["error"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert filtered["error"] is None, filtered
        kept = [s for s in filtered["samples"] if s["kept"]]
        assert len(kept) == 2 and all(s["meta_score"] is not None for s in filtered["samples"])
        assert filtered["score"] == pytest.approx(sum(s["score"] for s in kept) / 2)


def test_an_agentic_judge_worker_calls_its_sandbox_sidecar(judge_fleet: Fleet) -> None:
    sidecar = start_sandbox(judge_fleet.workdir / "sandbox.log")
    try:
        gateway = judge_fleet.gateway()
        judge_fleet.workers(1, "tiny-agent-judge", RMSERVE_SANDBOX_URL=sidecar.base_url)
        item = {"messages": [{"role": "user", "content": "What is 12 * 7?"},
                             {"role": "assistant", "content": "84"}],
                "documents": [{"id": "facts", "text": "12 times 7 is 84."}]}  # fmt: skip
        with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
            wait_for_workers(client, "tiny-agent-judge", 1)
            body = {"model": "tiny-agent-judge", "items": [item]}
            (result,) = client.post("/v1/score", json=body).json()["results"]
        assert result["error"] is None, result
        (call,) = result["evidence"]
        assert call["tool"] in ("calculator", "search") and call["elapsed_s"] > 0
        metrics = text_string_to_metric_families(httpx.get(f"{sidecar.base_url}/metrics").text)
        samples = [s for family in metrics for s in family.samples]
        ran = [
            s for s in samples
            if s.name == "rmserve_tool_calls_total" and s.labels["tool"] == call["tool"]
        ]  # fmt: skip
        assert ran and ran[0].value == 1  # the call ran in the sidecar
    finally:
        sidecar.stop()
