"""Trajectories in the OpenAI chat format: the items a client asks rmserve to score.

Content is a string or a list of parts (`text`, `image_url` with a `data:` URL, or an http(s)
URL the gateway fetches if it is on its allowlist). Assistant
messages may carry `tool_calls`; tool messages answer them by `tool_call_id`. Unknown roles,
wrong content types and malformed data URLs fail validation with the offending field named.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,"
)


class _Wire(BaseModel):
    # Clients copy messages out of chat completions, which carry fields we do not use
    # (refusal, annotations, ...): accept and ignore them rather than fail.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageURL(_Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _data_or_web_url(cls, url: str) -> str:
        """A well-formed data: URL, or an http(s) URL that the gateway fetches only when it
        is on its allowlist (service/limits.py) and refuses otherwise."""
        if url.startswith(("https://", "http://")):
            if not urlsplit(url).hostname:
                raise ValueError("the image URL has no host")
            return url
        decode_data_url(url)
        return url


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


def decode_data_url(url: str) -> tuple[str, bytes]:
    """Return (mime type, payload) of a base64 `data:` URL, or raise ValueError saying why."""
    if not url.startswith("data:"):
        raise ValueError(
            "only data: URLs are accepted (data:image/png;base64,...); "
            "rmserve does not fetch remote content"
        )
    match = _DATA_URL.match(url)
    if match is None or not match.group("mime"):
        raise ValueError("malformed data: URL, expected data:<mime type>;base64,<payload>")
    mime = match.group("mime")
    if not mime.startswith("image/"):
        raise ValueError(f"data: URL must hold an image, got {mime!r}")
    if not match.group("b64"):
        raise ValueError("data: URL must be base64-encoded (';base64,')")
    try:
        payload = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data: URL payload is not valid base64: {exc}") from None
    if not payload:
        raise ValueError("data: URL payload is empty")
    return mime, payload


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Wire):
    name: str = Field(min_length=1)
    # OpenAI sends arguments as a JSON string. A policy may emit invalid JSON, and judging
    # such actions is the point of a reward model, so it is kept as given.
    arguments: str | dict[str, Any] = "{}"

    def arguments_for_template(self) -> dict[str, Any] | str:
        """Chat templates expect a mapping (the HF convention); fall back to the raw string."""
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            parsed = json.loads(self.arguments)
        except json.JSONDecodeError:
            return self.arguments
        return parsed if isinstance(parsed, dict) else self.arguments


class ToolCall(_Wire):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Wire):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Wire):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str = Field(min_length=1)


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class CodeTest(BaseModel):
    """One test of a program. Three formats, which differ in what the program can forge:

    * ``call`` + ``expected`` (JSON) or ``expected_literal`` (a Python literal: tuples, sets,
      bytes...): the expression runs in the sandbox after the program, its value comes back
      typed, and the host compares it. Safe against an optimising policy.
    * ``stdin`` + ``expected_stdout``: the program's output, compared on the host. Safe.
    * ``code``: Python run after the program in the same interpreter. Plain asserts of the shape
      ``assert CALL == LITERAL`` (and ``assert CALL``, ``isinstance``, ``math.isclose``...)
      are rewritten into call tests on the host; any other code runs in-process, where the
      program can subvert it: unsafe for RL (the `code_tests` verifier refuses it there).
    When a test passes is the rule of `rmserve.sandbox.code_run`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, max_length=256)
    call: str | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="a Python expression evaluated after the program, e.g. `fib(10)`",
    )
    expected: Any = Field(
        default=None, description="the call's expected value, as JSON (arrays match tuples)"
    )
    expected_literal: str | None = Field(
        default=None,
        max_length=1_000_000,
        description="the call's expected value as a Python literal, compared exactly",
    )
    abs_tol: float | None = Field(default=None, ge=0, description="float tolerance (absolute)")
    rel_tol: float | None = Field(default=None, ge=0, description="float tolerance (relative)")
    code: str | None = Field(default=None, max_length=1_000_000)
    stdin: str | None = Field(default=None, max_length=1_000_000)
    expected_stdout: str | None = Field(default=None, max_length=1_000_000)

    @model_validator(mode="after")
    def _has_a_check(self) -> CodeTest:
        # `expected` may be null, so "given" means set; a full dump (a queued job) sets every
        # field, so a null `expected` beside an `expected_literal`, or off a call, is unset.
        given_expected = "expected" in self.model_fields_set and (
            self.expected is not None or (self.call is not None and self.expected_literal is None)
        )
        if self.call is not None:
            self._check_call(given_expected)
        elif given_expected or self.expected_literal is not None:
            raise ValueError("`expected` and `expected_literal` belong to a `call` test")
        elif self.abs_tol is not None or self.rel_tol is not None:
            raise ValueError("`abs_tol` and `rel_tol` belong to a `call` test")
        elif self.code is None and self.expected_stdout is None:
            raise ValueError(
                "a test needs `call` with `expected` (the value is compared on the host), "
                "`expected_stdout` (with `stdin`), or `code` (Python run after the program)"
            )
        return self

    def _check_call(self, given_expected: bool) -> None:
        assert self.call is not None
        others = [name for name in ("code", "stdin", "expected_stdout") if getattr(self, name)]
        if others:
            raise ValueError(f"a `call` test takes no {', '.join(others)}")
        if given_expected == (self.expected_literal is not None):
            raise ValueError("a `call` test needs exactly one of `expected`, `expected_literal`")
        try:
            compile(self.call, "<call>", "eval", dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            raise ValueError(f"`call` is not a Python expression: {exc}") from None
        if self.expected_literal is not None:
            try:
                ast.literal_eval(self.expected_literal)
            except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as exc:
                raise ValueError(f"`expected_literal` is not a Python literal: {exc}") from None
        elif _json_depth(self.expected) > _MAX_EXPECTED_DEPTH:
            raise ValueError(f"`expected` is nested deeper than {_MAX_EXPECTED_DEPTH} levels")
        elif len(json.dumps(self.expected)) > _MAX_EXPECTED_CHARS:
            raise ValueError(f"`expected` is larger than {_MAX_EXPECTED_CHARS} characters")


_MAX_EXPECTED_DEPTH = 100
_MAX_EXPECTED_CHARS = 1_000_000


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > _MAX_EXPECTED_DEPTH:
            return depth
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict | list):
            stack.extend((child, depth + 1) for child in children)
    return deepest


