"""Judge prompts: splitting the response off, transcripts, and the shipped templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from rmserve.models.base import require_text_only
from rmserve.models.generative.parsing import (
    listwise_answer_regex,
    parse_choice,
    parse_listwise,
    parse_pointwise,
)
from rmserve.models.generative.prompts import JudgePrompt, split_response, transcript
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory

AGENT = Trajectory.model_validate({"messages": [
    {"role": "system", "content": "You can search."},
    {"role": "user", "content": "When was the Eiffel Tower completed?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
        "function": {"name": "search", "arguments": "{\"query\": \"Eiffel Tower\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "Built 1887-1889."},
    {"role": "assistant", "content": "In 1889."},
]})  # fmt: skip


def test_the_response_is_everything_after_the_last_user_message() -> None:
    context, response = split_response(AGENT.messages)
    assert [m.role for m in context] == ["system", "user"]
    assert [m.role for m in response] == ["assistant", "tool", "assistant"]
    text = transcript(response)
    assert 'Assistant calls tool search with {"query": "Eiffel Tower"}' in text
    assert "Tool result: Built 1887-1889." in text and text.endswith("Assistant: In 1889.")
    with pytest.raises(ItemError) as caught:
        split_response(AGENT.messages[:2])
    assert caught.value.code == "no_response"


def test_pointwise_template_names_the_range_and_holds_the_inputs() -> None:
    prompt = JudgePrompt.load("principles_pointwise").pointwise(
        "User: q?", "Assistant: a.", "the answer is a", 1, 10
    )
    assert "from 1 (worst) to 10 (best)" in prompt and "\\boxed{score}" in prompt
    assert prompt.index("User: q?") < prompt.index("the answer is a") < prompt.index("a.")
    without = JudgePrompt.load("principles_pointwise").pointwise("c", "r", None, 1, 10)
    assert "[Reference answer]" not in without


def test_pairwise_template_labels_every_candidate_in_order() -> None:
    prompt = JudgePrompt.load("rubric_pairwise").choice(
        "User: q?", ["first", "second", "third"], None
    )
    assert "[[A]], [[B]], [[C]]" in prompt
    assert prompt.index("[Response A]\nfirst") < prompt.index("[Response B]\nsecond")
    assert prompt.index("[Response B]\nsecond") < prompt.index("[Response C]\nthird")


def test_listwise_template_shows_the_conversation_once_before_every_candidate() -> None:
    template = JudgePrompt.load("listwise")
    prompt = template.listwise("User: q?", ["first", "second", "third"], "ref", 0, 5)
    assert "integer score from 0 (worst) to 5 (best)" in prompt
    assert prompt.count("User: q?") == 1
    assert prompt.index("User: q?") < prompt.index("ref") < prompt.index("[Response A]\nfirst")
    assert prompt.index("[Response A]\nfirst") < prompt.index("[Response B]\nsecond")
    assert prompt.index("[Response B]\nsecond") < prompt.index("[Response C]\nthird")
    assert prompt.endswith("[Response C]\nthird")
    # Another order of the same candidates shares everything up to the first response (the
    # prefix vLLM caches).
    other = template.listwise("User: q?", ["third", "first", "second"], "ref", 0, 5)
    head = prompt[: prompt.index("[Response A]")]
    assert other.startswith(head) and "[Reference answer]" in head
    assert "[Reference answer]" not in template.listwise("c", ["a", "b"], None, 0, 5)


def test_a_user_template_with_an_unknown_variable_fails_per_item(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("Judge {{ response }} against {{ principles }}")
    with pytest.raises(ItemError) as caught:
        JudgePrompt.load(str(path)).pointwise("c", "r", None, 1, 10)
    assert caught.value.code == "template_error" and "principles" in caught.value.message
    (tmp_path / "broken.jinja").write_text("{% if %}")
    with pytest.raises(ValueError, match="not valid Jinja"):
        JudgePrompt.load(str(tmp_path / "broken.jinja"))
    with pytest.raises(ValueError, match="cannot read judge template"):
        JudgePrompt.load(str(tmp_path / "missing.jinja"))


def test_the_shipped_answers_match_the_parsers() -> None:
    """The answer format each template asks for is the one its parser reads."""
    assert parse_pointwise("Principle 1 ... \\boxed{7}", 1, 10).score == 7
    assert parse_choice("<rubric>r</rubric><eval>e</eval><answer>[[B]]</answer>", 2).choice == 1
    shown = JudgePrompt.load("listwise").listwise("c", ["x", "y", "z"], None, 1, 10)
    example = shown.split("exactly as:\n")[1].split("\n")[0]
    assert example == "Scores: A=<score>, B=<score>, C=<score>"
    answer = example.replace("<score>", "7")
    assert parse_listwise(answer, 3, 1, 10).scores == (7.0, 7.0, 7.0)
    assert re.fullmatch(listwise_answer_regex(3, 1, 10, 0), answer)


def test_candidates_accept_strings_and_need_two_and_a_judge() -> None:
    item = Trajectory.model_validate(
        {"messages": [{"role": "user", "content": "q"}], "candidates": ["a", {"messages": [
            {"role": "assistant", "content": "b"}]}]}
    )  # fmt: skip
    assert item.candidates is not None and len(item.candidates) == 2
    with pytest.raises(ValidationError) as caught:
        Trajectory.model_validate({"messages": [{"role": "user", "content": "q"}],
                                   "candidates": ["only one"]})  # fmt: skip
    assert caught.value.errors()[0]["loc"] == ("candidates",)
    with pytest.raises(ItemError) as refused:
        require_text_only(item, "rm")
    assert refused.value.code == "unsupported_content" and "generative" in refused.value.message
