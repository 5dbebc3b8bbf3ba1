"""Extraction of the checked part of a response: whole text, last box, last code block."""

from __future__ import annotations

import pytest

from rmserve.models.verifiers.extract import Extract, extract

TEXT = "Reasoning...\n\\boxed{1}\n```python\nprint(1)\n```\nso \\boxed{2}"


@pytest.mark.parametrize("how", ["final", "full"])
def test_final_and_full_return_the_text_as_given(how: Extract) -> None:
    assert extract(TEXT, how) == TEXT
    assert extract("", how) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} and more", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{\\}}", "\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox{x = 3}", "x = 3"),
        ("\\boxed {  5 }", "5"),  # space before the brace; content stripped
        ("\\boxed{}", ""),
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # the outer box is the last top-level one
        ("no box here", None),
        ("", None),
        ("\\boxed 3", None),  # no braces
        ("\\boxed{1} and a truncated \\boxed{2", None),  # the last box is never closed
        ("\\boxed{\\frac{1}{2}", None),
    ],
)
def test_boxed(text: str, expected: str | None) -> None:
    assert extract(text, "boxed") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```\nx = 1\n```", "x = 1"),
        ("Here:\n```python\nprint(1)\nprint(2)\n```\nDone.", "print(1)\nprint(2)"),
        ("```py title\nx\n```", "x"),  # the whole info string goes
        ("```a\nfirst\n```\ntext\n```b\nsecond\n```\n", "second"),
        ("```python\n```", ""),  # empty block
        ("```\n\n```", ""),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unclosed: the rest
        ("```a\nfirst\n```\n```b\nunclosed\nrest", "unclosed\nrest"),
        ("````md\n```inner```\n```\nstill\n````", "```inner```\n```\nstill"),  # longer fence
        ("  ```\n  indented\n    more\n  ```", "indented\n  more"),
        ("```python\nx = 1\n```   \n", "x = 1"),  # spaces after the closing fence
        ("no fence", None),
        ("inline ``` not a fence", None),
        ("", None),
    ],
)
def test_code_block(text: str, expected: str | None) -> None:
    assert extract(text, "code_block") == expected


def test_boxed_and_code_block_from_the_same_text() -> None:
    assert extract(TEXT, "boxed") == "2"
    assert extract(TEXT, "code_block") == "print(1)"


def test_unknown_extraction_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown extraction"):
        extract(TEXT, "last_line")  # type: ignore[arg-type]
