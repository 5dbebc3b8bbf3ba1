"""Instruction checks: table-driven pass / fail cases, boundaries and bad input."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rmserve.sandbox.checks import (
    CheckArguments,
    CheckResult,
    RegexMatchArguments,
    WordCountArguments,
    count_paragraphs,
    count_words,
    run_check,
)
from rmserve.wire.errors import ToolError


def check(**arguments: Any) -> CheckResult:
    return run_check(CheckArguments.model_validate(arguments))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", 0),
        ("one", 1),
        ("Hello, world!", 2),
        ("Don't stop: a well-known fact.", 5),
        ("It\u2019s fine", 2),
        ("  spaced\tout\nwords  ", 3),
        ("-- ... !!!", 0),
        ("3.14 is pi", 4),
        ("naïve café", 2),
    ],
)
def test_count_words(text: str, words: int) -> None:
    assert count_words(text) == words


@pytest.mark.parametrize(
    ("text", "paragraphs"),
    [
        ("", 0),
        ("one line", 1),
        ("line one\nline two", 1),
        ("p1\n\np2", 2),
        ("p1\n\n\n\np2\n \t\np3", 3),
        ("\n\np1\n\n", 1),
        ("p1\r\n\r\np2", 2),
        ("p1\n  \n\n   \np2", 2),
    ],
)
def test_count_paragraphs(text: str, paragraphs: int) -> None:
    assert count_paragraphs(text) == paragraphs


FIVE = "one two three four five"


@pytest.mark.parametrize(
    ("arguments", "passed", "detail"),
    [
        ({"min": 5, "max": 5}, True, "5 words; required 5 to 5"),
        ({"min": 4, "max": 6}, True, "5 words; required 4 to 6"),
        ({"min": 6}, False, "5 words; required at least 6"),
        ({"min": 5}, True, "5 words; required at least 5"),
        ({"max": 4}, False, "5 words; required at most 4"),
        ({"max": 5}, True, "5 words; required at most 5"),
        ({}, True, "5 words"),
    ],
)
def test_word_count(arguments: dict[str, int], passed: bool, detail: str) -> None:
    result = check(check="word_count", text=FIVE, **arguments)
    assert result == CheckResult(passed, detail, 5)


def test_word_count_singular() -> None:
    assert check(check="word_count", text="one", min=2).detail == "1 word; required at least 2"


@pytest.mark.parametrize(
    ("text", "bounds", "passed", "value"),
    [
        ("p1\n\np2\n\np3", {"min": 3, "max": 3}, True, 3),
        ("p1\n\np2\n\np3", {"max": 2}, False, 3),
        ("p1\np2", {"min": 2}, False, 1),
        ("\n\n\n", {"max": 0}, True, 0),
    ],
)
def test_paragraph_count(text: str, bounds: dict[str, int], passed: bool, value: int) -> None:
    result = check(check="paragraph_count", text=text, **bounds)
    assert (result.passed, result.value) == (passed, value)
    assert result.detail.startswith(f"{value} paragraph")


@pytest.mark.parametrize(
    ("arguments", "passed", "detail"),
    [
        ({"text": '{"a": 1}'}, True, "valid JSON"),
        ({"text": "[1, 2.5, null, true]"}, True, "valid JSON"),
        ({"text": '  "str"  '}, True, "valid JSON"),
        ({"text": "{'a': 1}"}, False, "invalid JSON: Expecting property name"),
        ({"text": '{"a": 1,}'}, False, "invalid JSON"),
        ({"text": ""}, False, "invalid JSON: Expecting value"),
        ({"text": "NaN"}, False, "invalid JSON: NaN is not valid JSON"),
        ({"text": "[Infinity]"}, False, "invalid JSON: Infinity"),
        ({"text": '{"a": 1} extra'}, False, "invalid JSON: Extra data"),
        ({"text": "[" * 100_000 + "]" * 100_000}, False, "invalid JSON"),
        ({"text": '```json\n{"a": 1}\n```'}, False, "invalid JSON"),
        ({"text": '```json\n{"a": 1}\n```', "allow_fence": True}, True, "valid JSON"),
        ({"text": "```\n[1]\n```", "allow_fence": True}, True, "valid JSON"),
        ({"text": "```json\nnot json\n```", "allow_fence": True}, False, "invalid JSON"),
    ],
)
def test_json_valid(arguments: dict[str, Any], passed: bool, detail: str) -> None:
    result = check(check="json_valid", **arguments)
    assert result.passed is passed
    assert result.detail.startswith(detail)
    assert result.value is None


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("text", "passed", "detail"),
    [
        ('{"name": "Ada", "age": 36}', True, "valid JSON matching the schema"),
        ('{"name": "Ada"}', True, "valid JSON matching the schema"),
        ('{"age": 36}', False, "JSON does not match the schema at $: 'name' is a required"),
        ('{"name": "Ada", "age": -1}', False, "at $.age: -1 is less than the minimum of 0"),
        ('{"name": "Ada", "age": "36"}', False, "at $.age: '36' is not of type 'integer'"),
        ('{"name": "Ada", "x": 1}', False, "Additional properties are not allowed"),
        ("[]", False, "[] is not of type 'object'"),
        ("{", False, "invalid JSON"),
    ],
)
def test_json_schema(text: str, passed: bool, detail: str) -> None:
    result = check(check="json_valid", text=text, schema=PERSON)
    assert result.passed is passed
    assert detail in result.detail


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nope"}, "schema is not a valid JSON Schema"),
        ({"type": "string", "pattern": "("}, "schema is not a valid JSON Schema"),
        ({"$ref": "https://example.com/schema.json"}, "schema cannot be applied"),
        ({"$ref": "#/$defs/missing"}, "schema cannot be applied"),
    ],
)
def test_bad_schema(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError) as caught:
        check(check="json_valid", text='"x"', schema=schema)
    assert caught.value.code == "invalid_arguments"
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("arguments", "passed", "value", "detail"),
    [
        ({"pattern": "world"}, False, 0, "no match"),
        ({"pattern": "world", "flags": ["i"]}, True, 1, "1 match; the first 'World' at position 6"),
        ({"pattern": r"\bo\w*"}, False, 0, "no match"),
        ({"pattern": r"o"}, True, 3, "3 matches; the first 'o' at position 4"),
        ({"pattern": r"^Second", "flags": ["m"]}, True, 1, "1 match"),
        ({"pattern": r"^Second"}, False, 0, "no match"),
        ({"pattern": r"World!.Second", "flags": ["s"]}, True, 1, "1 match"),
        ({"pattern": r"World!.Second"}, False, 0, "no match"),
        ({"pattern": r"Hello.*line", "mode": "fullmatch"}, False, 0, "no full match"),
        (
            {"pattern": r"hello.*line", "mode": "fullmatch", "flags": ["i", "s"]},
            True,
            1,
            "the whole text matches",
        ),
    ],
)
def test_regex_match(arguments: dict[str, Any], passed: bool, value: int, detail: str) -> None:
    result = check(check="regex_match", text="Hello World!\nSecond line", **arguments)
    assert (result.passed, result.value) == (passed, value)
    assert result.detail.startswith(detail)


def test_regex_long_match_is_shortened() -> None:
    result = check(check="regex_match", text="x" * 500, pattern="x+")
    assert "..." in result.detail and len(result.detail) < 150


@pytest.mark.parametrize("pattern", ["(", "[a-", "a{2,1}", "*a", "a\\"])
def test_regex_does_not_compile(pattern: str) -> None:
    with pytest.raises(ToolError) as caught:
        check(check="regex_match", text="abc", pattern=pattern)
    assert caught.value.code == "invalid_arguments"
    assert caught.value.message.startswith("pattern does not compile")


def test_regex_catastrophic_backtracking_times_out() -> None:
    with pytest.raises(ToolError) as caught:
        check(check="regex_match", text="a" * 60 + "b", pattern="(a|aa)+$")
    assert caught.value.code == "timeout"
    assert "pattern" in caught.value.message


@pytest.mark.parametrize(
    "arguments",
    [
        {"check": "word_count", "text": "x", "min": 3, "max": 1},
        {"check": "word_count", "text": "x", "min": -1},
        {"check": "word_count", "text": "x", "pattern": "x"},
        {"check": "word_count"},
        {"check": "unknown", "text": "x"},
        {"text": "x"},
        {"check": "regex_match", "text": "x", "pattern": ""},
        {"check": "regex_match", "text": "x", "pattern": "x" * 501},
        {"check": "regex_match", "text": "x" * 100_001, "pattern": "x"},
        {"check": "regex_match", "text": "x", "pattern": "x", "flags": ["x"]},
        {"check": "regex_match", "text": "x", "pattern": "x", "mode": "match"},
        {"check": "json_valid", "text": "1", "schema": "not a dict"},
    ],
)
def test_invalid_arguments(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CheckArguments.model_validate(arguments)


def test_members_can_be_run_directly() -> None:
    assert run_check(WordCountArguments(check="word_count", text="a b", max=2)).passed
    assert not run_check(RegexMatchArguments(check="regex_match", text="a", pattern="b")).passed


def test_schema_is_a_discriminated_union() -> None:
    schema = CheckArguments.model_json_schema()
    assert set(schema["discriminator"]["mapping"]) == {
        "word_count",
        "paragraph_count",
        "json_valid",
        "regex_match",
    }
    json_valid = schema["$defs"]["JsonValidArguments"]
    assert "schema" in json_valid["properties"]
    assert json_valid["additionalProperties"] is False
