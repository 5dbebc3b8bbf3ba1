"""Text that a trainer decoded with its actor's chat template, back into chat messages.

OpenRLHF sends `tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)`: the
conversation as the actor saw it, turn markers and all. A reward model scores what it was trained
on, a conversation rendered with its own template, so the markers are parsed back into OpenAI
messages (roles and contents) rather than sent on as text.

Supported templates, found by their turn markers:

    chatml  <|im_start|>ROLE\\n ... <|im_end|>           Qwen (2, 2.5, 3), Hermes, Yi, SmolLM, ...
    llama3  <|start_header_id|>ROLE<|end_header_id|>\\n\\n ... <|eot_id|>   Llama 3, 3.1, 3.2, 3.3
    gemma   <start_of_turn>ROLE\\n ... <end_of_turn>       Gemma, Gemma 2 (role `model`: assistant)

Roles system (developer), user and assistant (model) are kept; any other role (a `tool` or
`ipython` turn, which OpenAI messages cannot carry without tool call ids) makes the text
unparseable (ChatTextError) rather than be guessed at. The template's turn ends, BOS and EOS
tokens (`<|begin_of_text|>`, `<|endoftext|>`, `<bos>`, `<eos>`, ...) are dropped; a turn's
content is otherwise kept as written.

Text before the first marker is what left truncation (OpenRLHF keeps the prompt's last
max_prompt_length tokens) left of the first turn: it becomes a turn of its own, never merged
into the next one, with the role its header left behind when the cut fell inside the header
(`user\\n...`, `user<|end_header_id|>...`), else `user` (the prompt is what gets truncated).
A last turn without its end marker (generation stopped at max tokens) is still the response.

Without a template the text is plain: `split_plain` finds the response after the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# How much of a prompt's end the start of a left-truncated query must repeat to be taken as that
# prompt (shorter matches are chance: a shared space or punctuation mark).
MIN_OVERLAP = 8
_PROBE = 64
# A byte-level tokenizer decodes a character whose first bytes were truncated away as U+FFFD.
_REPLACEMENT = "\ufffd"

_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "model": "assistant",
}
# A header cut before its role's plain newline: only these names are taken for a role.
_KNOWN_ROLES = "|".join(_ROLES)
# Plain text: BOS tokens at its start and EOS tokens at its end, of common tokenizers.
PLAIN_BOS = ("<|begin_of_text|>", "<|endoftext|>", "<s>", "<bos>")
PLAIN_EOS = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "</s>", "<eos>")


class ChatTextError(ValueError):
    """The text has a template's markers but cannot be read as a conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    # One turn's opening; its group `role` is the role as the template wrote it.
    header: re.Pattern[str]
    # What the template writes around the turns: turn ends, BOS and EOS tokens.
    specials: tuple[str, ...]
    # What is left of a header whose opening token was truncated away (text start).
    orphan_header: re.Pattern[str]


