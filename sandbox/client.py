"""The sidecar over HTTP, for workers: the `Toolbox` protocol on `rmserve sandbox`.

Failures never raise: the judge reads them as the tool's answer. A 429 (all code sandboxes busy
and the queue full) is retried with backoff for up to `busy_wait_s`; an unreachable sidecar is
the error `sandbox_unavailable`.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from rmserve.wire.tools import ToolCall, ToolErrorBody, ToolList, ToolResult, ToolSpec


class HttpToolbox:
    def __init__(self, base_url: str, timeout_s: float = 120.0, busy_wait_s: float = 60.0):
        self._base = base_url.rstrip("/")
        self._timeout_s, self._busy_wait_s = timeout_s, busy_wait_s
        self._client: httpx.AsyncClient | None = None
        self._specs: list[ToolSpec] | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self._base, timeout=self._timeout_s)
        return self._client

    async def specs(self) -> list[ToolSpec]:
        if self._specs is None:
            response = await self._http().get("/v1/tools")
            response.raise_for_status()
            self._specs = ToolList.model_validate_json(response.content).tools
        return self._specs

    async def call(self, name: str, call: ToolCall) -> ToolResult:
        started, delay = time.perf_counter(), 0.25
        while True:
            try:
                response = await self._http().post(
                    f"/v1/tools/{name}",
                    content=call.model_dump_json(),
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                return _failed(name, "sandbox_unavailable", f"the sandbox is unreachable: {exc}")
            waited = time.perf_counter() - started
            if response.status_code == 429 and waited + delay < self._busy_wait_s:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
                continue
            if response.status_code == 200:
                return ToolResult.model_validate_json(response.content)
            return _failed(name, *_error_of(response))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "sandbox_error", f"the sandbox answered {response.status_code}"


def _failed(name: str, kind: str, message: str) -> ToolResult:
    return ToolResult(tool=name, error=ToolErrorBody(type=kind, message=message))
