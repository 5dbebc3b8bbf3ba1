"""GRPO groups (`group` on items): a group scored in one request gets the scores its items get
one by one, and both equal an independent transformers computation (<= 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.e2e import reference as ref
from tests.e2e.test_scoring_reference import TOL, _prm_separator_reference, score

SYSTEM = "You are a careful math tutor. Show each step, then give the answer in a box."
PROMPT = "A shop sells pens at 3 for 2 dollars. How much do 12 pens cost, and 18 pens?"
RESPONSES = [
    "12 pens are 4 groups of 3.\n\n4 * 2 = 8 dollars.\n\n18 pens are 6 groups, 12 dollars.",
    "Each pen costs 2/3 dollars.\n\n12 * 2/3 = 8.\n\n18 * 2/3 = 12.",
    "12 pens cost 6 dollars.\n\n18 pens cost 9 dollars.",
    "4 groups of 3 make 12.\n\nSo 8 dollars.",
    "I do not know.",
    "12 / 3 = 4 and 4 * 2 = 8.\n\n18 / 3 = 6 and 6 * 2 = 12.\n\nAnswers: 8 and 12 dollars.",
]


def conversation(response: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": response},
    ]


def group_items(group: str | None) -> list[dict[str, Any]]:
    extra = {"group": group} if group is not None else {}
    return [
        {"id": f"r{i}", "messages": conversation(response), **extra}
        for i, response in enumerate(RESPONSES)
    ]


def test_a_discriminative_group_scores_as_its_items_alone_and_as_transformers(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    path = tiny_models["tiny-rm"]
    grouped = score(client, "tiny-rm", group_items("prompt-1"))
    alone = [score(client, "tiny-rm", [item])[0] for item in group_items(None)]
    for g, a, response in zip(grouped, alone, RESPONSES, strict=True):
        assert g["error"] is None and a["error"] is None
        ids = ref.token_ids(path, ref.render(path, conversation(response)))
        (logit,) = ref.sequence_logits(path, ids)[:1]
        assert abs(g["score"] - a["score"]) <= TOL
        assert abs(g["score"] - logit) <= TOL, (g["id"], g["score"], logit)
        assert g["usage"]["prompt_tokens"] == len(ids)
    assert [r["id"] for r in grouped] == [f"r{i}" for i in range(len(RESPONSES))]
    assert len({round(r["score"], 4) for r in grouped}) == len(RESPONSES)  # not vacuous


def test_a_process_group_scores_as_its_items_alone_and_as_transformers(
    client: httpx.Client, tiny_models: dict[str, Path]
) -> None:
    path = tiny_models["tiny-prm"]
    grouped = score(client, "tiny-prm", group_items("prompt-1"))
    alone = [score(client, "tiny-prm", [item])[0] for item in group_items(None)]
    for g, a, response in zip(grouped, alone, RESPONSES, strict=True):
        assert g["error"] is None and a["error"] is None
        expected = _prm_separator_reference(path, conversation(response))
        assert len(g["step_scores"]) == len(a["step_scores"]) == len(expected)
        for got, lone, want in zip(g["step_scores"], a["step_scores"], expected, strict=True):
            assert abs(got - lone) <= TOL
            assert abs(got - want) <= TOL
        assert abs(g["score"] - min(expected)) <= TOL


def test_a_group_needs_a_name(client: httpx.Client) -> None:
    items = group_items("")
    response = client.post("/v1/score", json={"model": "tiny-rm", "items": items})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "items.0.group"
