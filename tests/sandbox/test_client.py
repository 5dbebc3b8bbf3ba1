"""The workers' sandbox client against a real `rmserve sandbox`: results and failures come back
as tool results (never exceptions), 429 is waited out, an unreachable sidecar is an error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from rmserve.sandbox.client import HttpToolbox
from rmserve.service.launcher import free_port
from rmserve.wire.tools import ToolCall
from tests.conftest import running_sandbox


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"RMSERVE_SANDBOX_CODE_CONCURRENCY": "1", "RMSERVE_SANDBOX_CODE_MAX_QUEUED": "0"}
    log = tmp_path_factory.mktemp("client") / "sandbox.log"
    with running_sandbox(log, env) as server:
        yield server.base_url


async def test_results_and_failures_are_tool_results(sidecar: str) -> None:
    tools = HttpToolbox(sidecar)
    try:
        names = {spec.name for spec in await tools.specs()}
        assert "calculator" in names and "code_run" in names
        ok = await tools.call("calculator", ToolCall(arguments={"expression": "6*7"}))
        assert ok.output is not None and ok.output.text == "42"
        unknown = await tools.call("shell", ToolCall(arguments={}))
        assert unknown.error is not None and unknown.error.type == "not_found"
        invalid = await tools.call("calculator", ToolCall(arguments={"expr": "1"}))
        assert invalid.error is not None and "expression" in invalid.error.message
    finally:
        await tools.close()


async def test_a_busy_sandbox_is_waited_for(sidecar: str) -> None:
    tools = HttpToolbox(sidecar, busy_wait_s=30)
    try:
        slow = ToolCall(arguments={"code": "import time; time.sleep(1.5); print('slow')"})
        quick = ToolCall(arguments={"code": "print('quick')"})
        first, second = await asyncio.gather(
            tools.call("code_run", slow), tools.call("code_run", quick)
        )
        for result, text in ((first, "slow"), (second, "quick")):
            assert result.output is not None, result
            assert result.output.data is not None
            assert result.output.data["run"]["stdout"].strip() == text
    finally:
        await tools.close()


async def test_an_unreachable_sidecar_is_an_error_not_an_exception() -> None:
    tools = HttpToolbox(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    result = await tools.call("calculator", ToolCall(arguments={"expression": "1"}))
    assert result.error is not None and result.error.type == "sandbox_unavailable"
    await tools.close()