class Candidate(BaseModel):
    """One of several responses to the same conversation (pairwise / listwise judging): the
    assistant (and tool) turns that continue it. A bare string is one assistant message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"messages": [{"role": "assistant", "content": data}]}
        return data


class Document(BaseModel):
    """A document a judge may search (the `search` tool)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(max_length=1_000_000)
    title: str | None = Field(default=None, max_length=1000)


class Trajectory(BaseModel):
    """One item to score: a conversation, optionally with a reference answer and metadata.

    For pairwise / listwise judges, `candidates` holds the responses to compare; `messages` is
    then the conversation they answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1)
    # GRPO / RLOO groups: items of one request with the same `group` are responses to the same
    # prompt. Listwise judges compare a group's responses in one call; every model routes a
    # group to one worker, so its engine computes the shared prompt once.
    group: str | None = Field(default=None, min_length=1, max_length=256)
    # How many responses the group has in all. When a request carries fewer (a trainer that
    # sends one sample per request), the service assembles the group across requests before a
    # listwise judge sees it (service.cohorts). Give grouped items an `id` so that a resent
    # item is recognised.
    group_size: int | None = Field(default=None, ge=1, le=4096)
    candidates: list[Candidate] | None = Field(default=None, min_length=2, max_length=26)
    reference: str | None = None
    # Agentic judges: documents their `search` tool ranks.
    documents: list[Document] | None = Field(default=None, max_length=10_000)
    # code_tests verifiers: the tests the response's code must pass.
    tests: list[CodeTest] | None = Field(default=None, max_length=100)
    metadata: dict[str, Any] | None = None

    @field_validator("group_size")
    @classmethod
    def _group_size_needs_group(cls, size: int | None, info: ValidationInfo) -> int | None:
        if size is not None and info.data.get("group") is None:
            raise ValueError("group_size is the size of the item's `group`; give `group` too")
        return size

    @field_validator("messages")
    @classmethod
    def _tool_results_answer_calls(cls, messages: list[Any]) -> list[Any]:
        called: set[str] = set()
        for index, message in enumerate(messages):
            if isinstance(message, AssistantMessage):
                called.update(call.id for call in message.tool_calls or [])
            elif isinstance(message, ToolMessage) and message.tool_call_id not in called:
                raise ValueError(
                    f"messages[{index}].tool_call_id {message.tool_call_id!r} does not match "
                    "any earlier assistant tool_calls id"
                )
        return messages


def text_of(content: str | list[TextPart] | list[UserPart] | None) -> str:
    """The text of a message content; image parts are not text and are rejected by callers."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


def has_images(trajectory: Trajectory) -> bool:
    return any(
        isinstance(message, UserMessage)
        and isinstance(message.content, list)
        and any(isinstance(part, ImagePart) for part in message.content)
        for message in trajectory.messages
    )
