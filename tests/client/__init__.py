"""A scripted rmserve stand-in on loopback for the client tests.

Each POST /v1/score takes the next scripted `Reply`, if any, else scores the items: an item's
score is metadata.score if given, else the length of its last message's content; an item with
metadata.error gets that item error. Streams answer in reverse item order (finishing order).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # JSON; None: score the items
    delay_s: float = 0.0
    break_after: int | None = None  # stream: drop the connection after this many lines


def error_reply(status: int, type_: str, message: str = "scripted", **kw: Any) -> Reply:
    param = kw.pop("param", None)
    body = {"error": {"type": type_, "message": message, "param": param}}
    return Reply(status=status, body=body, **kw)


def item_result(item: dict[str, Any], index: int) -> dict[str, Any]:
    metadata = item.get("metadata") or {}
    result: dict[str, Any] = {"id": item.get("id"), "index": index, "score": None, "error": None}
    if "error" in metadata:
        result["error"] = {"type": metadata["error"], "message": "scripted item error"}
    elif "score" in metadata:
        result["score"] = float(metadata["score"])
    else:
        result["score"] = float(len(str(item["messages"][-1].get("content", ""))))
    result["usage"] = {"prompt_tokens": 3, "future_field": 1}
    result["extra_field"] = "kept"
    return result


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or stop reading reset their connections


class ScriptedServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; records bodies, headers and in-flight."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.delay_s = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def begin(self, body: dict[str, Any], auth: str | None) -> Reply:
        with self.lock:
            self.bodies.append(body)
            self.auth.append(auth)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.replies.popleft() if self.replies else Reply(delay_s=self.delay_s)

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1


def _handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            models = [{"name": "rm", "kind": "discriminative", "status": "ready"}]
            self._json(200, {"object": "list", "data": models}, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = server.begin(body, self.headers.get("Authorization"))
            try:
                time.sleep(reply.delay_s)
                self._answer(reply, body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                server.end()

        def _answer(self, reply: Reply, body: dict[str, Any]) -> None:
            results = [item_result(item, i) for i, item in enumerate(body["items"])]
            if reply.body is not None or reply.status != 200:
                self._json(reply.status, reply.body, reply.headers)
            elif body["options"].get("stream"):
                self._stream([json.dumps(r) for r in reversed(results)], reply.break_after)
            else:
                self._json(200, {"model": body["model"], "results": results}, reply.headers)

        def _json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, lines: list[str], break_after: int | None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for number, line in enumerate(lines):
                if number == break_after:
                    self.wfile.flush()
                    self.close_connection = True
                    return
                data = line.encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    return Handler
