"""Agentic judging: the judge checks its claims with tools before it answers.

The judge sees the tools' JSON schemas through its chat template's tools support (or, for a
template without it, in Qwen's own text format: backends.tools_in_text) and may answer with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen format; a missing
closing tag is tolerated). Each call goes to the sandbox; its result comes back as a tool message
(long text truncated; a crop becomes a new image for a vision judge, shown in a user message).
The loop goes on for up to `max_tool_turns` turns; then the judge is told to answer, without
tools. A call that is not valid JSON, names an unknown tool or fails is an error observation the
judge reads, never a failure of the item. Every call is kept as evidence: tool, arguments,
output, error, time.

With structured outputs, each turn is constrained to "a final answer or one tool call"
(`tool_choice: auto`) or to "one tool call" (`required`, every turn but the last), the last turn
to the final answer. Tool-call arguments are then generated from the tools' schemas (their
required fields; tools with nested arguments are left out of the constraint).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rmserve.models.base import Evidence
from rmserve.models.engine import SamplingRequest
from rmserve.models.generative.backends import Chat, JudgeBackend, first_turn
from rmserve.models.generative.parsing import thinking_regex
from rmserve.wire.images import JudgeImage, decode_image
from rmserve.wire.tools import Toolbox, ToolCall, ToolContext, ToolErrorBody, ToolResult, ToolSpec
from rmserve.wire.trajectory import Document

ANSWER_NOW = (
    "You have used all your tool calls. Give your final judgement now, in the required format, "
    "without calling tools."
)
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", re.S)


@dataclass(frozen=True)
class RequestedCall:
    """A tool call as the judge wrote it; `error` when it cannot be run as written."""

    name: str
    arguments: dict[str, Any] | str
    error: str | None = None


def parse_tool_calls(text: str) -> tuple[str, list[RequestedCall]]:
    """(text before the first call, the calls); no calls: (text, [])."""
    first = text.find("<tool_call>")
    if first < 0:
        return text, []
    calls = []
    for match in _CALL.finditer(text, first):
        raw = match.group(1).strip()
        try:
            payload = json.loads(raw, strict=False)  # control characters in strings pass
        except ValueError as exc:
            calls.append(RequestedCall("", raw, f"the tool call is not valid JSON: {exc}"))
            continue
        name = payload.get("name") if isinstance(payload, dict) else None
        arguments = payload.get("arguments", {}) if isinstance(payload, dict) else None
        if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments, strict=False)
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(
                RequestedCall(
                    name if isinstance(name, str) else "",
                    raw,
                    'a tool call is {"name": "<tool>", "arguments": {...}}',
                )
            )
            continue
        calls.append(RequestedCall(name, arguments))
    return text[:first].strip(), calls


@dataclass(frozen=True)
class LoopResult:
    text: str  # the final judgement
    completion_tokens: int
    prompt_tokens: int
    evidence: list[Evidence]


@dataclass(frozen=True)
class ToolLoop:
    backend: JudgeBackend
    toolbox: Toolbox
    specs: Sequence[ToolSpec]
    max_turns: int
    required: bool
    max_observation_chars: int
    max_image_pixels: int
    # A reasoning judge: each turn may think before its answer or call (see thinking_regex).
    thinking: bool = False

    async def run(
        self,
        prompt: str,
        images: Sequence[JudgeImage],
        documents: Sequence[Document],
        sampling: SamplingRequest,
        answer_regex: str | None,
        sample: int,
    ) -> LoopResult:
        chat: Chat = first_turn(prompt, len(images))
        seen = list(images)  # the item's images, then crops
        offered = [spec.openai() for spec in self.specs]
        evidence: list[Evidence] = []
        completion_tokens = prompt_tokens = 0
        for turn in range(self.max_turns + 1):
            last = turn == self.max_turns
            if last and turn > 0:
                chat.append({"role": "user", "content": ANSWER_NOW})
            regex = answer_regex if last else self._turn_regex(answer_regex)
            if regex is not None and self.thinking:
                regex = thinking_regex(regex)
            judged = await self.backend.chat(
                chat, replace(sampling, n=1, regex=regex), seen, None if last else offered
            )
            completion = judged.completions[0]
            completion_tokens += completion.tokens
            prompt_tokens += judged.prompt_tokens
            # Calls written while thinking are not made: only what follows the thinking counts.
            thought, end, answer = completion.text.rpartition("</think>")
            content, calls = parse_tool_calls(answer)
            content = thought + end + content
            if last or not calls:
                return LoopResult(completion.text, completion_tokens, prompt_tokens, evidence)
            ids = [f"call_{sample}_{turn}_{i}" for i in range(len(calls))]
            chat.append(_assistant_turn(content, calls, ids))
            context = ToolContext(images=[image.url for image in seen], documents=list(documents))
            results = await asyncio.gather(*(self._call(call, context) for call in calls))
            crops: list[int] = []
            for call_id, call, result in zip(ids, calls, results, strict=True):
                text = self._observation(result, seen, crops)
                chat.append({"role": "tool", "tool_call_id": call_id, "content": text})
                evidence.append(Evidence(sample, turn, call.arguments, result))
            if crops:  # new images the judge can look at (and crop further)
                parts: list[dict[str, Any]] = [{"type": "image"} for _ in crops]
                labels = ", ".join(f"[image {n}]" for n in crops)
                chat.append({"role": "user", "content": [*parts, {"type": "text", "text": labels}]})
        raise AssertionError("unreachable: the last turn returns")

    def _turn_regex(self, answer_regex: str | None) -> str | None:
        if answer_regex is None:
            return None
        calls = tool_call_regex(self.specs)
        if calls is None:
            return answer_regex
        return calls if self.required else f"(?:{answer_regex})|(?:{calls})"

    async def _call(self, call: RequestedCall, context: ToolContext) -> ToolResult:
        if call.error is not None:
            return _failed(call.name, "invalid_tool_call", call.error)
        if call.name not in {spec.name for spec in self.specs}:
            known = ", ".join(spec.name for spec in self.specs)
            return _failed(call.name, "not_found", f"no tool named {call.name!r} (tools: {known})")
        assert isinstance(call.arguments, dict)
        return await self.toolbox.call(
            call.name, ToolCall(arguments=call.arguments, context=context)
        )

    def _observation(self, result: ToolResult, seen: list[JudgeImage], crops: list[int]) -> str:
        """The tool message's text; images in the output join `seen` (numbered from 1)."""
        if result.error is not None:
            return f"error ({result.error.type}): {result.error.message}"
        assert result.output is not None
        text = result.output.text
        for url in result.output.images:
            seen.append(decode_image(url, self.max_image_pixels, len(seen) + 1))
            crops.append(len(seen))
            text += f"\n[image {len(seen)}]"
        limit = self.max_observation_chars
        if len(text) > limit:
            text = text[:limit] + f"\n... [{len(text) - limit} more characters not shown]"
        return text


