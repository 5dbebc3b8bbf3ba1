"""Format checks of a response: a regex, required `<tag>...</tag>` pairs, JSON and JSON Schema.

Regexes use the `regex` package (Python `re` syntax) with a matching timeout against
catastrophic backtracking. Schemas are JSON Schema Draft 2020-12; a schema's own `pattern`
keywords are matched by jsonschema with `re`, without a timeout, so schemas should be trusted
(they come from the registry, not from requests).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import regex  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator, exceptions  # type: ignore[import-untyped]
from referencing.exceptions import Unresolvable

REGEX_TIMEOUT_S = 1.0
# The whole text is one fence: ```json (or a bare ```) ... ```.
_JSON_FENCE = re.compile(r"\s*```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\s*", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class FormatCheck:
    name: str
    passed: bool
    detail: str


def compile_regex(pattern: str) -> Any:
    """The compiled pattern (cached by `regex`); ValueError if it does not compile."""
    try:
        return regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None


def compile_schema(schema: dict[str, Any]) -> Any:
    """A Draft 2020-12 validator for `schema`; ValueError if it is not a valid schema."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"JSON schema is not JSON: {exc}") from None
    return _validator(key)


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise ValueError(f"invalid JSON schema at {exc.json_path}: {exc.message}") from None
    return Draft202012Validator(schema)


def check_format(
    text: str,
    *,
    regex: str | None = None,
    regex_mode: Literal["search", "fullmatch"] = "search",
    required_tags: Sequence[str] = (),
    json_valid: bool = False,
    json_schema: dict[str, Any] | None = None,
) -> list[FormatCheck]:
    """One check per configured rule, in the order regex, tags, json, json_schema.

    ValueError if `regex` or `json_schema` is itself invalid.
    """
    checks = []
    if regex is not None:
        checks.append(_check_regex(text, compile_regex(regex), regex_mode))
    checks.extend(_check_tag(text, tag) for tag in required_tags)
    if json_valid or json_schema is not None:
        validator = None if json_schema is None else compile_schema(json_schema)
        checks.extend(_check_json(text, json_valid, validator))
    return checks


def _check_regex(text: str, pattern: Any, mode: Literal["search", "fullmatch"]) -> FormatCheck:
    match = pattern.fullmatch if mode == "fullmatch" else pattern.search
    try:
        found = match(text, concurrent=True, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        detail = f"regex timed out after {REGEX_TIMEOUT_S:g} s (catastrophic backtracking?)"
        return FormatCheck("regex", False, detail)
    if found is None:
        return FormatCheck("regex", False, f"no {mode} match for {pattern.pattern!r}")
    return FormatCheck("regex", True, f"{mode} match for {pattern.pattern!r}")


def _check_tag(text: str, tag: str) -> FormatCheck:
    """Passes when `<tag>` and `</tag>` each appear exactly once, the opening one first."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    problems = [
        f"{marker} appears {count} times" if count else f"missing {marker}"
        for marker in (opening, closing)
        if (count := text.count(marker)) != 1
    ]
    if not problems and text.index(closing) < text.index(opening):
        problems.append(f"{closing} comes before {opening}")
    detail = "; ".join(problems) or f"one {opening} ... {closing}"
    return FormatCheck(f"tag:{tag}", not problems, detail)


def _check_json(text: str, json_valid: bool, validator: Any) -> list[FormatCheck]:
    try:
        document = parse_json(text)
    except ValueError as exc:
        failed = [FormatCheck("json", False, str(exc))] if json_valid else []
        if validator is not None:
            failed.append(FormatCheck("json_schema", False, f"not checked: {exc}"))
        return failed
    checks = [FormatCheck("json", True, "valid JSON")] if json_valid else []
    if validator is not None:
        checks.append(_check_schema(document, validator))
    return checks


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or of the one ```json fence it consists of; ValueError if none.

    NaN and Infinity, which Python's json accepts, are refused: they are not JSON.
    """
    fenced = _JSON_FENCE.fullmatch(text)
    body = fenced[1] if fenced else text
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name} is not a JSON value")


def _check_schema(document: Any, validator: Any) -> FormatCheck:
    """ValueError if the schema cannot be applied (say, a `$ref` that does not resolve)."""
    try:
        error = exceptions.best_match(validator.iter_errors(document))
    except (Unresolvable, RecursionError) as exc:
        raise ValueError(f"JSON schema cannot be applied: {exc}") from None
    if error is None:
        return FormatCheck("json_schema", True, "matches the schema")
    return FormatCheck("json_schema", False, f"at {error.json_path}: {error.message}")
