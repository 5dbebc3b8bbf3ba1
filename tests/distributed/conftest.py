"""A fleet: its own real redis-server, `rmserve gateway` and `rmserve worker` processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.launcher import RedisServer, ServerFailed, ServerProcess
from tests.conftest import TINY_REGISTRY

RECLAIM_IDLE_S = 3.0
BASE_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "RMSERVE_RECLAIM_IDLE_S": str(RECLAIM_IDLE_S),
    "RMSERVE_MAX_ITEMS_PER_REQUEST": "1000",
}


def items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "messages": [
            {"role": "user", "content": f"{prefix} question {i}"},
            {"role": "assistant", "content": f"answer {i} " * (i % 9 + 1)},
        ]}
        for i in range(n)
    ]  # fmt: skip


class Fleet:
    def __init__(self, workdir: Path, registry: Path = TINY_REGISTRY) -> None:
        self.workdir, self.registry = workdir, registry
        self.redis = RedisServer(workdir)
        self.redis.start()
        self.processes: list[ServerProcess] = []

    def _start(self, command: str, args: list[str], env: dict[str, str]) -> ServerProcess:
        name = f"{command}{len(self.processes)}"
        process = ServerProcess(
            self.registry,
            self.workdir / f"{name}.log",
            command=command,
            args=["--redis-url", self.redis.url, *args],
            env={**BASE_ENV, **env},
        )
        self.processes.append(process)
        return process

    def gateway(self, **env: str) -> ServerProcess:
        gateway = self._start("gateway", [], env)
        self._wait_ready([gateway], timeout_s=60)
        return gateway

    def workers(self, n: int, model: str = "tiny-rm", **env: str) -> list[ServerProcess]:
        """n workers of `model`, started together, each with its model loaded."""
        started = [self._start("worker", ["--model", model], env) for _ in range(n)]
        self._wait_ready(started, timeout_s=600)
        return started

    @staticmethod
    def _wait_ready(processes: list[ServerProcess], timeout_s: float) -> None:
        try:
            for process in processes:
                process.wait_ready(timeout_s)
        except ServerFailed as exc:
            pytest.fail(str(exc))

    def stop(self) -> None:
        for process in self.processes:
            if process.process.poll() is None:
                kill_tree(process)
        self.redis.stop()


def kill_tree(process: ServerProcess, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the server process; SIGKILL also takes its engine-core children."""
    children = psutil.Process(process.process.pid).children(recursive=True)
    process.process.send_signal(sig)
    if sig == signal.SIGKILL:
        process.process.wait(30)
        for child in children:
            if child.is_running():
                child.kill()


def wait_for_workers(client: httpx.Client, model: str, n: int, timeout_s: float = 30) -> None:
    """Until the gateway counts `n` ready workers of `model` (it refreshes every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = {m["name"]: m for m in client.get("/v1/models").json()["data"]}[model]
        if info["status"] == "ready" and info["workers"] == n:
            return
        time.sleep(0.2)
    pytest.fail(f"the gateway does not see {n} ready workers of {model}")


def jobs_done(worker: ServerProcess) -> float:
    """Jobs this worker finished (any outcome), from its /metrics."""
    text = httpx.get(f"{worker.base_url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "rmserve_jobs"
        for sample in family.samples
        if sample.name == "rmserve_jobs_total"
    )


def stream_lines(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


@pytest.fixture
def fleet(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def grpo_group(prompt: int, n: int, tag: str = "g") -> list[dict[str, Any]]:
    """`n` items answering one long prompt (a GRPO group): the same user turn, n responses."""
    question = f"prompt {prompt}: " + " ".join(f"word{prompt}x{j}" for j in range(18))
    return [
        {"id": f"{tag}{prompt}-{i}", "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"response {i} of {tag}"},
        ]}
        for i in range(n)
    ]  # fmt: skip


def counter_total(server: ServerProcess, family_name: str, **labels: str) -> float:
    """The sum of a counter's `_total` samples whose labels include `labels`, from /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    wanted = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == family_name
        for sample in family.samples
        if sample.name == f"{family_name}_total" and wanted <= set(sample.labels.items())
    )
