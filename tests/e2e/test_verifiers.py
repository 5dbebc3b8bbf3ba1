"""Verifiers, composite rewards and OpenRLHF's /get_reward end to end: a real `rmserve serve`
with rule-based models, the tool sandbox (code in bubblewrap) and a tiny reward model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TESTS, ready_client

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def service(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "RMSERVE_OPENRLHF_MODEL": "math"}
    workdir = tmp_path_factory.mktemp("verifiers")
    with ready_client(TESTS / "registry.verifiers.yaml", workdir, env) as client:
        yield client


def answer(text: str, reference: str | None = None, **extra: Any) -> dict[str, Any]:
    item = {"messages": [{"role": "user", "content": "Solve it."},
                         {"role": "assistant", "content": text}], **extra}  # fmt: skip
    if reference is not None:
        item["reference"] = reference
    return item


def scores(client: httpx.Client, model: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = client.post("/v1/score", json={"model": model, "items": items})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_math_answers_are_compared_by_value(service: httpx.Client) -> None:
    results = scores(service, "math", [
        answer("So the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
        answer("Thus \\boxed{0.25}", "\\frac{1}{2}"),
        answer("I think it is one half.", "1/2"),
        answer("\\boxed{3}"),
    ])  # fmt: skip
    assert [r["score"] for r in results[:3]] == [1.0, 0.0, 0.0]
    assert "boxed" in results[2]["critique"]
    assert results[3]["error"]["type"] == "missing_reference"


def test_format_and_similarity(service: httpx.Client) -> None:
    good = "<think>half of one</think> \\boxed{1/2}"
    fmt = scores(service, "answer-format", [answer(good), answer("\\boxed{1}"), answer("none")])
    assert [r["score"] for r in fmt] == [1.0, 0.5, 0.0]
    exact = scores(service, "exact", [answer(" Paris ", "paris"), answer("Lyon", "Paris")])
    assert [r["score"] for r in exact] == [1.0, 0.0]
    rouge = scores(service, "rouge", [answer("the cat sat on the mat", "the cat sat on a mat")])
    assert 0.5 < rouge[0]["score"] < 1.0


def test_code_tests_run_in_the_sandbox(service: httpx.Client) -> None:
    tests = [{"code": "assert add(2, 3) == 5"}, {"code": "assert add(0, 0) == 0"},
             {"stdin": "", "expected_stdout": "ready"}]  # fmt: skip
    good = "```python\ndef add(a, b):\n    return a + b\nprint('ready')\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\nprint('ready')\n```"
    raises = "```python\nraise SystemExit(3)\n```"
    spins = "```python\nwhile True:\n    pass\n```"
    results = scores(service, "unit-tests", [
        answer(good, tests=tests), answer(wrong, tests=tests), answer(raises, tests=tests),
        answer("no code here", tests=tests), answer(good), answer(spins, tests=tests),
    ])  # fmt: skip
    assert [r["score"] for r in results[:4]] == [1.0, pytest.approx(2 / 3), 0.0, 0.0]
    assert results[1]["scores"] == [0.0, 1.0, 1.0]
    assert results[4]["error"]["type"] == "missing_tests"
    assert results[5]["score"] == 0.0  # every test timed out (timeout_s 2)
    assert "timeout" in results[5]["critique"] or "cpu_limit" in results[5]["critique"]


def test_code_rewards_are_decided_on_the_host(service: httpx.Client) -> None:
    """Call tests through /v1/score: the AlwaysEqual hack and an early exit score 0; in-process
    test code is refused (`unsafe_test`); malformed call tests are a 422 naming the field."""
    tests = [{"call": "add(2, 3)", "expected": 5},
             {"call": "pair(1)", "expected_literal": "(1, 1)"},
             {"code": "assert add(0, 0) == 0"}]  # fmt: skip
    good = "```python\ndef add(a, b):\n    return a + b\ndef pair(x):\n    return (x, x)\n```"
    always_equal = (
        "```python\nclass E:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return E()\ndef pair(x):\n    return E()\n```"
    )
    exits = "```python\nimport sys\nsys.exit(0)\n```"
    in_process = [{"code": "for x in range(3):\n    assert add(x, 0) == x"}]
    results = scores(service, "unit-tests", [
        answer(good, tests=tests), answer(always_equal, tests=tests), answer(exits, tests=tests),
        answer(good, tests=in_process),
    ])  # fmt: skip
    assert [r["score"] for r in results[:3]] == [1.0, 0.0, 0.0]
    assert "unserialisable" in results[1]["critique"]
    assert results[3]["error"]["type"] == "unsafe_test"
    bad = service.post("/v1/score", json={"model": "unit-tests", "items": [
        answer(good, tests=[{"call": "add(2,", "expected": 5}])]})  # fmt: skip
    assert bad.status_code == 422, bad.text
    assert "items.0.tests.0" in bad.text or "items[0].tests[0]" in bad.text, bad.text


def test_a_composite_combines_its_inputs_concurrently(service: httpx.Client) -> None:
    item = answer("<think>ok</think> \\boxed{4}", "4")
    (mixed,) = scores(service, "mixed", [item])
    components = mixed["components"]
    assert set(components) == {"math", "rm", "fmt"} and components["math"] == 1.0
    (rm,) = scores(service, "tiny-rm", [item])
    assert components["rm"] == pytest.approx(rm["score"], abs=1e-4)
    clipped = max(-1.0, min(1.0, components["rm"]))
    expected = 0.7 * 1.0 + 0.3 * clipped - 0.1 * (1 - components["fmt"])
    assert mixed["score"] == pytest.approx(expected)


def test_openrlhf_get_reward_keeps_query_order(service: httpx.Client) -> None:
    prompts = ["What is 1/2 as a decimal?", "What is 2+2?", "What is 3*3?"]
    responses = [" \\boxed{0.5}", " \\boxed{5}", " \\boxed{9}"]
    body = {"query": [p + r for p, r in zip(prompts, responses, strict=True)],
            "prompts": prompts, "labels": ["1/2", "4", "9"]}  # fmt: skip
    answered = service.post("/get_reward", json=body)
    assert answered.status_code == 200, answered.text
    data = answered.json()
    assert data["rewards"] == [1.0, 0.0, 1.0] and data["scores"] == data["rewards"]
    assert len(data["extra_logs"]["prompt_tokens"]) == 3
    mismatched = service.post("/get_reward", json={**body, "labels": ["1"]})
    assert mismatched.status_code == 422 and "labels" in mismatched.json()["error"]["message"]
    unlabeled = service.post("/get_reward", json={"query": ["\\boxed{1}"]})
    assert unlabeled.status_code == 422 and "query[0]" in unlabeled.json()["error"]["message"]


def test_the_score_cli_scores_a_jsonl_file(service: httpx.Client, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    items = [answer("\\boxed{2}", "2"), answer("\\boxed{3}", "2"), answer("\\boxed{1}")]
    source.write_text("\n".join(json.dumps({**item, "id": f"q{i}"}) for i, item in
                                enumerate(items)) + "\n")  # fmt: skip
    command = [sys.executable, "-m", "rmserve.service.cli", "score", str(source), "--model", "math",
               "-o", str(out), "--url", str(service.base_url)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one item has no reference
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["q0", "q1", "q2"]
    assert [r["score"] for r in results[:2]] == [1.0, 0.0]
    assert results[2]["error"]["type"] == "missing_reference"
    assert "3" in done.stderr and "missing_reference" in done.stderr  # the summary
