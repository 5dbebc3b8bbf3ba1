"""Generative judges end to end: a real `rmserve serve` with vLLM generating on the tiny causal
LM, through HTTP. Its weights are random: free-form judgements do not parse (parse_error, with
the raw text), while structured outputs make every judgement parse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.launcher import ServerProcess
from tests.conftest import TESTS, start_server

pytestmark = pytest.mark.engine

CONVERSATION = [{"role": "user", "content": "What is 12 * 7?"}]


def item(n: int) -> dict[str, Any]:
    return {"id": f"j{n}", "messages": [*CONVERSATION,
            {"role": "assistant", "content": f"It is {80 + n}."}]}  # fmt: skip


@pytest.fixture(scope="module")
def judges(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    server: ServerProcess = start_server(
        TESTS / "registry.judge.yaml",
        tmp_path_factory.mktemp("judges"),
        {"VLLM_LOGGING_LEVEL": "WARNING"},
    )
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            assert all(m["status"] == "ready" for m in models.values()), models
            yield client
    finally:
        server.stop()


def test_structured_pointwise_judgements_always_parse(judges: httpx.Client) -> None:
    body = {"model": "tiny-judge-structured", "items": [item(n) for n in range(6)]}
    results = judges.post("/v1/score", json=body).json()["results"]
    for result in results:
        assert result["error"] is None, result
        assert 1 <= result["score"] <= 10 and result["score"] == int(result["score"])
        assert isinstance(result["critique"], str) and len(result["critique"]) <= 40
        assert result["usage"]["completion_tokens"] > 0 and result["usage"]["prompt_tokens"] > 0


def test_samples_are_drawn_counted_and_averaged(judges: httpx.Client) -> None:
    options = {"judge": {"samples": 4, "return_samples": True}}
    body = {"model": "tiny-judge-structured", "items": [item(1)], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    samples = result["samples"]
    assert len(samples) == 4 and all(s["error"] is None for s in samples)
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert result["score"] == pytest.approx(sum(s["score"] for s in samples) / 4)
    too_many = {**body, "options": {"judge": {"samples": 9}}}
    refused = judges.post("/v1/score", json=too_many)
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "options.judge.samples"


def test_free_form_judgements_that_do_not_parse_are_errors_with_the_raw_text(
    judges: httpx.Client,
) -> None:
    body = {"model": "tiny-judge", "items": [item(n) for n in range(3)] + [
        {"id": "no-response", "messages": CONVERSATION}]}  # fmt: skip
    results = judges.post("/v1/score", json=body).json()["results"]
    for result in results[:3]:
        if result["error"] is not None:  # random text almost never holds a valid \boxed{}
            assert result["error"]["type"] == "parse_error"
            assert "raw text" in result["error"]["message"]
        else:
            assert 1 <= result["score"] <= 10
    assert any(r["error"] is not None for r in results[:3])
    assert results[3]["error"]["type"] == "no_response"


def test_pairwise_verdicts_with_shuffled_samples(judges: httpx.Client) -> None:
    pair = {"id": "p", "messages": CONVERSATION, "candidates": ["It is 84.", "It is 85."]}
    options = {"judge": {"samples": 4, "return_samples": True}}
    body = {"model": "tiny-pair-structured", "items": [pair], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"] is None, result
    assert result["verdict"] in ("A", "B") and len(result["scores"]) == 2
    assert sum(result["scores"]) == pytest.approx(1.0)
    samples = result["samples"]
    assert len(samples) == 4 and samples[0]["order"] == ["A", "B"]
    votes = [s["verdict"] for s in samples]
    assert result["scores"] == [votes.count("A") / 4, votes.count("B") / 4]
    no_candidates = {"model": "tiny-pair-structured", "items": [item(0)]}
    (missing,) = judges.post("/v1/score", json=no_candidates).json()["results"]
    assert missing["error"]["type"] == "missing_candidates"