_ROLE = r"(?P<role>[A-Za-z_][\w-]*)"
TEMPLATES = (
    ChatTemplate(
        "chatml",
        re.compile(rf"<\|im_start\|>{_ROLE}\n"),
        ("<|im_end|>", "<|endoftext|>"),
        re.compile(rf"^(?P<role>{_KNOWN_ROLES})\n"),
    ),
    ChatTemplate(
        "llama3",
        re.compile(rf"<\|start_header_id\|>{_ROLE}<\|end_header_id\|>(?:\n\n)?"),
        ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|begin_of_text|>"),
        re.compile(rf"^{_ROLE}<\|end_header_id\|>(?:\n\n)?"),
    ),
    ChatTemplate(
        "gemma",
        re.compile(rf"<start_of_turn>{_ROLE}\n"),
        ("<end_of_turn>", "<eos>", "<bos>"),
        re.compile(rf"^(?P<role>{_KNOWN_ROLES})\n"),
    ),
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def find_template(text: str) -> ChatTemplate | None:
    """The template whose turn marker comes first in `text`, or None (plain text)."""
    found = [(m.start(), t) for t in TEMPLATES if (m := t.header.search(text)) is not None]
    return min(found, key=lambda hit: hit[0])[1] if found else None


def parse_chat(text: str, template: ChatTemplate) -> list[Message]:
    """The turns of `text`, written with `template` (ChatTextError when they cannot be read)."""
    headers = list(template.header.finditer(text))
    if not headers:
        raise ChatTextError(f"no {template.name} turn markers in the text")
    messages = []
    leading = strip_trailing(
        strip_leading(text[: headers[0].start()], template.specials), template.specials
    )
    if leading.strip():
        messages.append(_leading_turn(leading, template))
    ends = [h.start() for h in headers[1:]] + [len(text)]
    for header, end in zip(headers, ends, strict=True):
        content = strip_trailing(text[header.end() : end], template.specials)
        messages.append(Message(_role(header["role"], template), content))
    if not any(m.role == "assistant" for m in messages):
        raise ChatTextError(
            f"the {template.name} turns have no assistant turn, so there is no response to score"
        )
    return messages


def _leading_turn(text: str, template: ChatTemplate) -> Message:
    """Text before the first marker: the rest of a turn whose opening was truncated away."""
    text = text.lstrip()  # what a cut header left: its newline
    if match := template.orphan_header.match(text):
        return Message(_role(match["role"], template), text[match.end() :])
    return Message("user", text)


def _role(role: str, template: ChatTemplate) -> str:
    try:
        return _ROLES[role]
    except KeyError:
        raise ChatTextError(
            f"a {template.name} turn has the role {role!r}; only system, user and assistant "
            "turns can be parsed"
        ) from None


def strip_leading(text: str, tokens: tuple[str, ...]) -> str:
    """Drop `tokens` (BOS) and truncated characters (U+FFFD) from the start of `text`."""
    while True:
        token = next((t for t in tokens if text.startswith(t)), None)
        if token is None and not text.startswith(_REPLACEMENT):
            return text
        text = text[len(token) if token is not None else 1 :]


def strip_trailing(text: str, tokens: tuple[str, ...]) -> str:
    """Drop `tokens` (turn ends, EOS) and the whitespace after them from the end of `text`;
    whitespace that is not followed by one of them is content and stays."""
    while True:
        rest = text.rstrip()
        token = next((t for t in tokens if rest.endswith(t)), None)
        if token is None:
            return text
        text = rest[: -len(token)]


def split_plain(query: str, prompt: str) -> str | None:
    """The response: what follows the prompt in the query. The query may start with only the
    prompt's end (left truncation); then what follows the longest end of the prompt it starts
    with. None when the query does not start with the prompt or MIN_OVERLAP of its end."""
    if query.startswith(prompt):
        return query[len(prompt) :]
    overlap = _overlap(prompt, query)
    return query[overlap:] if overlap >= MIN_OVERLAP else None


def _overlap(prompt: str, query: str) -> int:
    """The length of the longest end of `prompt` that `query` starts with."""
    probe = query[:_PROBE]
    start = prompt.find(probe) if probe else -1
    while start != -1:  # from the left: the first that fits is the longest
        if query.startswith(prompt[start:]):
            return len(prompt) - start
        start = prompt.find(probe, start + 1)
    for length in range(min(len(prompt), len(probe)), 0, -1):  # ends shorter than the probe
        if query.startswith(prompt[-length:]):
            return length
    return 0


@dataclass(frozen=True)
class ParsedQuery:
    messages: list[Message]
    # The template the turns were read with; None: plain text, split at the prompt.
    template: str | None
    # Plain text that neither starts with its prompt nor with the prompt's end: the whole query
    # became the response, after the prompt as the user turn.
    unmatched_prompt: bool = False


def parse_query(query: str, prompt: str, templates: bool = True) -> ParsedQuery:
    """A trainer's query (prompt + response, decoded) and its prompt as chat messages: the
    turns of a known chat template (`templates`), else the prompt as the user turn and the rest
    of the query as the assistant's response."""
    query, prompt = strip_leading(query, PLAIN_BOS), strip_leading(prompt, PLAIN_BOS)
    response = split_plain(query, prompt) if prompt else query
    if templates:
        parsed = _templated(query, prompt, response)
        if parsed is not None:
            return parsed
    reply = strip_trailing(response if response is not None else query, PLAIN_EOS)
    messages = [Message("user", prompt), Message("assistant", reply)]
    return ParsedQuery(messages, None, unmatched_prompt=response is None)


def _templated(query: str, prompt: str, response: str | None) -> ParsedQuery | None:
    if prompt and response is not None:
        # The prompt's markers decide: a plain prompt's response may contain stray ones.
        template = find_template(prompt)
        return _parsed(prompt + response, template) if template is not None else None
    if (template := find_template(query)) is not None:
        return _parsed(query, template)  # what truncation left of the prompt starts it
    if prompt and (template := find_template(prompt)) is not None:
        # Truncated to less than MIN_OVERLAP of the prompt (inside its generation header): the
        # prompt's turns, and the query as the response.
        return _parsed(prompt + query, template, unmatched_prompt=True)
    return None


def _parsed(text: str, template: ChatTemplate, unmatched_prompt: bool = False) -> ParsedQuery:
    return ParsedQuery(parse_chat(text, template), template.name, unmatched_prompt)
