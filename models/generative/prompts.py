"""Judge prompts: the conversation and the response(s) to judge, rendered by a Jinja template
into the user message the judge model reads (the judge's own chat template wraps it).

Templates are files: a built-in name (`principles_pointwise`, `rubric_pairwise`,
`rm_r1_reasoning`, `listwise`, `deepseek_grm`, shipped in `models/generative/templates/`) or the
path of the user's own `.jinja` file. They run in Jinja's sandbox with undefined variables as
errors, so a typo fails at load time, not silently.

Variables: `conversation` (the transcript up to the response), `reference` (text or None),
pointwise: `response`, `low`, `high`; pairwise: `candidates` (list of `label` and `text`) and
`labels`; listwise: `candidates`, `labels`, `low` and `high`. Templates put the conversation
before the candidates, so that the judgements of one conversation share a cached prefix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from rmserve.models.generative.parsing import candidate_label
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import (
    AssistantMessage,
    ImagePart,
    Message,
    SystemMessage,
    ToolMessage,
    UserMessage,
    text_of,
)

BUILTIN = Path(__file__).parent / "templates"


def template_path(name_or_path: str) -> Path:
    """A built-in template's file, or the given path (registry paths are already absolute)."""
    builtin = BUILTIN / f"{name_or_path}.jinja"
    return builtin if builtin.is_file() else Path(name_or_path)


def split_response(messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """(context, response): the response is the assistant and tool turns after the last user
    message; raise ItemError when there is none to judge."""
    last_user = max(
        (i for i, message in enumerate(messages) if isinstance(message, UserMessage)), default=-1
    )
    context, response = list(messages[: last_user + 1]), list(messages[last_user + 1 :])
    if not response:
        raise ItemError(
            "no_response", "the item has no assistant response after its last user message"
        )
    return context, response


def transcript(messages: Sequence[Message]) -> str:
    """A plain-text transcript of messages, tool calls and tool results included. Images are
    shown as [image 1], [image 2], ... in order: the judge sees them, in that order, before the
    prompt (vision-language judges)."""
    blocks: list[str] = []
    images = 0
    for message in messages:
        if isinstance(message, SystemMessage):
            blocks.append(f"System: {text_of(message.content)}")
        elif isinstance(message, UserMessage):
            parts = message.content if isinstance(message.content, list) else []
            markers = []
            for part in parts:
                if isinstance(part, ImagePart):
                    images += 1
                    markers.append(f"[image {images}]")
            blocks.append(" ".join([f"User: {text_of(message.content)}".rstrip(), *markers]))
        elif isinstance(message, AssistantMessage):
            lines = [f"Assistant: {text_of(message.content)}".rstrip()]
            for call in message.tool_calls or []:
                arguments = call.function.arguments
                shown = arguments if isinstance(arguments, str) else json.dumps(arguments)
                lines.append(f"Assistant calls tool {call.function.name} with {shown}")
            blocks.append("\n".join(lines))
        elif isinstance(message, ToolMessage):
            blocks.append(f"Tool result: {text_of(message.content)}")
    return "\n\n".join(blocks)


class JudgePrompt:
    def __init__(self, source: str, name: str) -> None:
        environment = SandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
        )
        self.name = name
        self._template = environment.from_string(source)

    @classmethod
    def load(cls, name_or_path: str) -> JudgePrompt:
        """Raise ValueError naming the file when it cannot be read or is not valid Jinja."""
        path = template_path(name_or_path)
        try:
            return cls(path.read_text(), str(path))
        except OSError as exc:
            raise ValueError(f"cannot read judge template {path}: {exc.strerror}") from None
        except TemplateError as exc:
            raise ValueError(f"judge template {path} is not valid Jinja: {exc}") from None

    def pointwise(
        self, context: str, response: str, reference: str | None, low: int, high: int
    ) -> str:
        return self._render(
            conversation=context, response=response, reference=reference, low=low, high=high
        )

    def choice(self, context: str, candidates: Sequence[str], reference: str | None) -> str:
        labels = [candidate_label(i) for i in range(len(candidates))]
        return self._render(
            conversation=context,
            candidates=[{"label": lb, "text": t} for lb, t in zip(labels, candidates, strict=True)],
            labels=labels,
            reference=reference,
        )

    def listwise(
        self, context: str, candidates: Sequence[str], reference: str | None, low: int, high: int
    ) -> str:
        labels = [candidate_label(i) for i in range(len(candidates))]
        return self._render(
            conversation=context,
            candidates=[{"label": lb, "text": t} for lb, t in zip(labels, candidates, strict=True)],
            labels=labels,
            reference=reference,
            low=low,
            high=high,
        )

    def _render(self, **variables: object) -> str:
        try:
            return self._template.render(**variables).strip()
        except TemplateError as exc:
            raise ItemError("template_error", f"judge template {self.name}: {exc}") from None
