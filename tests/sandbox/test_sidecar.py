"""`rmserve sandbox` as a real process on loopback: the tool list, calls with evidence, errors
naming the field, 429 when code sandboxes are all busy, metrics, and still serving after hostile
code."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running_sandbox

ENV = {
    "RMSERVE_SANDBOX_CODE_CONCURRENCY": "1",
    "RMSERVE_SANDBOX_CODE_MAX_QUEUED": "0",
    "RMSERVE_SANDBOX_CODE_WALL_S": "5",
    "RMSERVE_SANDBOX_CODE_CPU_S": "3",
    "RMSERVE_SECRET_FOR_TEST": "do-not-leak",
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    log = tmp_path_factory.mktemp("sandbox") / "sandbox.log"
    with (
        running_sandbox(log, ENV) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        yield client


def call(client: httpx.Client, tool: str, arguments: dict[str, Any], **context: Any) -> Any:
    return client.post(f"/v1/tools/{tool}", json={"arguments": arguments, "context": context})


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def kills(client: httpx.Client) -> float:
    reasons = ("timeout", "cpu_limit", "memory_limit", "output_limit", "killed")
    return sum(metric(client, "rmserve_sandbox_kills_total", reason=r) for r in reasons)


def test_lists_its_tools_with_json_schemas(sandbox: httpx.Client) -> None:
    tools = {t["name"]: t for t in sandbox.get("/v1/tools").json()["tools"]}
    assert set(tools) == {"crop", "search", "code_run", "calculator", "instruction_check"}
    assert tools["calculator"]["parameters"]["required"] == ["expression"]
    assert "bbox_2d" in tools["crop"]["parameters"]["properties"]


def test_calls_return_evidence_and_count_in_metrics(sandbox: httpx.Client) -> None:
    before = metric(sandbox, "rmserve_tool_calls_total", tool="calculator", outcome="ok")
    answer = call(sandbox, "calculator", {"expression": "2^10 + 3*4"}).json()
    assert answer["output"]["text"] == "1036" and answer["error"] is None
    assert answer["elapsed_s"] >= 0
    assert (
        metric(sandbox, "rmserve_tool_calls_total", tool="calculator", outcome="ok") == before + 1
    )
    failed = call(sandbox, "calculator", {"expression": "1/0"}).json()
    assert failed["error"]["type"] == "invalid_arguments"

    docs = [{"id": "a", "text": "The Eiffel Tower is in Paris."},
            {"id": "b", "text": "Mount Fuji is in Japan."}]  # fmt: skip
    found = call(sandbox, "search", {"query": "tower in Paris", "top_k": 1}, documents=docs).json()
    assert [p["id"] for p in found["output"]["data"]["passages"]] == ["a"]

    picture = io.BytesIO()
    Image.new("RGB", (200, 100), "blue").save(picture, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    cropped = call(sandbox, "crop", {"image": 0, "bbox_2d": [0, 0, 500, 500]}, images=[url]).json()
    (image,) = cropped["output"]["images"]
    assert image.startswith("data:image/png;base64,")

    checked = call(sandbox, "instruction_check", {"check": "word_count", "text": "one two three",
                                                   "min": 2, "max": 5}).json()  # fmt: skip
    assert checked["output"]["data"]["passed"] is True


def test_bad_requests_name_the_problem(sandbox: httpx.Client) -> None:
    unknown = call(sandbox, "shell", {"cmd": "ls"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "name"
    invalid = call(sandbox, "calculator", {"expr": "1"})
    assert invalid.status_code == 422
    assert "expression" in invalid.json()["error"]["message"]
    malformed = sandbox.post("/v1/tools/calculator", content=b"{not json")
    assert malformed.status_code in (400, 422)


def test_code_runs_are_judged_by_exit_status_and_tests(sandbox: httpx.Client) -> None:
    program = "def add(a, b):\n    return a + b\nprint(add(2, 3))"
    tests = [{"name": "ok", "code": "assert add(1, 2) == 3"},
             {"name": "wrong", "code": "assert add(1, 2) == 4"}]  # fmt: skip
    result = call(sandbox, "code_run", {"code": program, "tests": tests}).json()
    data = result["output"]["data"]
    assert [t["passed"] for t in data["tests"]] == [True, False]
    assert data["run"]["stdout"].strip() == "5"  # the call tests' run
    assert data["tests"][1]["detail"].endswith("got 3")  # decided on the host
    assert "tests: 1 passed, 1 failed" in result["output"]["text"]
    refused = call(
        sandbox,
        "code_run",
        {
            "code": program,
            "in_process_tests": "refuse",
            "tests": [{"code": "import os\nassert add(1, 2) == 3"}],
        },
    )
    assert refused.status_code == 422 and "unsafe_test" in refused.text, refused.text
    bad = call(sandbox, "code_run", {"code": program, "tests": [{"call": "add(1,", "expected": 3}]})
    assert bad.status_code == 422 and "call" in bad.text, bad.text
    leak = call(sandbox, "code_run", {"code": "import os; print(dict(os.environ))"}).json()
    assert "do-not-leak" not in leak["output"]["data"]["run"]["stdout"]


def test_busy_code_sandboxes_answer_429_and_hostile_code_leaves_it_serving(
    sandbox: httpx.Client,
) -> None:
    before = kills(sandbox)
    slow: list[Any] = []

    def hog() -> None:  # until it holds the only sandbox (the probes below may hold it first)
        while (
            answer := call(sandbox, "code_run", {"code": "while True: pass"})
        ).status_code == 429:
            time.sleep(0.01)
        slow.append(answer)

    runner = threading.Thread(target=hog)
    runner.start()
    try:
        for _ in range(100):  # until the first run holds the only sandbox
            busy = call(sandbox, "code_run", {"code": "print(1)"})
            if busy.status_code == 429:
                break
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert metric(sandbox, "rmserve_sandbox_code_runs_active") == 1  # the hog's
    finally:
        runner.join(30)
    assert metric(sandbox, "rmserve_sandbox_code_runs_active") == 0
    assert metric(sandbox, "rmserve_http_requests_total", route="/v1/tools/{name}", code="429") >= 1
    assert slow[0].json()["output"]["data"]["run"]["status"] in ("cpu_limit", "timeout")
    bomb = call(sandbox, "code_run", {"code": "import os\nwhile True: os.fork()"}).json()
    assert bomb["output"]["data"]["run"]["status"] != "ok"
    assert sandbox.get("/healthz").status_code == 200
    assert (
        call(sandbox, "code_run", {"code": "print(6*7)"})
        .json()["output"]["data"]["run"]["stdout"]
        .strip()
        == "42"
    )
    assert kills(sandbox) == before + 1  # the spin; the fork bomb fails (fork refused)


def test_probes_and_build_info(sandbox: httpx.Client) -> None:
    for path in ("/startupz", "/healthz", "/readyz"):
        assert sandbox.get(path).status_code == 200, path
    protections = sandbox.get("/readyz").json()["code_run_protections"]
    assert protections["seccomp"].startswith("on: ptrace")
    assert protections["supervisor"].startswith("pid 1")
    assert metric(sandbox, "rmserve_build_info", role="sandbox") == 1
    assert metric(sandbox, "rmserve_http_requests_total", route="/healthz", code="200") >= 1
