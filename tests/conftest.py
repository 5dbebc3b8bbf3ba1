"""Session fixtures: tiny models generated once, and a real `rmserve serve` on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.tiny import make_tiny_models
from service.demo import free_port

TESTS = Path(__file__).parent
TINY_REGISTRY = TESTS / "registry.tiny.yaml"
MAX_ITEMS = 16
MAX_BYTES = 1 << 20


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny-models")
    paths = make_tiny_models(out)
    broken = out / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (broken / "tokenizer.json").write_text((paths["tiny-rm"] / "tokenizer.json").read_text())
    os.environ["RMSERVE_TINY_MODELS"] = str(out)
    return paths


class Server:
    def __init__(self, base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base_url, self.process, self.log = base_url, process, log

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_server(registry: Path, workdir: Path, env: dict[str, str]) -> Server:
    port = free_port()
    log = workdir / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--registry",
                str(registry),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_until_settled(server: Server, timeout_s: float = 600) -> list[dict[str, object]]:
    """Wait until no model is loading; return GET /v1/models data."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            models = httpx.get(server.base_url + "/v1/models", timeout=5).json()["data"]
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if all(model["status"] != "loading" for model in models):
            return list(models)
        time.sleep(1)
    pytest.fail(f"models still loading after {timeout_s} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {
        "RMSERVE_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
        "RMSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    running = start_server(TINY_REGISTRY, tmp_path_factory.mktemp("server"), env)
    try:
        wait_until_settled(running)
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield http
