"""The OpenAI chat schema of items and its conversion to chat-template messages."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from rmserve.models.rendering import template_messages
from rmserve.wire.trajectory import Trajectory, decode_data_url


def test_tool_calls_become_template_mappings() -> None:
    item = Trajectory.model_validate(
        {
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
                },
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x": 1}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "g", "arguments": "{broken"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "1", "extra_field": "ignored"},
            ]
        }
    )
    system, _, assistant, tool = template_messages(item.messages)
    assert system == {"role": "system", "content": "be brief"}
    assert assistant["content"] == ""
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [{"x": 1}, "{broken"]
    assert tool == {"role": "tool", "content": "1", "tool_call_id": "c1"}


def test_data_urls() -> None:
    payload = b"\x89PNG..."
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url) == ("image/png", payload)
    for bad, says in [
        ("data:image/png,rawdata", "base64-encoded"),
        ("data:;base64,AAAA", "malformed"),
        ("data:image/png;base64,", "empty"),
        ("file:///etc/passwd", "only data: URLs"),
    ]:
        with pytest.raises(ValueError, match=says):
            decode_data_url(bad)


def test_item_rejects_unknown_fields_and_empty_messages() -> None:
    with pytest.raises(ValidationError, match="messages"):
        Trajectory.model_validate({"messages": []})
    with pytest.raises(ValidationError, match="mesages"):
        Trajectory.model_validate({"mesages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize(
    ("test", "problem"),
    [
        ({"call": "fib(10", "expected": 55}, "`call` is not a Python expression"),
        ({"call": "fib(10)"}, "exactly one of `expected`, `expected_literal`"),
        ({"call": "fib(10)", "expected": 55, "expected_literal": "55"}, "exactly one of"),
        (
            {"call": "f()", "expected_literal": "set(["},
            "`expected_literal` is not a Python literal",
        ),
        ({"call": "f()", "expected_literal": "print(1)"}, "not a Python literal"),
        ({"call": "f()", "expected": 1, "code": "assert f()"}, "a `call` test takes no code"),
        ({"code": "assert f()", "expected": 1}, "belong to a `call` test"),
        ({"call": "f()", "expected": [[[[1]]]] * 1 + [eval("[" * 120 + "]" * 120)]}, "deeper"),
        ({"call": "f()", "expected": "x" * 1_000_001}, "larger than"),
        ({"name": "nothing"}, "a test needs `call`"),
    ],
)
def test_code_test_formats_are_checked_at_the_door(test: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem) as refused:
        Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}], "tests": [test]})
    assert refused.value.errors()[0]["loc"][:2] == ("tests", 0)


def test_code_tests_survive_a_queue_round_trip() -> None:
    """Jobs travel as full JSON dumps: a null `expected` is kept, unset ones stay unset."""
    tests = [
        {"call": "f()", "expected": None},
        {"call": "f()", "expected_literal": "(1, 2)"},
        {"call": "g(1)", "expected": [1, "a"], "abs_tol": 1e-6},
        {"code": "assert f() is None"},
        {"stdin": "1", "expected_stdout": "2"},
    ]
    item = Trajectory.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tests": tests}
    )
    assert Trajectory.model_validate_json(item.model_dump_json()) == item
