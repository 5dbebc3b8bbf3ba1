"""Where a judge's generations come from: a local vLLM engine, or (remote backend) any
OpenAI-compatible chat endpoint. Both take the judge prompt as the user message's text, after
the item's images (vision-language judges), which the prompt refers to as [image 1], ..."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from rmserve.models.engine import Completion, GenerateEngine, SamplingRequest
from rmserve.models.rendering import ChatRenderer
from rmserve.wire.errors import ItemError
from rmserve.wire.images import JudgeImage


@dataclass(frozen=True)
class Judged:
    completions: list[Completion]
    prompt_tokens: int


# A judge conversation in chat-template shape: {"role", "content"} messages, content a string or
# parts {"type": "text", "text"} / {"type": "image"} (the next of the call's images, in order);
# assistant messages may carry OpenAI-shaped `tool_calls` (arguments as mappings) and tool
# messages a `tool_call_id`.
Chat = list[dict[str, Any]]


def first_turn(prompt: str, images: int) -> Chat:
    """The judge's opening user message: the images, then the judge prompt."""
    if not images:
        return [{"role": "user", "content": prompt}]
    parts = [{"type": "image"} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


# The end of a rendered prompt whose chat template opened the judge's thinking (DeepSeek-R1
# distills end every generation prompt with "<think>\n").
_OPENED_THINKING = re.compile(r"<think>[ \t\r\n]*\Z")


def _with_opening(prompt: str, completions: list[Completion]) -> list[Completion]:
    """The completions as whole assistant turns: when the chat template opened a <think> block,
    each judgement starts inside it, so the opening is part of its text. The parser then reads a
    judgement that never closes the block as truncated thinking, never as an answer."""
    opened = _OPENED_THINKING.search(prompt)
    if opened is None:
        return completions
    return [replace(c, text=opened.group(0) + c.text) for c in completions]


# The tool signatures and call format Qwen's chat templates write (Hermes style), for templates
# that render no tools themselves (Qwen2.5-VL-Instruct's).
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _has_tool_turns(chat: Chat) -> bool:
    return any(m.get("tool_calls") or m["role"] == "tool" for m in chat)


def tools_in_text(chat: Chat, tools: Sequence[dict[str, Any]]) -> Chat:
    """The chat for a template that renders no tools, written as Qwen's own templates write
    them: the tools' signatures in the system message, the judge's calls as
    `<tool_call>{...}</tool_call>` text, and each run of tool results as one user turn of
    `<tool_response>` blocks. (The agentic loop reads calls back from that text.)"""
    out: Chat = []
    if tools:
        listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        block = _TOOLS_HEADER + listed + _TOOLS_FOOTER
        if chat and chat[0]["role"] == "system" and isinstance(chat[0]["content"], str):
            out.append({"role": "system", "content": chat[0]["content"] + "\n\n" + block})
            chat = chat[1:]
        else:
            out.append({"role": "system", "content": block})
    for message in chat:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            previous = out[-1] if out else None
            if previous is not None and previous.get("tool_results"):
                previous["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif message.get("tool_calls"):
            calls = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in message["tool_calls"]
            ]
            text = "\n".join([message["content"], *calls] if message["content"] else calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


class JudgeBackend(Protocol):
    max_model_len: int
    # The judge model reads images.
    vision: bool

    async def chat(
        self,
        chat: Chat,
        sampling: SamplingRequest,
        images: Sequence[JudgeImage] = (),
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Judged:
        """`sampling.n` completions of the judge's next turn; `tools` (OpenAI function-tool
        shape) are offered through the chat template. Tool calls come back in the completion
        text as `<tool_call>{...}</tool_call>`. ItemError when the chat cannot be judged."""
        ...

    def shutdown(self) -> None: ...


class LocalBackend:
    """The judge model's chat template and tokenizer, then a long-lived vLLM engine."""

    def __init__(self, renderer: ChatRenderer, engine: GenerateEngine) -> None:
        self._renderer, self._engine = renderer, engine
        self.max_model_len = engine.max_model_len
        self.vision = engine.image_token_id is not None

    async def chat(
        self,
        chat: Chat,
        sampling: SamplingRequest,
        images: Sequence[JudgeImage] = (),
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Judged:
        if not self._renderer.renders_tools and (tools or _has_tool_turns(chat)):
            chat, tools = tools_in_text(chat, tools or ()), None
        text = self._renderer.render(chat, generation_prompt=True, tools=tools)
        ids = self._renderer.encode(text)
        placeholder = self._engine.image_token_id
        if images and (placeholder is None or ids.count(placeholder) != len(images)):
            raise ItemError(
                "unsupported_content",
                "the item's text contains the judge model's image placeholder token",
            )
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise ItemError(
                "too_long",
                f"the judge prompt has {len(ids)} tokens; with max_tokens {sampling.max_tokens} "
                f"it exceeds the model's max_model_len of {self.max_model_len}",
            )
        generation = await self._engine.generate(ids, sampling, [image.image for image in images])
        return Judged(_with_opening(text, generation.completions), generation.prompt_tokens)

    def shutdown(self) -> None:
        self._engine.shutdown()
