"""Where a judge's generations come from: a local vLLM engine, or (remote backend) any
OpenAI-compatible chat endpoint. Both take the judge prompt as the user message's text, after
the item's images (vision-language judges), which the prompt refers to as [image 1], ..."""

from __future__ import annotations

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
