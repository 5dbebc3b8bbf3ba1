"""Format checks: regex (with a timeout), required tags, JSON validity and JSON Schema."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from rmserve.models.verifiers.format import FormatCheck, check_format, compile_regex, compile_schema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def _only(checks: list[FormatCheck]) -> FormatCheck:
    assert len(checks) == 1
    return checks[0]


@pytest.mark.parametrize(
    ("text", "pattern", "mode", "passed"),
    [
        ("Answer: 42", r"Answer: \d+", "search", True),
        ("So... Answer: 42", r"Answer: \d+", "search", True),
        ("So... Answer: 42", r"Answer: \d+", "fullmatch", False),
        ("Answer: 42", r"Answer: \d+", "fullmatch", True),
        ("Answer: forty-two", r"Answer: \d+", "search", False),
        ("line one\nline two", r"(?s)line one.*two", "fullmatch", True),
        ("", r"^$", "fullmatch", True),
        ("", r"x", "search", False),
    ],
)
def test_regex(text: str, pattern: str, mode: Literal["search", "fullmatch"], passed: bool) -> None:
    check = _only(check_format(text, regex=pattern, regex_mode=mode))
    assert check.name == "regex"
    assert check.passed is passed
    assert mode in check.detail


def test_catastrophic_regex_times_out_as_a_failed_check() -> None:
    check = _only(check_format("a" * 40 + "!", regex=r"(a|aa)+$", regex_mode="fullmatch"))
    assert not check.passed
    assert "timed out" in check.detail


@pytest.mark.parametrize(
    ("text", "passed", "detail"),
    [
        ("<think>hm</think><answer>3</answer>", True, "one <think> ... </think>"),
        ("<think></think>", True, "one <think>"),
        ("<think>hm", False, "missing </think>"),
        ("hm</think>", False, "missing <think>"),
        ("nothing", False, "missing <think>; missing </think>"),
        ("<think>a</think><think>b</think>", False, "<think> appears 2 times"),
        ("<think>a</think></think>", False, "</think> appears 2 times"),
        ("</think>a<think>", False, "</think> comes before <think>"),
        ("<THINK>a</THINK>", False, "missing <think>"),  # tags are case-sensitive
    ],
)
def test_required_tag(text: str, passed: bool, detail: str) -> None:
    check = _only(check_format(text, required_tags=["think"]))
    assert check == FormatCheck("tag:think", passed, check.detail)
    assert detail in check.detail


def test_each_required_tag_is_one_check() -> None:
    checks = check_format("<think>x</think>", required_tags=["think", "answer"])
    assert [(c.name, c.passed) for c in checks] == [("tag:think", True), ("tag:answer", False)]


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ('{"answer": 3}', True),
        ("  [1, 2, 3]\n", True),
        ('"just a string"', True),
        ("3", True),
        ("null", True),
        ('```json\n{"answer": 3}\n```', True),
        ('```JSON\n{"answer": 3}\n```\n', True),
        ('```\n{"answer": 3}\n```', True),
        ('\n```json\n{"a": [1,\n 2]}\n```', True),
        ('Here it is:\n```json\n{"answer": 3}\n```', False),  # the whole text must be JSON
        ('{"answer": 3} and more', False),
        ("{'answer': 3}", False),
        ('{"answer": 3,}', False),
        ("NaN", False),
        ('{"x": Infinity}', False),
        ("", False),
        ("```python\n{}\n```", False),
    ],
)
def test_json_valid(text: str, passed: bool) -> None:
    check = _only(check_format(text, json_valid=True))
    assert (check.name, check.passed) == ("json", passed)
    if passed:
        assert check.detail == "valid JSON"
    else:
        assert check.detail.startswith("not JSON")


@pytest.mark.parametrize(
    ("text", "passed", "detail"),
    [
        ('{"answer": 3}', True, "matches the schema"),
        ('```json\n{"answer": 3, "why": "sum"}\n```', True, "matches the schema"),
        ('{"answer": "3"}', False, "'3' is not of type 'integer'"),
        ('{"why": "x"}', False, "'answer' is a required property"),
        ('{"answer": 3, "extra": 1}', False, "Additional properties"),
        ("[3]", False, "is not of type 'object'"),
        ("not json", False, "not checked: not JSON"),
    ],
)
def test_json_schema(text: str, passed: bool, detail: str) -> None:
    check = _only(check_format(text, json_schema=SCHEMA))
    assert (check.name, check.passed) == ("json_schema", passed)
    assert detail in check.detail


def test_schema_error_detail_names_the_path() -> None:
    check = _only(check_format('{"answer": 3, "why": 1}', json_schema=SCHEMA))
    assert check.detail.startswith("at $.why:")


def test_json_valid_and_schema_are_two_checks() -> None:
    checks = check_format('{"answer": "x"}', json_valid=True, json_schema=SCHEMA)
    assert [(c.name, c.passed) for c in checks] == [("json", True), ("json_schema", False)]
    checks = check_format("{", json_valid=True, json_schema=SCHEMA)
    assert [(c.name, c.passed) for c in checks] == [("json", False), ("json_schema", False)]


def test_all_rules_together_in_order() -> None:
    text = '```json\n{"answer": 3}\n```'
    checks = check_format(
        text, regex=r"\d", required_tags=["a"], json_valid=True, json_schema=SCHEMA
    )
    assert [(c.name, c.passed) for c in checks] == [
        ("regex", True),
        ("tag:a", False),
        ("json", True),
        ("json_schema", True),
    ]


def test_no_rule_no_check() -> None:
    assert check_format("anything") == []


@pytest.mark.parametrize("pattern", ["(unclosed", "[a-", "*x", "x\\", "a{2,1}"])
def test_bad_regex_is_a_value_error(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        compile_regex(pattern)
    with pytest.raises(ValueError, match="invalid regex"):
        check_format("text", regex=pattern)


def test_compile_regex_returns_a_usable_pattern() -> None:
    assert compile_regex(r"\d+").search("ab12").group() == "12"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objekt"},
        {"type": "object", "required": "answer"},
        {"minLength": -1},
        {"properties": {"a": {"type": 3}}},
    ],
)
def test_bad_schema_is_a_value_error(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid JSON schema"):
        compile_schema(schema)
    with pytest.raises(ValueError, match="invalid JSON schema"):
        check_format("{}", json_schema=schema)


def test_schema_that_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        compile_schema({"enum": [{1, 2}]})


def test_unresolvable_ref_is_a_value_error() -> None:
    schema = {"$ref": "https://example.invalid/schema.json"}
    compile_schema(schema)  # a valid schema...
    with pytest.raises(ValueError, match="cannot be applied"):
        check_format("{}", json_schema=schema)  # ...that cannot be applied (nothing fetched)


def test_compile_schema_is_draft_2020_12() -> None:
    validator = compile_schema({"prefixItems": [{"type": "integer"}], "items": False})
    assert validator.is_valid([1])
    assert not validator.is_valid([1, 2])
    assert not validator.is_valid(["x"])
