"""Session fixtures: tiny models generated once, tiny twins of real models built on first use,
and a real `rmserve serve` on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from rmserve.models.tiny import make_tiny_models
from rmserve.models.tiny.twins import build_twin
from rmserve.service.launcher import RedisClusterNodes, RedisServer, ServerFailed, ServerProcess

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


class TwinModels:
    """Tiny twins of real models (rmserve.models.tiny.twins), each built the first time a test
    asks for it and kept for the session: `twin_models["twin-skywork-qwen3-rm"]` is its
    directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._built:
            self._built[name] = build_twin(name, self.root)
        return self._built[name]


@pytest.fixture(scope="session")
def twin_models(tmp_path_factory: pytest.TempPathFactory) -> TwinModels:
    return TwinModels(tmp_path_factory.mktemp("twin-models"))


def start_server(registry: Path, workdir: Path, env: dict[str, str]) -> ServerProcess:
    """A real `rmserve serve` whose models have all settled (ready or unavailable)."""
    server = ServerProcess(registry, workdir / "server.log", env=env)
    try:
        server.wait_settled(timeout_s=600)
    except ServerFailed as exc:
        server.stop()
        pytest.fail(str(exc))
    return server


@contextlib.contextmanager
def ready_client(registry: Path, workdir: Path, env: dict[str, str]) -> Iterator[httpx.Client]:
    """A client of a real `rmserve serve` all of whose models are ready; stopped on exit."""
    server = start_server(registry, workdir, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            models = client.get("/v1/models").json()["data"]
            assert all(m["status"] == "ready" for m in models), models
            yield client
    finally:
        server.stop()


def close_engine_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close the event loop an in-process vLLM AsyncLLM ran on, after its shutdown(). Called
    from outside the loop, vLLM schedules the closing of its ZMQ sockets on that loop
    (core_client.py, BackgroundResources); unless the loop runs once more they stay open, and
    the garbage-collected ZMQ context later blocks forever in term(), in whatever test runs."""
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    gc.collect()  # a context left behind would block here, at its own module's teardown


def start_sandbox(
    log: Path, env: Mapping[str, str] | None = None, port: int | None = None
) -> ServerProcess:
    """A real `rmserve sandbox`, ready (the test fails, the process stopped, if it is not)."""
    sandbox = ServerProcess(None, log, command="sandbox", env=env, port=port)
    try:
        sandbox.wait_ready(60)
    except ServerFailed as exc:
        sandbox.stop()
        pytest.fail(str(exc))
    return sandbox


@contextlib.contextmanager
def running_sandbox(log: Path, env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    """`start_sandbox`, stopped on leaving."""
    sandbox = start_sandbox(log, env)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(scope="session")
def server(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "RMSERVE_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
        "RMSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "RMSERVE_RESULT_CACHE_TTL_S": "600",
    }
    running = start_server(TINY_REGISTRY, tmp_path_factory.mktemp("server"), env)
    try:
        yield running
    finally:
        # SIGTERM drains the workers and shuts the engines down within the grace period (no
        # SIGKILL); uvicorn then re-raises the signal, so the exit status is -SIGTERM.
        assert running.stop(grace_s=60) in (0, -signal.SIGTERM), running.log_tail()
        # (Python's resource tracker may warn about engine leftovers after the last line.)
        assert "Application shutdown complete" in running.log_tail(40), running.log_tail()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning every slot: what would cross slots fails (CROSSSLOT)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-cluster"), cluster=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A real 3-node Redis Cluster (redis-cli --cluster create, no replicas): the slots spread
    over the nodes, for clients that must follow them (RMSERVE_REDIS_CLUSTER)."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster3"), nodes=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """A real Redis, flushed before each test: a standalone server, then a one-node Cluster
    (every key a script or transaction touches must share one slot)."""
    server: RedisServer = request.getfixturevalue(
        "redis_server" if request.param == "standalone" else "redis_cluster"
    )
    server.flush()
    return server.url


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield http
