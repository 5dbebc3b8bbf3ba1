"""/get_reward's failures where OpenRLHF's users look: the gateway in process (ASGI) with a real
`math` verifier and a real worker. OpenRLHF logs a failed request's status line only, so the
server logs the error body at WARNING; and `?on_error=report` (null rewards, which OpenRLHF
cannot take) is refused on the URL, accepted in the body (rmserve.client.openrlhf)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.models.loader import load_model
from rmserve.models.spec import load_registry
from rmserve.service.auth import hash_key, new_key
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.metrics import Metrics
from rmserve.service.openrlhf import MAX_LOGGED_CHARS
from rmserve.service.queue import InProcessQueue
from rmserve.service.worker import Worker

LOGGER = "rmserve.service.openrlhf"
KEY = new_key()
PROMPT = "Question: what is 2 + 2? Put the answer in \\boxed{}.\nAnswer:"
RESPONSE = " two plus two makes \\boxed{4}, a secret-ish sentence"
TOOL_TURN = (  # a ChatML tool turn: the query cannot be read as a conversation (invalid_query)
    "<|im_start|>user\nls<|im_end|>\n<|im_start|>tool\nfile.txt<|im_end|>\n"
    "<|im_start|>assistant\nOne file.<|im_end|>"
)


def sample(label: Any = "4", **extra: Any) -> dict[str, Any]:
    """One sample, as OpenRLHF 0.11 posts it (openrlhf/utils/agent.py:331-336)."""
    return {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": [label], **extra}


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway (ASGI, in this loop) with the `math` verifier ready and a worker scoring it."""
    registry = tmp_path / "registry.yaml"
    registry.write_text("models:\n  math:\n    kind: math\n")
    spec = load_registry(registry).models["math"]
    directory = ModelDirectory([spec])
    directory.mark_ready("math")
    queue = InProcessQueue(100)
    app = create_app(Settings(**settings), queue, directory, Metrics(), wait_for_models=False)
    worker = Worker(load_model(spec), queue, Metrics(), concurrency=4)
    task = asyncio.create_task(worker.run())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            yield client
    finally:
        await worker.stop(grace_s=5)
        await task


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def one_warning(caplog: pytest.LogCaptureFixture) -> str:
    records = warnings(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0].getMessage()


async def test_no_model_configured_is_a_422_logged_with_its_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path) as client:  # no RMSERVE_OPENRLHF_MODEL, no ?model=
        response = await client.post("/get_reward", json=sample())
    assert response.status_code == 422, response.text
    assert one_warning(caplog) == (
        "/get_reward answered 422 invalid_request (param model): no model: set "
        "RMSERVE_OPENRLHF_MODEL or add ?model=NAME to the URL"
    )
    record = warnings(caplog)[0]
    assert (record.status, record.error_type, record.param) == (422, "invalid_request", "model")  # type: ignore[attr-defined]


async def test_a_missing_label_is_logged_without_the_sample_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path, openrlhf_model="math") as client:
        scored = await client.post("/get_reward", json=sample("4"))
        assert scored.status_code == 200 and scored.json()["rewards"] == [1.0], scored.text
        assert warnings(caplog) == []  # a scored sample logs nothing
        failed = await client.post("/get_reward", json=sample(""))
    assert failed.status_code == 422, failed.text
    line = one_warning(caplog)
    assert line.startswith("/get_reward answered 422 invalid_request (param query): 1 queries")
    assert "query[0]: missing_reference" in line
    assert "secret-ish" not in caplog.text and "two plus two" not in caplog.text


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"queries": ["x"]}, "query", "query: Field required"),  # a wrong key
        (sample(True), "labels[0]", "a boolean label is ambiguous"),
        ({"query": ["a", "b"], "labels": ["4"]}, "body", "labels has 1 entries for 2 queries"),
    ],
)
async def test_a_request_the_route_refuses_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: Any, param: str, says: str
) -> None:
    async with gateway(tmp_path, openrlhf_model="math") as client:
        response = await client.post("/get_reward", json=body)
    assert response.status_code == 422, response.text
    line = one_warning(caplog)
    assert f"/get_reward answered 422 invalid_request (param {param}): " in line
    assert says in line and says in response.json()["error"]["message"]


async def test_a_refused_key_is_logged_without_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: openrlhf, sha256: {hash_key(KEY)}}}\n")
    wrong = KEY[:-4] + "abcd"
    basic = base64.b64encode(f"openrlhf:{wrong}".encode()).decode()
    async with gateway(tmp_path, openrlhf_model="math", api_keys_file=keys) as client:
        response = await client.post(
            "/get_reward", json=sample(), headers={"authorization": f"Basic {basic}"}
        )
    assert response.status_code == 401, response.text
    assert one_warning(caplog) == "/get_reward answered 401 unauthorized: invalid API key"
    assert wrong[4:] not in caplog.text and basic not in caplog.text


async def test_on_error_report_on_the_url_is_refused_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path, openrlhf_model="math") as client:
        refused = await client.post("/get_reward?on_error=report", json=sample(""))
        empty = await client.post("/get_reward?on_error=report", json={"query": []})
        twice = await client.post("/get_reward?on_error=-1", json=sample("", on_error="report"))
    for response in (refused, empty):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "on_error"
        assert "null rewards, which OpenRLHF cannot take" in error["message"]
        assert "Could not infer dtype of NoneType" in error["message"]
    assert twice.status_code == 422 and "give it once" in twice.json()["error"]["message"]
    lines = [r.getMessage() for r in warnings(caplog)]
    assert len(lines) == 3 and all("(param on_error)" in line for line in lines)
    assert "OpenRLHF cannot take" in lines[0]


async def test_report_in_the_body_answers_null_and_logs_the_item(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"query": [PROMPT + RESPONSE] * 2, "prompts": [PROMPT] * 2, "labels": ["4", None]}
    async with gateway(tmp_path, openrlhf_model="math") as client:
        response = await client.post("/get_reward", json={**body, "on_error": "report"})
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == [1.0, None]
    assert response.json()["errors"][1]["type"] == "missing_reference"
    line = one_warning(caplog)
    item = "/get_reward query[1] not scored, answered with reward null (on_error)"
    assert line.startswith(f"{item}: missing_reference: ")


async def test_a_number_on_error_logs_each_item_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path, openrlhf_model="math") as client:
        response = await client.post(
            "/get_reward?on_error=-1", json={"query": [TOOL_TURN], "labels": ["4"]}
        )
    assert response.status_code == 200 and response.json()["rewards"] == [-1.0], response.text
    line = one_warning(caplog)
    assert line.startswith(
        "/get_reward query[0] not scored, answered with reward -1.0 (on_error): invalid_query: "
    )
    assert "query_format=raw" in line


async def test_a_long_cause_is_logged_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path, openrlhf_model="math") as client:
        response = await client.post("/get_reward", json={"query": [TOOL_TURN] * 40})
    assert response.status_code == 422
    assert len(response.json()["error"]["message"]) > 2 * MAX_LOGGED_CHARS
    line = one_warning(caplog)
    prefix = "/get_reward answered 422 invalid_request (param query): 40 queries not scored: "
    assert line.startswith(prefix) and line.endswith("…")
    assert len(line) == len(prefix) - len("40 queries not scored: ") + MAX_LOGGED_CHARS
