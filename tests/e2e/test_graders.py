"""OpenAI graders compatibility, driven by the official `openai` SDK against a real
`rmserve serve`: every grader type runs and validates with the documented shapes; invalid
graders get clear validation errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rmserve.service.launcher import ServerProcess
from tests.conftest import TESTS, start_server

pytestmark = pytest.mark.engine

SAMPLE = "Paris"
ITEM = {"label": "Paris", "question": "What is the capital of France?"}
EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.label }}", "operation": "eq"}  # fmt: skip
FUZZY = {"type": "text_similarity", "name": "fuzzy", "input": "{{ sample.output_text }}",
         "reference": "Paris, France", "evaluation_metric": "fuzzy_match"}  # fmt: skip
QUESTION = [{"role": "user", "content": "{{ item.question }}"},
            {"role": "assistant", "content": "{{ sample.output_text }}"}]  # fmt: skip


@pytest.fixture(scope="module")
def served(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[openai.OpenAI, httpx.Client]]:
    server: ServerProcess = start_server(
        TESTS / "registry.verifiers.yaml",
        tmp_path_factory.mktemp("graders"),
        {"VLLM_LOGGING_LEVEL": "WARNING"},
    )
    try:
        sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with httpx.Client(base_url=server.base_url, timeout=300) as http:
            yield sdk, http
    finally:
        server.stop()


def run(sdk: openai.OpenAI, grader: dict[str, Any], sample: str = SAMPLE) -> Any:
    return sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=ITEM)  # type: ignore[arg-type]


def test_string_check_and_text_similarity(served: tuple[openai.OpenAI, httpx.Client]) -> None:
    sdk, _ = served
    graded = run(sdk, EXACT)
    assert graded.reward == 1.0 and graded.metadata.type == "string_check"
    assert graded.metadata.name == "exact" and not graded.metadata.errors.other_error
    assert run(sdk, EXACT, "Lyon").reward == 0.0
    like = {**EXACT, "reference": "PAR%", "operation": "ilike"}
    assert run(sdk, like).reward == 1.0
    assert run(sdk, {**like, "operation": "like"}).reward == 0.0
    fuzzy = run(sdk, FUZZY).reward
    assert 0.3 < fuzzy < 1.0


def test_model_graders_use_registry_models(served: tuple[openai.OpenAI, httpx.Client]) -> None:
    sdk, http = served
    score = {"type": "score_model", "name": "rm", "model": "tiny-rm", "input": QUESTION,
             "range": [-100, 100]}  # fmt: skip
    graded = run(sdk, score)
    direct = http.post("/v1/score", json={"model": "tiny-rm", "items": [{"messages": [
        {"role": "user", "content": ITEM["question"]},
        {"role": "assistant", "content": SAMPLE}]}]}).json()["results"][0]["score"]  # fmt: skip
    assert graded.reward == pytest.approx(direct, abs=1e-4)
    assert graded.model_dump(by_alias=True)["model_grader_token_usage_per_model"]["tiny-rm"] > 0
    label = {"type": "label_model", "name": "judge", "model": "tiny-pair", "input": QUESTION,
             "labels": ["correct", "incorrect"], "passing_labels": ["correct"]}  # fmt: skip
    judged = run(sdk, label)
    assert judged.reward in (0.0, 1.0) and not judged.metadata.errors.other_error


def test_python_graders_run_in_the_sandbox(served: tuple[openai.OpenAI, httpx.Client]) -> None:
    sdk, _ = served
    source = "def grade(sample, item):\n    return float(sample['output_text'] == item['label'])"
    assert run(sdk, {"type": "python", "name": "py", "source": source}).reward == 1.0
    broken = run(sdk, {"type": "python", "name": "py", "source": "def grade(s, i):\n    1/0"})
    assert broken.reward == 0.0
    errors = broken.metadata.errors
    assert errors.python_grader_runtime_error
    assert "ZeroDivisionError" in (errors.python_grader_runtime_error_details or "")


def test_multi_combines_sub_rewards(served: tuple[openai.OpenAI, httpx.Client]) -> None:
    sdk, _ = served
    multi = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "fuzzy": FUZZY},
             "calculate_output": "0.5 * exact + 0.5 * fuzzy"}  # fmt: skip
    graded = run(sdk, multi)
    subs = graded.sub_rewards
    assert set(subs) == {"exact", "fuzzy"} and subs["exact"] == 1.0
    assert graded.reward == pytest.approx(0.5 + 0.5 * float(subs["fuzzy"]))  # type: ignore[arg-type]


def test_validate_accepts_good_graders_and_names_what_is_wrong(
    served: tuple[openai.OpenAI, httpx.Client],
) -> None:
    sdk, _ = served
    assert sdk.fine_tuning.alpha.graders.validate(grader=EXACT).grader is not None  # type: ignore[arg-type]
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({**EXACT, "operation": "contains"}, openai.UnprocessableEntityError, "operation"),
        ({**FUZZY, "evaluation_metric": "cosine"}, openai.UnprocessableEntityError, "cosine"),
        ({"type": "multi", "name": "m", "graders": {"exact": EXACT},
          "calculate_output": "exact + missing"}, openai.UnprocessableEntityError, "missing"),
        ({"type": "score_model", "name": "s", "model": "gpt-nowhere", "input": QUESTION},
         openai.NotFoundError, "gpt-nowhere"),
        ({"type": "label_model", "name": "l", "model": "tiny-rm", "input": QUESTION,
          "labels": ["a", "b"], "passing_labels": ["a"]}, openai.UnprocessableEntityError,
         "pairwise"),
    ]  # fmt: skip
    for grader, error, says in bad:
        with pytest.raises(error) as caught:
            sdk.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
        assert says in str(caught.value), caught.value
