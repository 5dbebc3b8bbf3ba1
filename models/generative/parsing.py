"""Turn the raw text of one LLM-judge judgement into a verdict, or raise JudgementParseError.

A judge writes a free-form critique and then its final answer:

- pointwise (DeepSeek-GRM style): principles and critique, then the score as `\\boxed{7}`;
- pairwise (RM-R1 style): rubric and evaluation, then the chosen candidate as `[[A]]`,
  `[[B]]`, ... often inside `<answer>[[B]]</answer>`;
- listwise: a critique of all candidates, then one score per candidate in a final block
  `Scores: A=7, B=3, C=9`, or in DeepSeek-GRM's format one box of scores in the order shown,
  `Scores: \\boxed{7, 3, 9}` (`parse_boxed_list`).

Rules shared by both formats:

- Thinking: everything up to the last `</think>` is a reasoning model's thinking and is ignored,
  so an answer there never counts; if the only answers are in the thinking, that is an error
  ("no final answer after </think>"). A judgement that starts with `<think>` (after spaces,
  tabs or newlines) and never closes it was truncated while thinking: error.
- The last answer marker after the thinking wins (judges restate or box intermediate values).
- Critique: the text after the thinking and before the final marker, with `<answer>`/`</answer>`
  tags removed, stripped. A "Final score:" label just before the marker stays in it.
- There is never a default verdict: a missing, malformed, truncated or out-of-range answer
  raises JudgementParseError whose `reason` says what was found and `raw` is the whole text.
  Listwise, a candidate whose score is missing, out of range or conflicting gets None (with
  the reason in `problems`); only a block without any usable score is an error. A box of
  scores has no labels: one with the wrong number of scores is an error.

`pointwise_answer_regex`, `choice_answer_regex`, `listwise_answer_regex` and
`boxed_list_answer_regex` build plain regexes
(character classes, bounded repetition, alternation only) for structured generation; every text
they fully match parses to the answer in its marker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_THINK_END = "</think>"
_UNCLOSED_THINK = re.compile(r"[ \t\r\n]*<think>")
_ANSWER_TAGS = re.compile(r"</?answer>")
_BOX = "\\boxed{"
_TEXT = "\\text{"
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:/\s*(\d+(?:\.\d*)?)\s*)?")
_MARKER = re.compile(r"\[\[([^\[\]]*)\]\]")
# Listwise: the final block's marker (also inside a word: a constrained critique may end in a
# letter), its extent (up to a blank line) and its entries `A=7` (also `a: 7`, `A = 7/10`);
# a label is one letter not preceded by a letter, digit or `_`.
_SCORES = re.compile(r"scores[ \t]*:", re.IGNORECASE)
_BLOCK_END = re.compile(r"\n[ \t\r]*\n")
_ENTRY = re.compile(
    r"(?<![A-Za-z0-9_])([A-Za-z])[ \t]*[=:][ \t]*([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:[ \t]*/[ \t]*(\d+(?:\.\d*)?))?(?![\d.])"
)
_SHOWN_CHARS = 40


class JudgementParseError(Exception):
    """The judgement has no usable final answer; `reason` says why, `raw` is the text."""

    reason: str
    raw: str

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class PointwiseVerdict:
    """A pointwise judgement: its score and the critique before the final `\\boxed{}`."""

    score: float
    critique: str


@dataclass(frozen=True)
class ChoiceVerdict:
    """A pairwise judgement: 0-based index of the chosen candidate (A=0, B=1, ...)."""

    choice: int
    critique: str


@dataclass(frozen=True)
class ListwiseVerdict:
    """A listwise judgement: one score per candidate in the order shown (None where the judge
    gave no usable score, `problems` saying why), and the critique before the block."""

    scores: tuple[float | None, ...]
    critique: str
    problems: tuple[str, ...] = ()


def parse_pointwise(text: str, low: float, high: float) -> PointwiseVerdict:
    """Score of a pointwise judgement: the content of its last `\\boxed{...}`.

    The box is matched up to its balancing `}` (nested braces are fine); a final box that is
    never closed means a truncated generation: error. Its content, spaces around it ignored and
    an optional `\\text{...}` wrapper removed, must be a finite number: integer or decimal,
    optionally signed, or a fraction `7/10` whose denominator equals `high` (the numerator is
    the score). Anything else (empty, words, `\\frac{1}{2}`) is an error naming what was found,
    as is a score outside [low, high].
    """
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"invalid score range {low}-{high}")
    content, before = _final_box(text, "\\boxed{score}")
    number = _number(content, high, text)
    score = float(number)
    if not math.isfinite(score):
        raise JudgementParseError(f"score {_shorten(number)} is not finite", text)
    if not low <= score <= high:
        raise JudgementParseError(f"score {_shorten(number)} is outside {low:g}-{high:g}", text)
    return PointwiseVerdict(score=score, critique=_critique(before))


def parse_choice(text: str, candidates: int) -> ChoiceVerdict:
    """Chosen candidate of a pairwise judgement: its last `[[X]]` marker.

    Candidates are labelled A, B, C, ...; the marker's label is case-insensitive and may have
    spaces inside the brackets (`[[ b ]]`). Only the last marker counts, so "[[A]] and [[B]]
    are equally good" is a verdict for B: ties are not verdicts. A last marker that is not one
    of the labels (`[[C]]` with two candidates, `[[tie]]`) is an error naming it.
    """
    labels = [candidate_label(i) for i in range(_check_candidates(candidates))]
    expected = "/".join(f"[[{label}]]" for label in labels)
    thinking, answer = _split_thinking(text)
    markers = list(_MARKER.finditer(answer))
    if not markers:
        if _MARKER.search(thinking):
            raise JudgementParseError(
                f"no final answer after </think>: the verdict {expected} is only in the thinking",
                text,
            )
        raise JudgementParseError(f"no verdict {expected} in the judgement", text)
    last = markers[-1]
    label = last.group(1).strip().upper()
    if label not in labels:
        raise JudgementParseError(
            f"the final verdict {_shorten(last.group(0))} is not one of {expected}", text
        )
    return ChoiceVerdict(choice=labels.index(label), critique=_critique(answer[: last.start()]))


def parse_listwise(text: str, candidates: int, low: float, high: float) -> ListwiseVerdict:
    """Scores of a listwise judgement: the entries of its last `Scores:` block.

    The block runs from its marker (case-insensitive) to the first blank line; it holds entries
    `LABEL=N` (or `LABEL: N`), separated by anything (commas, spaces, newlines). Labels are
    case-insensitive; N is a number as in `parse_pointwise` (a fraction must be of `high`).
    A candidate gets no score (None), with the reason in `problems`, when it has no entry, an
    out-of-range or malformed one, or entries with different numbers (the same number repeated
    is fine). Entries for labels that are not candidates are ignored (and named in `problems`).
    Error when the block is missing or no candidate has a usable score.
    """
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"invalid score range {low}-{high}")
    labels = [candidate_label(i) for i in range(_check_candidates(candidates))]
    thinking, answer = _split_thinking(text)
    markers = list(_SCORES.finditer(answer))
    if not markers:
        if _SCORES.search(thinking):
            raise JudgementParseError(
                "no final answer after </think>: the Scores: block is only in the thinking", text
            )
        raise JudgementParseError("no `Scores: A=.., B=..` block in the judgement", text)
    last = markers[-1]
    block = answer[last.end() :].lstrip()
    if (end := _BLOCK_END.search(block)) is not None:
        block = block[: end.start()]
    found: dict[int, set[float]] = {}
    problems: list[str] = []
    for entry in _ENTRY.finditer(block):
        label, number, denominator = entry.groups()
        label = label.upper()
        if label not in labels:
            problems.append(f"{label} is not a candidate ({labels[0]}-{labels[-1]})")
            continue
        index = labels.index(label)
        value = float(number)
        if denominator is not None and float(denominator) != high:
            problems.append(f"{label}: {_shorten(entry.group(0))} is not a fraction of {high:g}")
            value = math.nan
        elif not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{label}: {_shorten(number)} is outside {low:g}-{high:g}")
            value = math.nan
        found.setdefault(index, set()).add(value)
    scores: list[float | None] = []
    for index, label in enumerate(labels):
        values = found.get(index)
        if values is None:
            problems.append(f"{label}: no score")
            scores.append(None)
        elif len(values) > 1:
            if not any(math.isnan(v) for v in values):
                shown = ", ".join(f"{v:g}" for v in sorted(values))
                problems.append(f"{label}: conflicting scores {shown}")
            scores.append(None)
        else:
            (value,) = values
            scores.append(None if math.isnan(value) else value)
    if all(score is None for score in scores):
        raise JudgementParseError(
            f"the final Scores: block gives no usable score ({'; '.join(problems)})", text
        )
    return ListwiseVerdict(
        scores=tuple(scores), critique=_critique(answer[: last.start()]), problems=tuple(problems)
    )


def parse_boxed_list(text: str, candidates: int, low: float, high: float) -> ListwiseVerdict:
    """Scores of a listwise judgement in DeepSeek-GRM's format: its last `\\boxed{s1, s2, ...}`,
    one score per candidate in the order shown (`Scores: \\boxed{6, 3}`).

    The box is found as in `parse_pointwise` (last one, balanced braces, an unclosed final box
    is an error; an optional `\\text{...}` wrapper around the content is removed). Its content is
    split at commas; each entry is a number as in `parse_pointwise`. Entries carry no labels,
    so a box with more or fewer entries than candidates is an error: which score belongs to
    which candidate is unknown. A malformed or out-of-range entry gives its candidate no score
    (None, the reason in `problems`); error when no candidate has a usable score.
    """
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"invalid score range {low}-{high}")
    count = _check_candidates(candidates)
    content, before = _final_box(text, "\\boxed{s1, s2, ...}")
    inner = content.strip()
    if inner.startswith(_TEXT) and _closing_brace(inner, len(_TEXT) - 1) == len(inner) - 1:
        inner = inner[len(_TEXT) : -1]
    entries = inner.split(",")
    if len(entries) != count:
        raise JudgementParseError(
            f"the final \\boxed{{{_shorten(content)}}} has {len(entries)} "
            f"score{'s' if len(entries) != 1 else ''} for {count} candidates",
            text,
        )
    scores: list[float | None] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        label = candidate_label(index)
        match = _NUMBER.fullmatch(entry)
        if match is None:
            problems.append(f"{label}: {_shorten(entry.strip())!r} is not a number")
            scores.append(None)
            continue
        number, denominator = match.groups()
        value = float(number)
        if denominator is not None and float(denominator) != high:
            problems.append(f"{label}: {_shorten(entry.strip())} is not a fraction of {high:g}")
            scores.append(None)
        elif not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{label}: {_shorten(number)} is outside {low:g}-{high:g}")
            scores.append(None)
        else:
            scores.append(value)
    if all(score is None for score in scores):
        raise JudgementParseError(
            f"the final \\boxed{{}} gives no usable score ({'; '.join(problems)})", text
        )
    return ListwiseVerdict(
        scores=tuple(scores), critique=_critique(before), problems=tuple(problems)
    )


def candidate_label(index: int) -> str:
    """Label of the candidate at a 0-based index: 0 -> "A", 1 -> "B", ... 25 -> "Z"."""
    if not 0 <= index < 26:
        raise ValueError(f"candidate index {index} has no label (0-25)")
    return chr(ord("A") + index)


def pointwise_answer_regex(low: int, high: int, max_critique_chars: int) -> str:
    """Regex of a pointwise judgement: a critique, then `\\boxed{N}` with N in [low, high].

    The critique has at most `max_critique_chars` characters, no backslash (so no second box)
    and does not start with whitespace or `<t` (so it cannot open a `<think>` block). Nothing
    may follow the box. Only plain regex features are used, for structured generation.
    """
    if low > high:
        raise ValueError(f"invalid score range {low}-{high}")
    scores = "|".join(str(n) for n in range(low, high + 1))
    return _critique_regex(r"\\", max_critique_chars) + r"\\boxed\{(" + scores + r")\}"


def choice_answer_regex(candidates: int, max_critique_chars: int) -> str:
    """Regex of a pairwise judgement: a critique, then exactly one `[[X]]` marker.

    The critique has at most `max_critique_chars` characters, no `[` (so no other marker) and
    does not start with whitespace or `<t` (so it cannot open a `<think>` block). Nothing may
    follow the marker. Only plain regex features are used, for structured generation.
    """
    labels = "|".join(candidate_label(i) for i in range(_check_candidates(candidates)))
    return _critique_regex(r"\[", max_critique_chars) + r"\[\[(" + labels + r")\]\]"


def listwise_answer_regex(candidates: int, low: int, high: int, max_critique_chars: int) -> str:
    """Regex of a listwise judgement: a critique, then `Scores: A=N, B=N, ...` with an integer
    N in [low, high] for every candidate, in order.

    The critique has at most `max_critique_chars` characters of any kind (the parser reads only
    the last `Scores:` block, which is this final one) and does not start with whitespace or
    `<t`. Nothing may follow the block. Only plain regex features are used.
    """
    if low > high:
        raise ValueError(f"invalid score range {low}-{high}")
    scores = "(" + "|".join(str(n) for n in range(low, high + 1)) + ")"
    labels = [candidate_label(i) for i in range(_check_candidates(candidates))]
    block = ", ".join(f"{label}={scores}" for label in labels)
    return _critique_regex("", max_critique_chars) + "Scores: " + block


def boxed_list_answer_regex(candidates: int, low: int, high: int, max_critique_chars: int) -> str:
    """Regex of a listwise judgement in DeepSeek-GRM's format: a critique, then
    `\\boxed{N, N, ...}` with an integer N in [low, high] for every candidate, in order.

    The critique has at most `max_critique_chars` characters, no backslash (so no second box;
    it may end in `Scores: `) and does not start with whitespace or `<t`. Nothing may follow
    the box. Only plain regex features are used, for structured generation.
    """
    if low > high:
        raise ValueError(f"invalid score range {low}-{high}")
    score = "(" + "|".join(str(n) for n in range(low, high + 1)) + ")"
    scores = ", ".join(score for _ in range(_check_candidates(candidates)))
    return _critique_regex(r"\\", max_critique_chars) + r"\\boxed\{" + scores + r"\}"


def thinking_regex(answer_regex: str) -> str:
    """Regex of a reasoning judge's judgement: free thinking up to a `</think>` (opened by the
    judge or by its chat template), then whitespace, then a text `answer_regex` matches.

    Every fully matching text parses to the answer's verdict: the parser reads what follows the
    last `</think>`, which ends with the answer (a `</think>` written inside the critique only
    moves the split to a later point of the same answer).
    """
    return r"[\s\S]*</think>[ \t\r\n]*(?:" + answer_regex + ")"


def _check_candidates(candidates: int) -> int:
    if not 2 <= candidates <= 26:
        raise ValueError(f"a choice needs 2-26 candidates, not {candidates}")
    return candidates


def _critique_regex(forbidden: str, max_chars: int) -> str:
    """Up to `max_chars` characters outside class `forbidden` (any character when it is empty),
    not starting with space or `<t`.

    A text starting with `<think>` and never closing it is a truncated generation to the
    parser, so the critique may start with `<` (`<rubric>`) but not with `<t`.
    """
    if max_chars < 0:
        raise ValueError(f"max_critique_chars must be >= 0, not {max_chars}")
    if max_chars == 0:
        return ""
    rest = f"[^{forbidden}]" if forbidden else "[\\s\\S]"
    plain = f"[^{forbidden}< \\t\\r\\n]{rest}{{0,{max_chars - 1}}}"
    angle = f"<([^t{forbidden}]{rest}{{0,{max_chars - 2}}})?" if max_chars > 1 else "<"
    return f"({plain}|{angle})?"


def _split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer): the text up to the last `</think>` and the text after it."""
    thinking, end, answer = text.rpartition(_THINK_END)
    if not end and _UNCLOSED_THINK.match(text):
        raise JudgementParseError(
            "the judgement ends inside an unclosed <think> block (truncated generation?)", text
        )
    return thinking, answer


