"""Run `rmserve serve` as a child process on a loopback port and wait for its models.

Used by `rmserve demo`, the end-to-end tests and the benchmark: each is an HTTP client of a
server started exactly as an operator would start it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx


class ServerFailed(RuntimeError):
    """The server exited, or its models did not settle in time; the message has the log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    def __init__(
        self,
        registry: Path,
        log_path: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "service.cli", "serve", "--registry", str(registry),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def wait_settled(
        self, timeout_s: float, on_loading: Callable[[list[str]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until no model is loading; return GET /v1/models data."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerFailed(
                        f"the server exited with code {self.process.returncode}; "
                        f"last log lines:\n{self.log_tail()}"
                    )
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
