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

from rmserve.web.errors import error_response
from rmserve.web.metrics import HttpMetrics


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


# Never shed: probes must answer under overload (or the orchestrator restarts a busy server),
# and so must the scraper.
UNSHED = frozenset({"/startupz", "/healthz", "/readyz", "/metrics"})


class LimitsAndMetrics:
    """Refuses bodies over the size limit (413), sheds load (429) beyond `max_concurrent`
    requests or `max_inflight_bytes` of request bodies held at once, and counts requests by
    route and status.

    The size limits hold for chunked bodies too: they are counted as they arrive. Pure ASGI (no
    BaseHTTPMiddleware) to keep the per-request overhead small.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: HttpMetrics,
        routes: Sequence[BaseRoute],
        max_bytes: int,
        max_concurrent: int | None = None,
        max_inflight_bytes: int | None = None,
    ) -> None:
        self.app, self.metrics, self.routes, self.max_bytes = app, metrics, routes, max_bytes
        self.max_concurrent, self.max_inflight_bytes = max_concurrent, max_inflight_bytes
        self.active = 0  # requests being handled
        self.inflight_bytes = 0  # bytes of their bodies, reserved or received

    def _too_large(self, size: int, exact: bool) -> JSONResponse:
        what = f"{size} bytes" if exact else f"more than {self.max_bytes} bytes"
        return error_response(
            413,
            "payload_too_large",
            f"request body of {what} exceeds the limit of {self.max_bytes}",
        )

    @staticmethod
    def _overloaded(reason: str) -> JSONResponse:
        response = error_response(429, "overloaded", f"the server is at capacity ({reason})")
        response.headers["Retry-After"] = "1"
        return response

    def _shed(self, length: int) -> str | None:
        """Why a new request is refused now, if it is."""
        if self.max_concurrent is not None and self.active >= self.max_concurrent:
            return f"{self.active} requests in progress"
        if (
            self.max_inflight_bytes is not None
            and self.inflight_bytes + length > self.max_inflight_bytes
        ):
            return f"{self.inflight_bytes} bytes of requests in progress"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(self.routes, scope)
        started, status, received, refusal = time.perf_counter(), 500, 0, ""
        header = dict(scope["headers"]).get(b"content-length", b"")
        length = int(header) if header.isdigit() else None
        reserved = length or 0

        async def receive_counted() -> Message:
            nonlocal received, refusal, reserved
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > reserved:  # chunked: hold what arrives
                    self.inflight_bytes += received - reserved
                    reserved = received
                if received > self.max_bytes:
                    refusal = "too_large"
                elif self.max_inflight_bytes and self.inflight_bytes > self.max_inflight_bytes:
                    refusal = "overloaded"
                if refusal:
                    raise ValueError("request body refused")
            return message

        async def send_counted(message: Message) -> None:
            nonlocal status
            if refusal:  # the app saw the body fail; answer the refusal instead
                if message["type"] == "http.response.start":
                    status = 413 if refusal == "too_large" else 429
                    answer = (
                        self._too_large(received, exact=False)
                        if refusal == "too_large"
                        else self._overloaded(f"{self.inflight_bytes} bytes of requests")
                    )
                    await answer(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if length is not None and length > self.max_bytes:
            too_large: str | None = "too_large"
            shed = None
        else:
            too_large, shed = None, None if route in UNSHED else self._shed(reserved)
        admitted = too_large is None and shed is None
        if admitted:
            self.active += 1
            self.inflight_bytes += reserved
        try:
            if too_large is not None and length is not None:
                await self._too_large(length, exact=True)(scope, receive, send_counted)
            elif shed is not None:
                await self._overloaded(shed)(scope, receive, send_counted)
            else:
                await self.app(scope, receive_counted, send_counted)
        finally:
            if admitted:
                self.active -= 1
                self.inflight_bytes -= reserved
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - started)
