"""`rmserve sandbox`: the tool sidecar's HTTP API.

    GET  /v1/tools            the tools and their JSON schemas (OpenAI function-tool shape)
    POST /v1/tools/{name}     {"arguments": {...}, "context": {"images", "documents"}}
                              -> {"tool", "output": {"text", "images", "data"}, "error",
                                  "elapsed_s"}
    GET  /startupz, /healthz, /readyz, /metrics

A call that reaches its tool answers 200: its `error` (a failed run, an image index out of range)
is evidence for the judge. An unknown tool is a 404, arguments that do not match the tool's
schema a 422 naming the field, and a full code-run queue a 429 with Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response

from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.tools import LocalToolbox
from rmserve.web.errors import (
    NotFound,
    QueueFull,
    Unavailable,
    UnprocessableEntity,
    install_error_handlers,
)
from rmserve.web.http import LimitsAndMetrics, exposition
from rmserve.wire.errors import ErrorBody, ToolError
from rmserve.wire.tools import ToolCall, ToolList, ToolResult

MAX_REQUEST_BYTES = 64 << 20


def create_sandbox_app(settings: SandboxSettings, toolbox: LocalToolbox | None = None) -> FastAPI:
    tools = toolbox or LocalToolbox(settings)

    app = FastAPI(
        title="rmserve sandbox",
        summary="Verification tools for reward-model judges: crop, search, code run, calculator, "
        "instruction checks.",
        version="0.1.0",
    )
    install_error_handlers(app)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 404, 413, 422, 429, 503)
    }

    @app.get("/v1/tools", response_model=ToolList)
    async def list_tools() -> ToolList:
        return ToolList(tools=await tools.specs())

    @app.post("/v1/tools/{name}", response_model=ToolResult, responses=errors)
    async def call_tool(name: str, call: ToolCall) -> ToolResult:
        try:
            tools.parse(name, call.arguments)
        except ToolError as exc:
            if exc.code == "not_found":
                raise NotFound(exc.message, param="name") from None
            raise UnprocessableEntity(exc.message, param="arguments") from None
        result = await tools.call(name, call)
        if result.error is not None and result.error.type == "busy":
            raise QueueFull(result.error.message, headers={"Retry-After": "1"})
        return result

    @app.get("/startupz")
    async def startupz() -> dict[str, str]:
        """Started (startup probe): the tools were set up before the app was built."""
        return {"status": "started"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=errors)
    async def readyz() -> dict[str, Any]:
        """Ready (readiness): every configured tool can run."""
        if tools.code is None and "code_run" in settings.tools:
            raise Unavailable("code_run is not available")
        ready: dict[str, Any] = {"status": "ready", "tools": tools.names}
        if tools.code is not None:
            ready["code_run_protections"] = tools.code.protections
        return ready

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return exposition(tools.metrics.registry)

    app.add_middleware(
        LimitsAndMetrics,
        metrics=tools.metrics,
        routes=app.router.routes,
        max_bytes=MAX_REQUEST_BYTES,
    )
    return app
