"""Deterministic instruction checks (IFEval-like), as judge tools and as rule-based rewards.

`CheckArguments` is a union discriminated by `check`:
- `word_count`: words are runs of letters, digits or `_`, possibly joined by an apostrophe
  (straight or curly) or `-`: "don't" and "well-known" are one word; punctuation is none.
- `paragraph_count`: paragraphs are separated by blank lines; empty ones are not counted.
- `json_valid`: the text parses as JSON (optionally inside a ```json fence) and, given a
  `schema`, validates against it with `jsonschema` (the draft named by `$schema`, else the
  latest). Remote `$ref`s are not fetched. Without jsonschema installed, a schema is refused.
- `regex_match`: `search` or `fullmatch` with the `regex` package (Python `re` syntax). Against
  catastrophic backtracking, patterns are limited to `MAX_PATTERN_CHARS`, texts to
  `MAX_REGEX_TEXT_CHARS`, and matching to `REGEX_TIMEOUT_S` (ToolError "timeout"). `regex`
  rather than `re`: `re` has no timeout and holds the GIL while matching, so a thread-based
  timeout around it cannot stop it nor let other threads run.

Residual risk: a `pattern` inside a JSON schema is matched by jsonschema with `re`, unbounded in
time; run checks with a timeout, in a worker process if schemas are untrusted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import regex  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from rmserve.wire.errors import ToolError

MAX_TEXT_CHARS: Final = 1_000_000
MAX_REGEX_TEXT_CHARS: Final = 100_000
MAX_PATTERN_CHARS: Final = 500
REGEX_TIMEOUT_S: Final = 1.0
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_LANGUAGE = re.compile(r"[\w-]*")  # of a code fence: ```json
_FLAGS: Final[dict[str, int]] = {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL}

_TEXT = "The text to check."


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Bounded(_Check):
    text: str = Field(max_length=MAX_TEXT_CHARS, description=_TEXT)
    min: int | None = Field(default=None, ge=0, description="The least count allowed, if any.")
    max: int | None = Field(default=None, ge=0, description="The most count allowed, if any.")

    @model_validator(mode="after")
    def _ordered(self) -> _Bounded:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class WordCountArguments(_Bounded):
    """Count the words of `text` and compare with `min`/`max` (inclusive)."""

    check: Literal["word_count"]


class ParagraphCountArguments(_Bounded):
    """Count the paragraphs of `text` (separated by blank lines) and compare with `min`/`max`."""

    check: Literal["paragraph_count"]


class JsonValidArguments(_Check):
    """Check that `text` is valid JSON, optionally matching a JSON Schema."""

    check: Literal["json_valid"]
    text: str = Field(max_length=MAX_TEXT_CHARS, description=_TEXT)
    json_schema: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description="A JSON Schema the parsed value must match, if any.",
    )
    allow_fence: bool = Field(
        default=False,
        description="Accept the JSON wrapped in one Markdown code fence (```json ... ```).",
    )


class RegexMatchArguments(_Check):
    """Check that a regular expression (Python `re` syntax) matches `text`."""

    check: Literal["regex_match"]
    text: str = Field(max_length=MAX_REGEX_TEXT_CHARS, description=_TEXT)
    pattern: str = Field(
        min_length=1, max_length=MAX_PATTERN_CHARS, description="A Python regular expression."
    )
    flags: list[Literal["i", "m", "s"]] = Field(
        default_factory=list,
        description="i: ignore case, m: ^ and $ match at every line, s: . matches newlines.",
    )
    mode: Literal["search", "fullmatch"] = Field(
        default="search",
        description="search: the pattern occurs somewhere; fullmatch: it matches the whole text.",
    )


AnyCheck = Annotated[
    WordCountArguments | ParagraphCountArguments | JsonValidArguments | RegexMatchArguments,
    Field(discriminator="check"),
]


class CheckArguments(RootModel[AnyCheck]):
    """Arguments of the check tool: one of the checks, chosen by the field `check`."""


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    detail: str  # e.g. "132 words; required 100 to 150"
    value: float | int | None  # the measured quantity, if any


def run_check(arguments: CheckArguments | AnyCheck) -> CheckResult:
    """Run the check `arguments` describe; ToolError for a bad pattern or schema."""
    check = arguments.root if isinstance(arguments, CheckArguments) else arguments
    if isinstance(check, WordCountArguments):
        return _bounded(count_words(check.text), "word", check)
    if isinstance(check, ParagraphCountArguments):
        return _bounded(count_paragraphs(check.text), "paragraph", check)
    if isinstance(check, JsonValidArguments):
        return _json_valid(check)
    return _regex_match(check)


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def count_paragraphs(text: str) -> int:
    return sum(1 for part in _BLANK_LINE.split(text.replace("\r\n", "\n")) if part.strip())


def _bounded(count: int, unit: str, check: _Bounded) -> CheckResult:
    low, high = check.min, check.max
    passed = (low is None or count >= low) and (high is None or count <= high)
    measured = f"{count} {unit}{'' if count == 1 else 's'}"
    if low is not None and high is not None:
        required = f"required {low} to {high}"
    elif low is not None:
        required = f"required at least {low}"
    elif high is not None:
        required = f"required at most {high}"
    else:
        return CheckResult(True, measured, count)
    return CheckResult(passed, f"{measured}; {required}", count)


def _json_valid(check: JsonValidArguments) -> CheckResult:
    text = _unfence(check.text) if check.allow_fence else check.text
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, an int of over 4300 digits, NaN
        return CheckResult(False, f"invalid JSON: {exc}", None)
    except RecursionError:
        return CheckResult(False, "invalid JSON: nested too deeply", None)
    if check.json_schema is None:
        return CheckResult(True, "valid JSON", None)
    return _match_schema(value, check.json_schema)


def _unfence(text: str) -> str:
    """The body of a single Markdown code fence (```json ... ```) around `text`, if any."""
    stripped = text.strip()
    if not (stripped.startswith("```") and stripped.endswith("```")) or len(stripped) < 6:
        return text
    language, newline, body = stripped[3:-3].partition("\n")
    return body if newline and _LANGUAGE.fullmatch(language.strip()) else text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _match_schema(value: Any, schema: dict[str, Any]) -> CheckResult:
    try:
        from jsonschema import exceptions, validators  # type: ignore[import-untyped]
        from referencing.exceptions import Unresolvable
    except ImportError:
        raise ToolError(
            "unavailable", "schema validation needs the jsonschema package, not installed here"
        ) from None
    try:
        validator_class = validators.validator_for(schema)
        validator_class.check_schema(schema)
        error = exceptions.best_match(validator_class(schema).iter_errors(value))
    except exceptions.SchemaError as exc:
        raise ToolError(
            "invalid_arguments", f"schema is not a valid JSON Schema: {exc.message}"
        ) from None
    except (Unresolvable, RecursionError, LookupError, TypeError, ValueError) as exc:
        raise ToolError("invalid_arguments", f"schema cannot be applied: {exc}") from None
    if error is None:
        return CheckResult(True, "valid JSON matching the schema", None)
    detail = f"JSON does not match the schema at {error.json_path}: {error.message}"
    return CheckResult(False, detail, None)


def _regex_match(check: RegexMatchArguments) -> CheckResult:
    flags = 0
    for flag in check.flags:
        flags |= _FLAGS[flag]
    try:
        compiled = regex.compile(check.pattern, flags)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ToolError("invalid_arguments", f"pattern does not compile: {exc}") from None
    try:
        if check.mode == "fullmatch":
            return _fullmatch(compiled, check.text)
        return _search(compiled, check.text)
    except TimeoutError:
        raise ToolError(
            "timeout",
            f"pattern took over {REGEX_TIMEOUT_S:g} s on this text (catastrophic backtracking?); "
            "simplify it",
        ) from None


def _fullmatch(compiled: Any, text: str) -> CheckResult:
    matched = compiled.fullmatch(text, concurrent=True, timeout=REGEX_TIMEOUT_S) is not None
    return CheckResult(
        matched, "the whole text matches" if matched else "no full match", int(matched)
    )


def _search(compiled: Any, text: str) -> CheckResult:
    matches = compiled.finditer(text, concurrent=True, timeout=REGEX_TIMEOUT_S)
    first = next(matches, None)
    if first is None:
        return CheckResult(False, "no match", 0)
    count = 1 + sum(1 for _ in matches)
    plural = "es" if count > 1 else ""
    return CheckResult(True, f"{count} match{plural}; the first {_excerpt(first)}", count)


def _excerpt(match: Any) -> str:
    text: str = match.group()
    shown = text if len(text) <= 80 else text[:77] + "..."
    return f"{shown!r} at position {match.start()}"
