"""A real `rmserve serve` with weight-free verifiers (no engine: it starts in seconds) for the
trainer adapters, and a recording proxy in front of it that shows what the adapters send."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.launcher import ServerProcess
from tests.conftest import start_server

REGISTRY = """\
models:
  math:
    kind: math
  exact:
    kind: similarity
    options: {metric: exact}
"""


@pytest.fixture(scope="session")
def verifiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`rmserve serve` with the `math` and `exact` verifiers; /get_reward defaults to math."""
    workdir = tmp_path_factory.mktemp("client-verifiers")
    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    server = start_server(registry, workdir, {"RMSERVE_OPENRLHF_MODEL": "math"})
    try:
        yield server
    finally:
        server.stop()


def requests_served(server: ServerProcess, route: str) -> float:
    """rmserve_http_requests_total of `route`, all status codes, from the server's /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rmserve_http_requests_total" and sample.labels.get("route") == route
    )


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


class RecordingProxy:
    """A real HTTP proxy on 127.0.0.1:<free port> that forwards every request to `target` and
    records it (method, path with query, Authorization, JSON body)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.recorded: list[Recorded] = []
        self._lock = threading.Lock()
        self._upstream = httpx.Client(base_url=target, timeout=300)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _forwarder(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._upstream.close()

    def bodies(self, path_prefix: str) -> list[Any]:
        with self._lock:
            return [r.body for r in self.recorded if r.path.startswith(path_prefix)]

    def record(self, recorded: Recorded) -> None:
        with self._lock:
            self.recorded.append(recorded)

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response:
        return self._upstream.request(method, path, headers=headers, content=body)


def _forwarder(proxy: RecordingProxy) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            proxy.record(
                Recorded(
                    self.command,
                    self.path,
                    self.headers.get("authorization"),
                    json.loads(body) if body else None,
                )
            )
            keep = ("content-type", "authorization")
            headers = {k: v for k, v in self.headers.items() if k.lower() in keep}
            answer = proxy.forward(self.command, self.path, headers, body)
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() in ("content-type", "retry-after"):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = _forward

    return Forward


@pytest.fixture
def proxy(verifiers: ServerProcess) -> Iterator[RecordingProxy]:
    with RecordingProxy(verifiers.base_url) as recording:
        yield recording
