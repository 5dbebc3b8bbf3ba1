"""The agentic judging loop over scripted judge outputs, with the real in-process tools: tool
calls parsed (unclosed tags, bad JSON, unknown tools), tool errors as observations, the turn
limit, the evidence trail, and the structured-output regex of a tool call."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from rmserve.models.base import RequestOptions
from rmserve.models.engine import Completion, SamplingRequest
from rmserve.models.generative.agentic import (
    ANSWER_NOW,
    ToolLoop,
    parse_tool_calls,
    tool_call_regex,
)
from rmserve.models.generative.backends import Chat, Judged
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.prompts import JudgePrompt
from rmserve.models.spec import GenerativeSpec
from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.tools import LocalToolbox
from rmserve.wire.images import JudgeImage
from rmserve.wire.trajectory import Document, Trajectory

SAMPLING = SamplingRequest(temperature=0.0, top_p=1.0, max_tokens=64, seed=None)
CALC = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'


@dataclass
class ScriptedJudge:
    """A judge backend answering each turn with the next scripted text; records what it saw."""

    script: list[str]
    max_model_len: int = 4096
    vision: bool = False
    seen: list[tuple[Chat, list[dict[str, Any]] | None, str | None]] = field(default_factory=list)

    async def chat(
        self,
        chat: Chat,
        sampling: SamplingRequest,
        images: Sequence[JudgeImage] = (),
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Judged:
        self.seen.append(([dict(m) for m in chat], list(tools) if tools else None, sampling.regex))
        text = self.script.pop(0)
        return Judged([Completion(text, len(text.split()), "stop")], 10 * len(self.seen))

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def toolbox() -> LocalToolbox:
    return LocalToolbox(SandboxSettings(tools=["calculator", "search"]))


async def loop_over(
    toolbox: LocalToolbox, script: list[str], max_turns: int = 3
) -> tuple[ScriptedJudge, Any]:
    judge = ScriptedJudge(script)
    loop = ToolLoop(judge, toolbox, await toolbox.specs(), max_turns, False, 4000, 10**6)
    docs = [Document(id="d1", text="Paris is the capital of France.")]
    return judge, await loop.run("Judge this.", [], docs, SAMPLING, None, 0)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("Fine. \\boxed{7}", "Fine. \\boxed{7}", []),
        (f"Let me check. {CALC}", "Let me check.", [("calculator", {"expression": "12*7"}, None)]),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}',
         "", [("calculator", {"expression": "1+1"}, None)]),  # unclosed
        ('<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}</tool_call>',
         "", [("search", {"query": "x"}, None)]),  # arguments as a JSON string
        ('<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>',
         "", [("", '{"name": "calculator", "arguments": {"expression":', "not valid JSON")]),
        ('<tool_call>{"arguments": {}}</tool_call>', "",
         [("", '{"arguments": {}}', '{"name": "<tool>"')]),
        (f"{CALC}\n{CALC}", "", [("calculator", {"expression": "12*7"}, None)] * 2),
        ('<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b", "arguments": {}}',
         "", [("a", {}, None), ("b", {}, None)]),  # unclosed, then another
    ],
)  # fmt: skip
def test_tool_calls_are_parsed_tolerantly(
    text: str, content: str, calls: list[tuple[str, Any, str | None]]
) -> None:
    parsed_content, parsed = parse_tool_calls(text)
    assert parsed_content == content
    assert len(parsed) == len(calls)
    for call, (name, arguments, error) in zip(parsed, calls, strict=True):
        assert (call.name, call.arguments) == (name, arguments)
        assert (call.error is None) if error is None else (error in (call.error or ""))


async def test_a_tool_call_then_a_verdict_with_evidence(toolbox: LocalToolbox) -> None:
    first = f"Check. {CALC[: -len('</tool_call>')]}"  # the closing tag left out
    judge, result = await loop_over(toolbox, [first, "Right. \\boxed{9}"])
    assert result.text == "Right. \\boxed{9}"
    (evidence,) = result.evidence
    assert (evidence.sample, evidence.turn, evidence.arguments) == (0, 0, {"expression": "12*7"})
    assert evidence.result.tool == "calculator" and evidence.result.output.text == "84"
    assert evidence.result.elapsed_s > 0
    _, offered, _ = judge.seen[0]
    assert {t["function"]["name"] for t in offered or []} == {"calculator", "search"}
    second_chat = judge.seen[1][0]
    assert second_chat[1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert second_chat[2] == {"role": "tool", "tool_call_id": "call_0_0_0", "content": "84"}
    # Both turns count: the scripted judge reports 10 * turn prompt tokens, one per word.
    assert result.prompt_tokens == 10 + 20
    assert result.completion_tokens == len(first.split()) + 2


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        ('<tool_call>{"name": "calculator", "arguments": {"expression": }</tool_call>',
         "invalid_tool_call"),
        ('<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>', "not_found"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>',
         "invalid_arguments"),
        ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>',
         "invalid_arguments"),
    ],
)  # fmt: skip
async def test_broken_calls_and_tool_errors_are_observations(
    toolbox: LocalToolbox, call: str, kind: str
) -> None:
    judge, result = await loop_over(toolbox, [call, "\\boxed{3}"])
    assert result.text == "\\boxed{3}"
    (evidence,) = result.evidence
    assert evidence.result.error.type == kind, evidence.result
    tool_message = judge.seen[1][0][-1]
    assert tool_message["role"] == "tool" and tool_message["content"].startswith(f"error ({kind})")


async def test_the_turn_limit_ends_with_an_instruction_to_answer(toolbox: LocalToolbox) -> None:
    judge, result = await loop_over(toolbox, [CALC, CALC, "\\boxed{5}"], max_turns=2)
    assert result.text == "\\boxed{5}" and len(result.evidence) == 2
    last_chat, last_tools, _ = judge.seen[-1]
    assert last_tools is None
    assert last_chat[-1] == {"role": "user", "content": ANSWER_NOW}
    assert [e.turn for e in result.evidence] == [0, 1]


async def test_search_reads_the_items_documents(toolbox: LocalToolbox) -> None:
    call = '<tool_call>{"name": "search", "arguments": {"query": "capital of France"}}</tool_call>'
    _, result = await loop_over(toolbox, [call, "\\boxed{8}"])
    output = result.evidence[0].result.output
    assert output.text.startswith("[d1")
    assert "Paris" in output.text


async def test_structured_turns_offer_an_answer_or_a_call(toolbox: LocalToolbox) -> None:
    specs = await toolbox.specs()
    regex = tool_call_regex(specs)
    assert regex is not None
    for text in (CALC, '<tool_call>{"name": "search", "arguments": {"query": "x y"}}</tool_call>'):
        match = re.fullmatch(regex, text)
        assert match is not None, text
        json.loads(text[len("<tool_call>") : -len("</tool_call>")])
    assert re.fullmatch(regex, '<tool_call>{"name": "shell", "arguments": {}}</tool_call>') is None
    judge = ScriptedJudge([CALC, "\\boxed{2}"])
    loop = ToolLoop(judge, toolbox, specs, 1, True, 4000, 10**6)
    await loop.run("Judge.", [], [], SAMPLING, r"\\boxed\{[0-9]\}", 0)
    assert judge.seen[0][2] == regex  # required: a call on every turn but the last
    assert judge.seen[1][2] == r"\\boxed\{[0-9]\}"


async def test_a_judge_with_tools_reports_evidence_per_sample(toolbox: LocalToolbox) -> None:
    spec = GenerativeSpec.model_validate({
        "name": "j", "kind": "generative", "weights": "w",
        "options": {"tools": ["calculator"], "samples": 2},
    })  # fmt: skip
    backend = ScriptedJudge([CALC, CALC, "ok \\boxed{6}", "ok \\boxed{8}", "\\boxed{5}"])
    model = GenerativeModel(spec, backend, JudgePrompt.load("principles_pointwise"), None, toolbox)
    item = Trajectory.model_validate({"messages": [
        {"role": "user", "content": "12*7?"}, {"role": "assistant", "content": "84"}]})  # fmt: skip
    reward = await model.score(item, RequestOptions())
    assert reward.score == 7.0
    assert sorted(e.sample for e in reward.evidence or []) == [0, 1]
    offered = {t["function"]["name"] for t in backend.seen[0][1] or []}
    assert offered == {"calculator"}  # only the model's tools, not all the sandbox has
    no_tools = await model.score(item, RequestOptions(tools=()))
    assert no_tools.evidence is None and no_tools.score == 5.0
    assert backend.seen[-1][1] is None
