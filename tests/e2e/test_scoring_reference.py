"""Scores served over HTTP by the real vLLM CPU engine equal a transformers reference (<= 1e-4)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.models.tiny import STEP_TAG
from tests.e2e import reference as ref

TOL = 1e-4

SINGLE_TURN = [
    {"role": "user", "content": "What is 12 * 7 + 16?"},
    {"role": "assistant", "content": "12 * 7 = 84.\n\n84 + 16 = 100.\n\nThe answer is 100."},
]

TOOL_CALL_ARGS = {"query": "capital of France", "top_k": 3}
MULTI_TURN_OPENAI = [
    {"role": "system", "content": "You are a research assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Which city is the capital of France?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": json.dumps(TOOL_CALL_ARGS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Paris is the capital of France."},
    {"role": "assistant", "content": "It is Paris.\n\nParis is also its largest city."},
]
# The same conversation as HF chat templates take it, written out by hand.
MULTI_TURN_HF = [
    {"role": "system", "content": "You are a research assistant."},
    {"role": "user", "content": "Which city is the capital of France?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": TOOL_CALL_ARGS},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Paris is the capital of France."},
    {"role": "assistant", "content": "It is Paris.\n\nParis is also its largest city."},
]


def score(client: httpx.Client, model: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = client.post("/v1/score", json={"model": model, "items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    assert [r["index"] for r in body["results"]] == list(range(len(items)))
    results: list[dict[str, Any]] = body["results"]
    return results


def test_discriminative_matches_transformers(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    path = tiny_models["tiny-rm"]
    items = [
        {"id": "single", "messages": SINGLE_TURN},
        {"id": "multi", "messages": MULTI_TURN_OPENAI},
    ]
    results = score(client, "tiny-rm", items)
    expected = []
    for hf_messages in (SINGLE_TURN, MULTI_TURN_HF):
        ids = ref.token_ids(path, ref.render(path, hf_messages))
        expected.append((ref.sequence_logits(path, ids)[0], len(ids)))
    for result, (logit, n_tokens) in zip(results, expected, strict=True):
        assert result["error"] is None
        assert abs(result["score"] - logit) <= TOL, (result["id"], result["score"], logit)
        assert result["usage"]["prompt_tokens"] == n_tokens
    # Different conversations get different scores: the comparison above is not vacuous.
    assert abs(results[0]["score"] - results[1]["score"]) > 1e-3


def test_truncate_left_keeps_the_end_of_the_conversation(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    path = tiny_models["tiny-rm"]
    ids = ref.token_ids(path, ref.render(path, MULTI_TURN_HF))
    assert len(ids) > 64  # tiny-rm-truncating has max_model_len 64
    (result,) = score(client, "tiny-rm-truncating", [{"messages": MULTI_TURN_OPENAI}])
    assert result["error"] is None
    expected_usage = {
        "prompt_tokens": 64,
        "truncated_tokens": len(ids) - 64,
        "completion_tokens": 0,
    }
    assert result["usage"] == expected_usage
    assert abs(result["score"] - ref.sequence_logits(path, ids[-64:])[0]) <= TOL


def test_too_long_is_an_item_error_and_the_rest_is_scored(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    path = tiny_models["tiny-rm"]
    long_answer = "The quick brown fox jumps over the lazy dog. " * 60
    long_item = {
        "id": "long",
        "messages": [*SINGLE_TURN[:1], {"role": "assistant", "content": long_answer}],
    }
    results = score(client, "tiny-rm", [long_item, {"id": "ok", "messages": SINGLE_TURN}])
    assert results[0]["score"] is None
    assert results[0]["error"]["type"] == "too_long"
    assert "max_model_len of 256" in results[0]["error"]["message"]
    ids = ref.token_ids(path, ref.render(path, SINGLE_TURN))
    assert abs(results[1]["score"] - ref.sequence_logits(path, ids)[0]) <= TOL


def _prm_separator_reference(path: Path, hf_messages: list[dict[str, Any]]) -> list[float]:
    last = hf_messages[-1]
    steps = [s.strip() for s in last["content"].split("\n\n") if s.strip()]
    tagged = [*hf_messages[:-1], {**last, "content": STEP_TAG.join(steps) + STEP_TAG}]
    ids = ref.token_ids(path, ref.render(path, tagged))
    tag_id = ref.tokenizer(path).convert_tokens_to_ids(STEP_TAG)
    rows = ref.token_logits(path, ids)
    scores = [ref.softmax_label(rows[i], 1) for i, t in enumerate(ids) if t == tag_id]
    assert len(scores) == len(steps)
    return scores


AGGREGATES = {
    "min": min,
    "last": lambda s: s[-1],
    "prod": math.prod,
    "mean": lambda s: sum(s) / len(s),
}


@pytest.mark.parametrize("aggregate", [None, *AGGREGATES])
def test_process_separator_steps_match_transformers(
    client: httpx.Client, tiny_models: dict[str, Path], aggregate: str | None
) -> None:
    path = tiny_models["tiny-prm"]
    items = [{"messages": SINGLE_TURN}, {"messages": MULTI_TURN_OPENAI}]
    options = {"aggregate": aggregate} if aggregate else {}
    response = client.post(
        "/v1/score", json={"model": "tiny-prm", "items": items, "options": options}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for result, hf_messages in zip(results, (SINGLE_TURN, MULTI_TURN_HF), strict=True):
        expected = _prm_separator_reference(path, hf_messages)
        assert result["error"] is None
        assert len(result["step_scores"]) == len(expected)
        for got, want in zip(result["step_scores"], expected, strict=True):
            assert abs(got - want) <= TOL
        # The registry's aggregate for tiny-prm is min.
        assert abs(result["score"] - AGGREGATES[aggregate or "min"](expected)) <= TOL
    assert len(results[0]["step_scores"]) == 3
    assert len(results[1]["step_scores"]) == 2


def test_process_assistant_turns_match_transformers(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    """One reward per agent action: the tag follows each rendered assistant turn."""
    path = tiny_models["tiny-prm"]
    tok = ref.tokenizer(path)
    # Render turn by turn (a different method from the service's prefix rendering).
    text = tok.bos_token
    for message in MULTI_TURN_HF:
        text += ref.render(path, [message])[len(tok.bos_token) :]
        if message["role"] == "assistant":
            text += STEP_TAG
    ids = ref.token_ids(path, text)
    tag_id = tok.convert_tokens_to_ids(STEP_TAG)
    rows = ref.token_logits(path, ids)
    expected = [ref.sigmoid(rows[i][1]) for i, t in enumerate(ids) if t == tag_id]
    assert len(expected) == 2
    (result,) = score(client, "tiny-prm-turns", [{"messages": MULTI_TURN_OPENAI}])
    assert result["error"] is None
    for got, want in zip(result["step_scores"], expected, strict=True):
        assert abs(got - want) <= TOL
    assert abs(result["score"] - math.prod(expected)) <= TOL