def _final_box(text: str, shown: str) -> tuple[str, str]:
    """(content, text before it) of the last closed `\\boxed{...}` after the thinking; raise
    saying what is missing (`shown`: the expected box, as the error names it)."""
    thinking, answer = _split_thinking(text)
    start, close = _last_box(answer)
    if start < 0:
        if _BOX in thinking:
            raise JudgementParseError(
                f"no final answer after </think>: the {shown} is only in the thinking", text
            )
        raise JudgementParseError(f"no {shown} in the judgement", text)
    if close is None:
        raise JudgementParseError("the final \\boxed{ is unclosed (truncated generation?)", text)
    return answer[start + len(_BOX) : close], answer[:start]


def _last_box(text: str) -> tuple[int, int | None]:
    """Start of the last top-level `\\boxed{` (-1 if none) and index of its `}` (None if open)."""
    start, close, pos = -1, None, 0
    while (found := text.find(_BOX, pos)) >= 0:
        start, close = found, _closing_brace(text, found + len(_BOX) - 1)
        if close is None:
            break
        pos = close + 1
    return start, close


def _closing_brace(text: str, opening: int) -> int | None:
    """Index of the `}` balancing the `{` at `opening`, or None if it is never closed."""
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _number(content: str, high: float, raw: str) -> str:
    """The score as written in a box's content, or raise saying what the content is."""
    inner = content.strip()
    if inner.startswith(_TEXT) and _closing_brace(inner, len(_TEXT) - 1) == len(inner) - 1:
        inner = inner[len(_TEXT) : -1]
    if not inner.strip():
        raise JudgementParseError(f"the final \\boxed{{{_shorten(content)}}} is empty", raw)
    match = _NUMBER.fullmatch(inner)
    if match is None:
        raise JudgementParseError(f"the final \\boxed{{{_shorten(content)}}} is not a number", raw)
    number, denominator = match.groups()
    if denominator is not None and float(denominator) != high:
        raise JudgementParseError(
            f"the final \\boxed{{{_shorten(content)}}} is a fraction of {denominator}, "
            f"not of the top score {high:g}",
            raw,
        )
    return number


def _critique(before: str) -> str:
    return _ANSWER_TAGS.sub("", before).strip()


def _shorten(found: str) -> str:
    return found if len(found) <= _SHOWN_CHARS else found[: _SHOWN_CHARS - 3] + "..."
