"""The calculator: exact results, `^` as power, and refusals with a useful ToolError."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rmserve.sandbox.calculator import CalculatorArguments, calculate, format_result
from rmserve.wire.errors import ToolError


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # precedence and unary minus
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("-3 + 5", "2"),
        ("-(2 + 3) * -2", "10"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("10 % 3", "1"),
        ("  2 + 2  ", "4"),
        # power: ** and ^ alike (right-associative, binds tighter than unary minus)
        ("2**10", "1024"),
        ("2^10", "1024"),
        ("2^3^2", "512"),
        ("-2^2", "-4"),
        ("2 * 3^2", "18"),
        ("2^3 + 1", "9"),
        ("2^-1", "0.5"),
        ("4^0.5", "2"),
        # exact integers
        ("2**64", "18446744073709551616"),
        ("10**20 + 1", "100000000000000000001"),
        ("factorial(20)", "2432902008176640000"),
        ("factorial(5.0)", "120"),
        ("comb(52, 5)", "2598960"),
        ("perm(5, 2)", "20"),
        ("gcd(12, 18)", "6"),
        ("lcm(4, 6)", "12"),
        # functions
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.4142135623731"),
        ("log(e)", "1"),
        ("log(8, 2)", "3"),
        ("log10(1000)", "3"),
        ("log2(1024)", "10"),
        ("exp(0)", "1"),
        ("sin(pi / 2)", "1"),
        ("cos(0)", "1"),
        ("atan(1) * 4", "3.14159265358979"),
        ("abs(-3)", "3"),
        ("round(2.567, 2)", "2.57"),
        ("round(7.5)", "8"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("min(3, 1, 2)", "1"),
        ("max(3, 1, 2)", "3"),
        # constants and float formatting
        ("pi", "3.14159265358979"),
        ("tau / 2 - pi", "0"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.333333333333333"),
        ("1e20 * 10", "1e+21"),
        ("1 / 8000000", "1.25e-07"),
        ("-0.0", "0"),
    ],
)
def test_results(expression: str, expected: str) -> None:
    assert format_result(calculate(expression)) == expected


def test_integers_stay_ints_and_floats_floats() -> None:
    assert calculate("2**64") == 18446744073709551616
    assert isinstance(calculate("2**64"), int)
    assert isinstance(calculate("6 / 3"), float)
    assert len(format_result(calculate("factorial(1000)"))) == 2568


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__", "attribute access"),
        ("(1).real", "attribute access"),
        ("[x for x in (1, 2)]", "comprehensions"),
        ("'a' * 10**9", "strings"),
        ("lambda: 1", "lambda"),
        ("x + 1", "unknown name 'x'"),
        ("sqrt", "call functions with parentheses"),
        ("1 < 2", "comparisons"),
        ("1 if 1 else 0", "conditional"),
        ("1 & 3", "`&` operator"),
        ("1j", "complex numbers"),
        ("True", "True"),
        ("9**9**9", "would exceed 4000 digits"),
        ("3999999 ^ 3999999", "would exceed 4000 digits"),
        ("factorial(1000) * factorial(1000)", "exceeds 4000 digits"),
        ("factorial(100000)", "factorial() needs whole numbers from 0 to 1000"),
        ("factorial(-1)", "factorial() needs whole numbers"),
        ("factorial(2.5)", "factorial() needs whole numbers"),
        ("comb(10**9, 5)", "comb() needs whole numbers"),
        ("round(1, -10**9)", "round() needs whole numbers"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("log(0)", "math domain error"),
        ("(-8) ** (1/3)", "complex number"),
        ("exp(1000)", "overflow"),
        ("1e308 * 10", "not a finite number"),
        ("max()", "cannot evaluate expression"),
        ("", "expression is empty"),
        ("   ", "expression is empty"),
        ("(1 + 2", "syntax error in expression at position 1"),
        ("1 + 2)", "syntax error in expression at position 6"),
        ("1 +* 2", "syntax error in expression at position 4"),
        ("2 ^^ 3", "syntax error in expression at position 4"),
        ("1; 2", "syntax error"),
        ("x = 1", "syntax error"),
        ("import os", "syntax error"),
        ("1" * 501, "longer than 500 characters"),
    ],
)
def test_refusals(expression: str, message: str) -> None:
    with pytest.raises(ToolError) as caught:
        calculate(expression)
    assert caught.value.code == "invalid_arguments"
    assert message in caught.value.message


@pytest.mark.parametrize("expression", ["-" * 499 + "1", "(" * 200 + "1" + ")" * 200])
def test_deep_nesting_is_evaluated_or_refused(expression: str) -> None:
    try:
        assert calculate(expression) in (1, -1)
    except ToolError as exc:
        assert exc.code == "invalid_arguments"


def test_arguments_model() -> None:
    assert CalculatorArguments(expression="1+1").expression == "1+1"
    for bad in ({"expression": ""}, {"expression": "1" * 501}, {"expression": "1", "x": 1}):
        with pytest.raises(ValidationError):
            CalculatorArguments.model_validate(bad)
    schema = CalculatorArguments.model_json_schema()
    assert "^" in schema["properties"]["expression"]["description"]
