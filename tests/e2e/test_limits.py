"""Input limits and overload shedding of a real `rmserve serve` over HTTP: per-item messages,
characters and images, decompression bombs, oversized bodies, remote image URLs (refused, or
fetched from an allowlisted loopback server), and 429s beyond the concurrent-request and
in-flight-byte limits while probes keep answering."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from rmserve.service.launcher import ServerProcess
from tests.conftest import start_server
from tests.e2e.test_bad_input import error_of

REGISTRY = "models:\n  exact:\n    kind: similarity\n    options: {metric: exact}\n"
MAX_BYTES = 200_000


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(side: int) -> bytes:
    """A PNG whose header claims side x side pixels, in under 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def data_url(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def item(*content: Any, answer: str = "four") -> dict[str, Any]:
    user = {"role": "user", "content": list(content) or "2+2?"}
    return {"messages": [user, {"role": "assistant", "content": answer}], "reference": "four"}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def score(client: httpx.Client, *items: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/score", json={"model": "exact", "items": list(items)})


class Images(http.server.BaseHTTPRequestHandler):
    """A loopback image host: /ok/cat.png, /ok/text, /ok/moved (a redirect), /ok/huge.png."""

    def do_GET(self) -> None:
        routes = {
            "/ok/cat.png": (200, "image/png", png(32, 32)),
            "/ok/text": (200, "text/plain", b"not an image"),
            "/ok/huge.png": (200, "image/png", bomb(9000)),
            "/private/cat.png": (200, "image/png", png(8, 8)),
        }
        if self.path == "/ok/moved":
            self.send_response(302)
            self.send_header("Location", "/private/cat.png")
            self.end_headers()
            return
        status, mime, body = routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def limited(image_host: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    env = {
        "RMSERVE_MAX_MESSAGES_PER_ITEM": "6",
        "RMSERVE_MAX_CHARS_PER_ITEM": "2000",
        "RMSERVE_MAX_IMAGES_PER_ITEM": "2",
        "RMSERVE_MAX_IMAGE_PIXELS": str(100 * 100),
        "RMSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "RMSERVE_IMAGE_URL_ALLOWLIST": f"{image_host}/ok/",
        "RMSERVE_MAX_CONCURRENT_REQUESTS": "3",
        "RMSERVE_MAX_INFLIGHT_BYTES": str(2 * MAX_BYTES),
    }
    server = start_server(Path(registry), workdir, env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(limited: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, timeout=60) as http_client:
        yield http_client


def test_an_item_within_the_limits_is_scored(client: httpx.Client) -> None:
    response = score(client, item({"type": "text", "text": "2+2?"}, image(data_url(png(64, 64)))))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["error"] is None and result["score"] == 1.0


@pytest.mark.parametrize(
    ("bad", "status", "param", "says"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * 7}, 413, "items.1.messages", "7 msg"),
        (item(answer="y" * 2001), 413, "items.1", "characters"),
        (item(*[image(data_url(png(4, 4)))] * 3), 413, "items.1.messages", "3 images"),
        (item(image(data_url(png(101, 100)))), 413, "img", "10100 pixels"),
        (item(image(data_url(bomb(50_000)))), 413, "img", "decompression bomb"),
        (item(image(data_url(bomb(9000)))), 413, "img", "81000000 pixels"),
        (item(image(data_url(b"GIF89a-not-really"))), 422, "img", "cannot be read"),
        (item(image("https://example.com/cat.png")), 422, "img", "only data: URLs"),
    ],
)
def test_an_item_beyond_a_limit_refuses_the_request_naming_it(
    client: httpx.Client, bad: dict[str, Any], status: int, param: str, says: str
) -> None:
    field = "items.1.messages.0.content.0.image_url.url" if param == "img" else param
    error = error_of(score(client, item(), bad), status)
    assert error["param"] == field
    assert says.replace(" msg", " messages") in error["message"], error["message"]
    assert field in error["message"]


def test_an_oversized_body_is_413_before_it_is_read(client: httpx.Client) -> None:
    big = item(answer="z" * (MAX_BYTES + 10))
    error = error_of(score(client, big), 413)
    assert str(MAX_BYTES) in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "exact", "items": [{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BYTES // 10_000 + 2):
            yield b"a" * 10_000
        yield b'"}]}]}'

    streamed = client.post(
        "/v1/score", content=chunks(), headers={"content-type": "application/json"}
    )
    assert error_of(streamed, 413)["type"] == "payload_too_large"


def test_allowlisted_image_urls_are_fetched_and_others_refused(
    client: httpx.Client, image_host: str
) -> None:
    fetched = score(client, item({"type": "text", "text": "q"}, image(f"{image_host}/ok/cat.png")))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["results"][0]["score"] == 1.0
    field = "items.0.messages.0.content.1.image_url.url"
    for path, status, says in [
        ("/private/cat.png", 422, "which does not hold this URL"),
        ("/ok/moved", 422, "HTTP 302"),
        ("/ok/text", 422, "not an image"),
        ("/ok/missing.png", 422, "HTTP 404"),
        ("/ok/huge.png", 413, "81000000 pixels"),
    ]:
        refused = score(client, item({"type": "text", "text": "q"}, image(image_host + path)))
        error = error_of(refused, status)
        assert error["param"] == field and says in error["message"], (path, error)


def test_beyond_the_concurrency_and_byte_limits_it_sheds_with_429(
    client: httpx.Client, limited: ServerProcess
) -> None:
    """Slow uploads hold request slots (and their bytes); new requests get 429 with
    Retry-After at once, probes still answer, and everything is admitted again afterwards."""
    release = threading.Event()
    body = b'{"model": "exact", "items": [' + b" " * 150_000 + b"]}"

    def slow_upload(payload: bytes = body) -> None:
        def trickle() -> Iterator[bytes]:
            yield payload[:10]
            release.wait(30)
            yield payload[10:]

        headers = {"content-type": "application/json", "content-length": str(len(payload))}
        with httpx.Client(base_url=limited.base_url, timeout=60) as own:
            own.post("/v1/score", content=trickle(), headers=headers)

    small = b'{"model": "exact", "items": []}'

    # Two uploads reserve 300 kB of the 400 kB: a third body of 150 kB does not fit.
    holders = [threading.Thread(target=slow_upload) for _ in range(2)]
    for holder in holders:
        holder.start()
    try:
        time.sleep(1.0)
        error = error_of(
            client.post("/v1/score", content=body, headers={"content-type": "application/json"}),
            429,
        )
        assert error["type"] == "overloaded" and "bytes" in error["message"]
        # A third small request takes the last of the 3 slots; a fourth is shed.
        third = threading.Thread(target=slow_upload, args=(small,))
        third.start()
        holders.append(third)
        time.sleep(1.0)
        shed = score(client, item())
        assert shed.status_code == 429 and shed.headers["Retry-After"] == "1"
        assert "requests in progress" in shed.json()["error"]["message"]
        for probe in ("/healthz", "/readyz", "/startupz", "/metrics"):
            assert client.get(probe).status_code == 200, probe
    finally:
        release.set()
        for holder in holders:
            holder.join(30)
    assert score(client, item()).status_code == 200
