"""Run rmserve (`serve`, `gateway`, `worker`) and redis-server as child processes on loopback.

Used by `rmserve demo`, the end-to-end tests and the benchmarks: each is an HTTP client of
servers started exactly as an operator would start them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis


class ServerFailed(RuntimeError):
    """The server exited, or its models did not settle in time; the message has the log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """`rmserve <command> --registry REGISTRY [args]` on a free (or the given) loopback port
    (`registry` None: a command without one, `rmserve sandbox`)."""

    def __init__(
        self,
        registry: Path | None,
        log_path: Path,
        *,
        command: str = "serve",
        args: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "rmserve.service.cli", command,
            *(["--registry", str(registry)] if registry is not None else []),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerFailed(
                f"the server exited with code {self.process.returncode}; "
                f"last log lines:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until GET /readyz answers 200 (a worker: its model is loaded)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise ServerFailed(f"not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def wait_settled(
        self, timeout_s: float, on_loading: Callable[[list[str]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until no model is loading; return GET /v1/models data."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    models: list[dict[str, Any]] = client.get("/v1/models").json()["data"]
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                loading = [model["name"] for model in models if model["status"] == "loading"]
                if not loading:
                    return models
                if on_loading is not None:
                    on_loading(loading)
                time.sleep(0.5)
        raise ServerFailed(f"models still loading after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 90) -> int:
        """SIGTERM (drain and shut the engines down), then SIGKILL after `grace_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class RedisServer:
    """A real redis-server on a free loopback port, in `workdir`, with AOF on (a restart
    keeps the streams)."""

    def __init__(
        self,
        workdir: Path,
        replica_of: int | None = None,
        cluster: bool = False,
        own_every_slot: bool = True,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; scripts/install.sh installs it")
        self.workdir, self.binary = workdir, binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.replica_of = replica_of  # the port of its primary, on loopback
        # A one-node Redis Cluster that owns every slot: commands and scripts that would cross
        # slots fail (CROSSSLOT) as they would in a real cluster. Its bus gets a free port of
        # its own (by default it takes port + 10000, which may be taken or above 65535).
        self.cluster = cluster
        self.own_every_slot = own_every_slot  # False: a node of RedisClusterNodes
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        replica = ["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []
        cluster = (
            ["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
             "--cluster-config-file", str(self.workdir / f"nodes-{self.port}.conf")]
            if self.cluster else []
        )  # fmt: skip
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--appendonly", "yes", "--save", "", *replica,
             *cluster],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_for_ping()
        if self.cluster and self.own_every_slot:
            self._own_every_slot()

    def _own_every_slot(self) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        info: Any = client.cluster("INFO")
        if int(info.get("cluster_slots_assigned", 0)) == 0:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if client.cluster("INFO").get("cluster_state") == "ok":
                return
            time.sleep(0.1)
        raise RuntimeError("the one-node Redis Cluster did not become ready")

    def _wait_for_ping(self) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # e.g. a replica writing its first AOF
                self.process.kill()
                self.process.wait(10)

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class RedisClusterNodes:
    """A real Redis Cluster of `nodes` primaries (no replicas) on free loopback ports, joined
    with `redis-cli --cluster create`: the slots are spread over the nodes, so the keys of two
    models may live on different nodes. `url` names the first node (a cluster client
    discovers the others)."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed; scripts/install.sh installs it")
        self.nodes = [
            RedisServer(workdir, cluster=True, own_every_slot=False) for _ in range(nodes)
        ]
        self.url = self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self._ready(node.port) for node in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ready")

    def _ready(self, port: int) -> bool:
        """The node says ok and knows every other node (the slot map is the same on all)."""
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        info: Any = client.cluster("INFO")
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(
            self.nodes
        )

    def node_of(self, key: str) -> int:
        """The port of the node that holds `key`'s slot."""
        client = redis.Redis(port=self.nodes[0].port)
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]
        shards: Any = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        for start, end, primary, *_ in shards:
            if int(start) <= slot <= int(end):
                return int(primary[1])
        raise RuntimeError(f"no node holds slot {slot}")

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class RedisSentinel(RedisServer):
    """A real Redis Sentinel (redis-server --sentinel) on a free loopback port, watching the
    primary on `primary_port` as `service`: down after `down_after_ms` without an answer, then
    a failover to its replica. One sentinel (quorum 1): enough on one machine; production runs
    three or more."""

    def __init__(
        self, workdir: Path, primary_port: int, service: str = "mymaster", down_after_ms: int = 1000
    ) -> None:
        super().__init__(workdir)
        self.primary_port, self.service, self.down_after_ms = primary_port, service, down_after_ms
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.workdir / f"sentinel-{self.port}.conf"  # sentinel rewrites it
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 10000\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_for_ping()

    def primary(self) -> int:
        """The port of the primary the sentinel names now."""
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        address: Any = client.sentinel_get_master_addr_by_name(self.service)
        return int(address[1])
