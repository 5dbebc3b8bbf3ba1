"""Composite formulas: evaluated over named rewards, anything beyond arithmetic refused, and the
registry resolving the formula's variables to its models."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.models.formula import Formula
from rmserve.models.spec import RegistryError, load_registry


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("0.7*math + 0.3*rm - 0.1*length", {"math": 1, "rm": 2, "length": 3}, 1.0),
        ("clip(rm, 0, 1) * 2", {"rm": 5}, 2.0),
        ("max(a, b) - min(a, b) + abs(-c)", {"a": 1, "b": 4, "c": 2}, 5.0),
        ("-a ** 2 + (a + 1) / 2", {"a": 3}, -7.0),
    ],
)
def test_formulas_evaluate(text: str, values: dict[str, float], expected: float) -> None:
    assert Formula(text).evaluate(values) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("__import__('os').system('x')", "calls may only be"),
        ("rm.__class__", "Attribute is not allowed"),
        ("[rm for rm in x]", "not allowed"),
        ("rm if ok else 0", "IfExp is not allowed"),
        ("'a' * 3", "only numbers"),
        ("rm +", "not valid"),
        ("open('f')", "calls may only be"),
        ("max(rm, key=1)", "calls may only be"),
    ],
)
def test_anything_beyond_arithmetic_is_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        Formula(text)
    assert says in str(caught.value)


def test_division_by_zero_is_an_error_not_infinity() -> None:
    with pytest.raises(ValueError, match="division by zero"):
        Formula("a / b").evaluate({"a": 1, "b": 0})


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("min()", "min() takes at least 1 argument, not 0"),
        ("clip(rm)", "clip() takes 3 arguments, not 1"),
        ("abs(rm, rm)", "abs() takes 1 argument, not 2"),
        ("-" * 200 + "rm", "nested too deeply (over 100)"),
        ("-" * 100_000 + "rm", "nested too deeply"),  # the parser's stack overflows
        ("rm" + " + rm" * 100_000, "nested too deeply"),
    ],
)
def test_wrong_arity_and_deep_nesting_are_refused_when_parsed(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        Formula(text)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("text", "values", "says"),
    [
        ("9 ** 9 ** 9", {}, "math range error"),  # floats: at once, not minutes of big integers
        ("rm ** 0.5", {"rm": -4.0}, "math domain error"),  # complex
        ("0 ** -1", {}, "math domain error"),
        ("rm * 10 ** 300 * 10 ** 300", {"rm": 1.0}, "not finite"),
    ],
)
def test_results_that_are_not_finite_real_numbers_are_errors(
    text: str, values: dict[str, float], says: str
) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        Formula(text).evaluate(values)
    assert says in str(caught.value)


def test_min_and_max_take_one_or_more_arguments() -> None:
    assert Formula("min(rm)").evaluate({"rm": 0.5}) == 0.5
    assert Formula("max(a, b, 3)").evaluate({"a": 1, "b": 2}) == 3.0


def registry(tmp_path: Path, composite: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "models:\n"
        "  exact: {kind: similarity}\n"
        "  tiny-rm: {kind: discriminative, weights: ./rm}\n"
        f"  mix: {{kind: composite, options: {composite}}}\n"
    )
    return path


def test_the_registry_resolves_formula_variables_to_models(tmp_path: Path) -> None:
    loaded = load_registry(
        registry(tmp_path, "{formula: '0.5*exact + 0.5*rm', inputs: {rm: tiny-rm}}")
    )
    assert [peer.name for peer in loaded.peers("mix")] == ["exact", "tiny-rm"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ("{formula: 'exact + nothing'}", "'nothing' is not a model of this registry"),
        ("{formula: 'tiny-rm'}", "is not a model"),  # tiny - rm: names with '-' need inputs
        ("{formula: 'mix + exact'}", "'mix' is itself composite"),
        ("{formula: 'exact.x'}", "models.mix.options.formula"),
    ],
)
def test_bad_composites_are_refused_at_load(tmp_path: Path, options: str, says: str) -> None:
    with pytest.raises(RegistryError) as caught:
        load_registry(registry(tmp_path, options))
    assert says in str(caught.value)
