"""What every rmserve HTTP server shares: the request middleware (size limit, metrics by
route template) and the /metrics exposition."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.metrics import HttpMetrics


def exposition(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route a request goes to (`/v1/jobs/{batch_id}`), so that
    request paths never become label values; "other" when no route has the path."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
        if match == Match.PARTIAL and partial is None:  # the path, with another method
            partial = str(getattr(route, "path", "other"))
    return partial or "other"


class LimitsAndMetrics:
    """Refuses bodies over the size limit (413) and counts requests by route and status.

    The limit holds for chunked bodies too: they are counted as they arrive. Pure ASGI (no
    BaseHTTPMiddleware) to keep the per-request overhead small.
    """

    def __init__(
        self, app: ASGIApp, metrics: HttpMetrics, routes: Sequence[BaseRoute], max_bytes: int
    ) -> None:
        self.app, self.metrics, self.routes, self.max_bytes = app, metrics, routes, max_bytes

    def _too_large(self, size: int, exact: bool) -> JSONResponse:
        what = f"{size} bytes" if exact else f"more than {self.max_bytes} bytes"
        return error_response(
            413,
            "payload_too_large",
            f"request body of {what} exceeds the limit of {self.max_bytes}",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(self.routes, scope)
        started, status, received, too_large = time.perf_counter(), 500, 0, False

        async def receive_counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise ValueError("request body too large")
            return message

        async def send_counted(message: Message) -> None:
            nonlocal status
            if too_large:  # the app saw the body fail; answer 413 instead of what it says
                if message["type"] == "http.response.start":
                    status = 413
                    await self._too_large(received, exact=False)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(int(length), exact=True)(scope, receive, send_counted)
                return
            await self.app(scope, receive_counted, send_counted)
        finally:
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - started)
