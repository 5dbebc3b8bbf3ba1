"""Render a trajectory with the model's own chat template and turn it into engine input ids."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from rmserve.models.errors import ModelLoadError
from rmserve.models.spec import TooLongPolicy
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import AssistantMessage, Message, SystemMessage, ToolMessage, text_of


@dataclass(frozen=True)
class EngineInput:
    token_ids: list[int]
    truncated_tokens: int


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI chat messages in the shape HF chat templates expect.

    Tool-call arguments become mappings, a missing assistant content becomes "", and the
    `developer` role (OpenAI's newer name for system) becomes `system`. Image parts are
    rejected by the caller before this point: the text models served here cannot see them.
    """
    rendered: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": text_of(message.content)}
        if isinstance(message, SystemMessage):
            entry["role"] = "system"
        elif isinstance(message, AssistantMessage) and message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments_for_template(),
                    },
                }
                for call in message.tool_calls
            ]
        elif isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        rendered.append(entry)
    return rendered


class ChatRenderer:
    """Chat-template rendering, tokenization and the too-long policy for one model.

    What the model's template refuses is the item's error, never silently rewritten: a system
    message under a template without a system role (Gemma 2: "System role not supported") is
    `template_error`, not merged into the user turn. Tool calls under a template that never
    reads `tool_calls` (Gemma 2's drops them without a word) are `unsupported_content`: the
    model would otherwise score the trajectory without its actions.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, too_long: TooLongPolicy) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ModelLoadError(
                "the tokenizer has no chat template, so trajectories cannot be rendered "
                "the way the model was trained"
            )
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.too_long = too_long
        # A mapping of named templates (e.g. default and tool_use) counts if any reads them.
        self.renders_tool_calls = "tool_calls" in str(template)
        self.renders_tools = re.search(r"\btools\b", str(template)) is not None

    def render(
        self,
        chat: list[dict[str, Any]],
        generation_prompt: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages already in template shape (see `template_messages`); with
        `generation_prompt`, end with the opening of the assistant's turn (generation);
        `tools` (OpenAI function-tool shape) go to the template's tools support."""
        if not self.renders_tool_calls and any(m.get("tool_calls") for m in chat):
            raise ItemError(
                "unsupported_content",
                "the model's chat template does not render tool calls (it never reads "
                "`tool_calls`), so the trajectory would be scored without its actions",
            )
        try:
            text = self.tokenizer.apply_chat_template(
                chat,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                tools=list(tools) if tools else None,
            )
        except TemplateError as exc:
            raise ItemError(
                "template_error", f"the model's chat template refused it: {exc}"
            ) from None
        assert isinstance(text, str)
        return text

    def encode(self, text: str) -> list[int]:
        # The template already wrote the special tokens (BOS, turn markers).
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def fit(self, token_ids: list[int]) -> EngineInput:
        """Apply the too-long policy: error, or keep the end of the conversation."""
        excess = len(token_ids) - self.max_model_len
        if excess <= 0:
            return EngineInput(token_ids, 0)
        if self.too_long == "error":
            raise ItemError(
                "too_long",
                f"the rendered trajectory has {len(token_ids)} tokens, more than the model's "
                f"max_model_len of {self.max_model_len}",
            )
        return EngineInput(token_ids[excess:], excess)