def _assistant_turn(content: str, calls: Sequence[RequestedCall], ids: Sequence[str]) -> Any:
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {
                    "name": call.name or "invalid",
                    "arguments": call.arguments if isinstance(call.arguments, dict) else {},
                },
            }
            for call_id, call in zip(ids, calls, strict=True)
        ],
    }


def _failed(tool: str, kind: str, message: str) -> ToolResult:
    return ToolResult(tool=tool or "invalid", error=ToolErrorBody(type=kind, message=message))


# -- structured tool calls -------------------------------------------------------------------

_STRING = r'"[^"\\<\x00-\x1f]{1,300}"'  # a structured call's strings: at most 300 characters
_NUMBER = r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?"


def tool_call_regex(specs: Sequence[ToolSpec]) -> str | None:
    """One tool call with each offered tool's required arguments, generated from its schema;
    None when no tool's arguments are flat enough."""
    alternatives = []
    for spec in specs:
        arguments = _object_regex(spec.parameters)
        if arguments is not None:
            name = re.escape(spec.name)
            alternatives.append(r'\{"name": "' + name + r'", "arguments": ' + arguments + r"\}")
    if not alternatives:
        return None
    return r"<tool_call>(" + "|".join(alternatives) + r")</tool_call>"


def _object_regex(schema: dict[str, Any]) -> str | None:
    properties = schema.get("properties", {})
    fields = []
    for name in schema.get("required", []):
        value = _value_regex(properties.get(name, {}))
        if value is None:
            return None
        fields.append(f'"{re.escape(name)}": {value}')
    return r"\{" + ", ".join(fields) + r"\}"


def _value_regex(schema: dict[str, Any]) -> str | None:
    if "enum" in schema:
        return "(" + "|".join(re.escape(json.dumps(v)) for v in schema["enum"]) + ")"
    kind = schema.get("type")
    if kind == "string":
        return _STRING
    if kind == "integer":
        return (
            r"(0|[1-9][0-9]{0,5})" if schema.get("minimum", -1) >= 0 else r"-?(0|[1-9][0-9]{0,5})"
        )
    if kind == "number":
        return _NUMBER
    if kind == "boolean":
        return "(true|false)"
    if kind == "array":
        items = schema.get("prefixItems") or (
            [schema["items"]] * schema["minItems"]
            if "items" in schema and schema.get("minItems") == schema.get("maxItems")
            else None
        )
        if not items:
            return None
        values = [_value_regex(item) for item in items]
        if any(value is None for value in values):
            return None
        return r"\[" + ", ".join(v for v in values if v is not None) + r"\]"
    return None
