"""The part of a response a verifier checks: all of it, the last `\\boxed{}` or the last fence."""

from __future__ import annotations

import re
from typing import Literal

Extract = Literal["final", "boxed", "code_block", "full"]

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_OPEN_FENCE = re.compile(r"([ \t]*)(`{3,})[^`]*")
_CLOSE_FENCE = re.compile(r"[ \t]*(`{3,})[ \t]*")


def extract(text: str, how: Extract) -> str | None:
    """`text` as given (`final`, `full`), or its last box or code block: None when it has none."""
    if how == "boxed":
        return last_boxed(text)
    if how == "code_block":
        return last_code_block(text)
    if how in ("final", "full"):
        return text
    raise ValueError(f"unknown extraction {how!r}")


def last_boxed(text: str) -> str | None:
    """The content of the last top-level `\\boxed{...}` or `\\fbox{...}`, stripped.

    Braces nest; `\\{` and `\\}` don't count. None if there is no box, or if the last one is
    never closed (a truncated answer is not replaced by an earlier one).
    """
    found = None
    position = 0
    while match := _BOX.search(text, position):
        end = _closing_brace(text, match.end())
        if end is None:
            return None
        found = text[match.end() : end].strip()
        position = end + 1
    return found


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the `}` closing the group opened just before `start`."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_code_block(text: str) -> str | None:
    """The body of the last fenced (```) block, without its language tag; None if none.

    Fences follow CommonMark: a closing fence is a line of at least as many backticks as the
    opening one, and the body's lines lose up to the opening fence's indentation. A block that
    is never closed runs to the end of the text.
    """
    last = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN_FENCE.fullmatch(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening[1]), opening[2]
        body, i = _fence_body(lines, i + 1, fence)
        last = "\n".join(_dedent(line, indent) for line in body)
    return last


def _fence_body(lines: list[str], start: int, fence: str) -> tuple[list[str], int]:
    """The lines from `start` up to the closing fence, and the index after that fence."""
    for i in range(start, len(lines)):
        closing = _CLOSE_FENCE.fullmatch(lines[i])
        if closing is not None and len(closing[1]) >= len(fence):
            return lines[start:i], i + 1
    return lines[start:], len(lines)


def _dedent(line: str, indent: int) -> str:
    removable = len(line) - len(line.lstrip(" \t"))
    return line[min(indent, removable) :]
