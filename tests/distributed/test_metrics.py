"""Prometheus metrics of a real fleet (redis-server, `rmserve gateway`, two `rmserve worker`
processes): traffic is driven over HTTP and every /metrics is parsed. Counts match what was
sent, summed over worker processes; queue depth follows a held backlog; engine token counts
match the `usage` the responses report."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.launcher import ServerProcess
from tests.distributed.conftest import Fleet, items, wait_for_workers

pytestmark = pytest.mark.engine

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One /metrics: family types, and sample values by (sample name, labels)."""

    def __init__(self, server: ServerProcess) -> None:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        self.types: dict[str, str] = {}
        self.values: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= set(ls))


def summed(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(scrape.total(name, **labels) for scrape in scrapes)


def test_metrics_count_the_traffic_across_gateway_and_worker_processes(fleet: Fleet) -> None:
    gateway = fleet.gateway()
    workers = fleet.workers(2, RMSERVE_WORKER_CONCURRENCY="8")
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        wait_for_workers(client, "tiny-rm", 2)
        usage: dict[str, int] = defaultdict(int)
        for request in range(5):
            response = client.post(
                "/v1/score", json={"model": "tiny-rm", "items": items(6, f"r{request}-")}
            )
            assert response.status_code == 200, response.text
            for result in response.json()["results"]:
                assert result["error"] is None
                usage["prompt_tokens"] += result["usage"]["prompt_tokens"]
        bad = client.post("/v1/score", json={"model": "tiny-rm", "items": [{"messages": 3}]})
        assert bad.status_code == 422
        unknown = client.post("/v1/score", json={"model": "nope", "items": items(1)})
        assert unknown.status_code == 404
        assert client.get("/v1/jobs/no-such-batch").status_code == 404

        held = held_backlog(client, workers, n=8)

        front = Scrape(gateway)
        back = [Scrape(worker) for worker in workers]

    # The gateway: requests by route template and code, jobs accepted, build info.
    assert front.types["rmserve_http_requests"] == "counter"
    assert front.types["rmserve_http_request_duration_seconds"] == "histogram"
    assert front.get("rmserve_http_requests_total", route="/v1/score", code="200") == 5
    assert front.get("rmserve_http_requests_total", route="/v1/score", code="422") == 1
    assert front.get("rmserve_http_requests_total", route="/v1/score", code="404") == 1
    assert front.get("rmserve_http_requests_total", route="/v1/jobs/{batch_id}", code="404") == 1
    assert front.total("rmserve_http_requests_total", route="/v1/jobs/no-such-batch") == 0
    assert front.get("rmserve_http_request_duration_seconds_count", route="/v1/score") == 7
    assert front.get("rmserve_jobs_enqueued_total", model="tiny-rm") == 30 + 8
    assert front.types["rmserve_queue_lag"] == "gauge"
    assert front.get("rmserve_queue_lag", model="tiny-rm") == 0
    assert front.get("rmserve_queue_pending", model="tiny-rm") == 0
    assert ("rmserve_queue_lag", (("model", "tiny-prm"),)) in front.values  # every model
    assert front.total("rmserve_build_info", role="gateway") == 1

    # The backlog held while both workers were stopped, seen by the gateway.
    assert held["pending"] + held["lag"] == 8

    # The workers: summed over both processes, every job counted once.
    scored = 30 + 8
    assert summed(back, "rmserve_jobs_acked_total", model="tiny-rm") == scored
    assert summed(back, "rmserve_jobs_total", model="tiny-rm", outcome="ok") == scored
    assert summed(back, "rmserve_jobs_redelivered_total") == 0
    assert summed(back, "rmserve_jobs_dead_lettered_total") == 0
    assert summed(back, "rmserve_queue_wait_seconds_count", model="tiny-rm") == scored
    assert (
        summed(back, "rmserve_job_duration_seconds_count", model="tiny-rm", kind="discriminative")
        == scored
    )
    assert all(scrape.total("rmserve_build_info", role="worker") == 1 for scrape in back)
    assert all(scrape.get("rmserve_model_ready", model="tiny-rm") == 1 for scrape in back)
    assert all(
        scrape.total("rmserve_http_requests_total", route="/readyz", code="200") >= 1
        for scrape in back
    )

    # The engines: each request advanced once (one pooling step), and the prompt tokens are
    # exactly those the responses report (with the 8 held items of the async batch).
    assert back[0].types["rmserve_engine_batch_size"] == "histogram"
    assert summed(back, "rmserve_engine_batch_size_sum", model="tiny-rm") == scored
    assert summed(back, "rmserve_engine_batch_size_count", model="tiny-rm") >= 1
    prompt_tokens = summed(back, "rmserve_engine_prompt_tokens_total", model="tiny-rm")
    assert prompt_tokens == usage["prompt_tokens"] + held["prompt_tokens"]
    assert summed(back, "rmserve_engine_generation_tokens_total", model="tiny-rm") == 0
    # Every prompt was looked up in its engine's prefix cache once (hits are what it held).
    assert back[0].types["rmserve_engine_prefix_cache_queries"] == "counter"
    queried = summed(back, "rmserve_engine_prefix_cache_queries_total", model="tiny-rm")
    assert queried == prompt_tokens
    hits = summed(back, "rmserve_engine_prefix_cache_hits_total", model="tiny-rm")
    assert 0 <= hits <= queried
    # Every job was routed by the gateway; no worker ever had more than its concurrency (8)
    # routed to it, so none fell back.
    assert front.total("rmserve_routed_jobs_total", route="fallback") == 0
    assert front.total("rmserve_routed_jobs_total", model="tiny-rm") == 30 + 8
    for scrape in back:
        assert 0 <= scrape.get("rmserve_engine_kv_cache_usage_ratio", model="tiny-rm") <= 1
        assert scrape.types["rmserve_engine_running"] == "gauge"


def held_backlog(client: httpx.Client, workers: list[ServerProcess], n: int) -> dict[str, Any]:
    """Stop both workers (SIGSTOP), submit an async batch of `n` items, read the gateway's
    queue gauges, resume the workers and wait for the batch. Returns the gauges and the
    batch's prompt tokens."""
    processes = [psutil.Process(worker.process.pid) for worker in workers]
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        submitted = client.post("/v1/jobs", json={"model": "tiny-rm", "items": items(n, "held")})
        assert submitted.status_code == 202, submitted.text
        text = client.get("/metrics").text
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
    gauges = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name in ("rmserve_queue_pending", "rmserve_queue_lag")
        and sample.labels["model"] == "tiny-rm"
    }
    batch_id = submitted.json()["id"]
    deadline = time.monotonic() + 120
    while (status := client.get(f"/v1/jobs/{batch_id}").json())["status"] != "done":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert all(result["error"] is None for result in status["results"])
    return {
        "pending": gauges["rmserve_queue_pending"],
        "lag": gauges["rmserve_queue_lag"],
        "prompt_tokens": sum(result["usage"]["prompt_tokens"] for result in status["results"]),
    }
