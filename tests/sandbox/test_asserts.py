"""sandbox.asserts: assert-only test code rewritten into checks the host decides.

Each rewritable shape maps to one check; every other shape stays in-process (None). The checks
see only the plain value the sandbox returns and the test's literals: a candidate's
``AlwaysEqual`` object, or its own ``isinstance``/``math``/``abs``, cannot make one pass.
"""

from __future__ import annotations

import ast
import json
import math
import time
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmserve.sandbox.asserts import (
    CallCheck,
    Check,
    Compare,
    CompareOp,
    Equals,
    IsClose,
    IsInstance,
    NotEquals,
    Truthy,
    rewrite_asserts,
)
from rmserve.sandbox.values import decode, sandbox_encode


def only(code: str) -> tuple[str, Check]:
    checks = rewrite_asserts(code)
    assert checks is not None and len(checks) == 1
    return checks[0].expression, checks[0].check


@pytest.mark.parametrize(
    ("code", "expression", "check"),
    [
        ("assert fib(10) == 55", "fib(10)", Equals(55)),
        ("assert 55 == fib(10)", "fib(10)", Equals(55)),
        ("assert f(1) != (1, 2)", "f(1)", NotEquals((1, 2))),
        ("assert f() == -1", "f()", Equals(-1)),
        ("assert f() == {1: (2, {3})}", "f()", Equals({1: (2, {3})})),
        ("assert f() == set()", "f()", Equals(set())),
        ("assert f() == 1 + 2j", "f()", Equals(1 + 2j)),
        ("assert f('a', [1, 2]) == b'x'", "f('a', [1, 2])", Equals(b"x")),
        ("assert f(2 * 3) == 6", "f(2 * 3)", Equals(6)),
        ("assert obj.method(x=1)[0] == 'a'", "obj.method(x=1)[0]", Equals("a")),
        ("assert len(f()) == 3", "len(f())", Equals(3)),
        ("assert f(\n    1,\n) == 2  # comment", "f(1)", Equals(2)),
        ('assert f(1) == 2, "f(1) should be 2"', "f(1)", Equals(2)),
        ("assert is_prime(7)", "is_prime(7)", Truthy()),
        ("assert not is_prime(8)", "is_prime(8)", Truthy(negate=True)),
        ("assert not (f() == 3)", "f()", NotEquals(3)),
        ("assert not (f() != 3)", "f()", Equals(3)),
        ("assert f() < 3", "f()", Compare("<", 3)),
        ("assert 0 <= f()", "f()", Compare("<=", 0, literal_left=True)),
        ("assert f() > -1.5", "f()", Compare(">", -1.5)),
        ("assert f() >= 'b'", "f()", Compare(">=", "b")),
        ("assert f() in (1, 2)", "f()", Compare("in", (1, 2))),
        ("assert 3 in f()", "f()", Compare("in", 3, literal_left=True)),
        ("assert 'x' not in f()", "f()", Compare("not in", "x", literal_left=True)),
        ("assert not (3 in f())", "f()", Compare("not in", 3, literal_left=True)),
        ("assert f() is None", "f()", Compare("is", None)),
        ("assert f() is not None", "f()", Compare("is not", None)),
        ("assert f() is True", "f()", Compare("is", True)),
        ("assert f() is False", "f()", Compare("is", False)),
        ("assert isinstance(f(), int)", "f()", IsInstance(("int",))),
        ("assert isinstance(f(), (list, tuple))", "f()", IsInstance(("list", "tuple"))),
        ("import math\nassert math.isclose(f(), 0.1)", "f()", IsClose(0.1)),
        (
            "import math\nassert math.isclose(0.1, f(), rel_tol=1e-6, abs_tol=0)",
            "f()",
            IsClose(0.1, rel_tol=1e-6, abs_tol=0),
        ),
        ("assert math.isclose(f(), 2, abs_tol=0.5)", "f()", IsClose(2, abs_tol=0.5)),
        (
            "from math import isclose\nassert isclose(f(), 1.5, rel_tol=0.01)",
            "f()",
            IsClose(1.5, rel_tol=0.01),
        ),
        ("assert abs(f() - 2.5) < 1e-6", "f()", IsClose(2.5, 0.0, 1e-6, "<")),
        ("assert abs(2.5 - f()) <= 1e-6", "f()", IsClose(2.5, 0.0, 1e-6, "<=")),
        ("assert 1e-6 > abs(f() - 1)", "f()", IsClose(1, 0.0, 1e-6, "<")),
        ("assert 0.01 >= abs(-3 - f(2))", "f(2)", IsClose(-3, 0.0, 0.01, "<=")),
    ],
)
def test_rewritable_shapes(code: str, expression: str, check: Check) -> None:
    assert only(code) == (expression, check)


def test_several_asserts_and_conjunctions() -> None:
    code = "import math\nassert f(1) == 1\nassert g() and h(2) < 3, 'both'\n"
    assert rewrite_asserts(code) == [
        CallCheck("f(1)", Equals(1), "assert f(1) == 1"),
        CallCheck("g()", Truthy(), "assert g() and h(2) < 3, 'both'"),
        CallCheck("h(2)", Compare("<", 3), "assert g() and h(2) < 3, 'both'"),
    ]


@pytest.mark.parametrize(
    "code",
    [
        "",
        "import math",
        "assert True",
        "assert 1 == 1",
        "assert f(1) == g(1)",  # both sides run in the sandbox
        "assert f() == x",
        "assert a < b < c",
        "assert 0 < f() < 3",
        "assert f() or g()",
        "assert not (f() and g())",
        "assert not (f() < 3)",  # not the same as f() >= 3 for nan
        "for i in range(3):\n    assert f(i) == i",
        "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)",
        "x = f(1)\nassert x == 2",
        "if True:\n    assert f() == 1",
        "f(1)",
        "assert f() == 1\nprint('done')",
        "import os\nassert f() == 1",
        "import math as m\nassert m.isclose(f(), 1)",
        "from math import isclose as close\nassert close(f(), 1)",
        "from math import pi\nassert f() == 1",
        "import math\nassert f(math.pi) == 3",  # the dropped import is used in the sandbox
        "assert isclose(f(), 1.0)",  # not imported from math: maybe numpy's
        pytest.param("assert f() is 5", marks=pytest.mark.filterwarnings("ignore::SyntaxWarning")),
        "assert f() == ...",
        'assert f() == 1, f"got {f()}"',
        "assert isinstance(f(), MyClass)",
        "assert isinstance(f(), (int, MyClass))",
        "assert isinstance(f(), type(None))",
        "assert isinstance(f(), int, str)",
        "assert math.isclose(f(), g())",
        "assert math.isclose(f(), 1.0, rel_tol=-1)",
        "assert math.isclose(f(), 1.0, tol=0.1)",
        "assert math.isclose(f(), 1j)",
        "assert math.isclose(f(), True)",
        "assert abs(f() - g()) < 1e-6",
        "assert abs(f() - 1j) < 1e-6",
        "assert abs(f() - 1) > 1e-6",
        # the sandbox's part must not let a candidate object meet a test value:
        "assert (f() == 3) is True",
        "assert all(f(i) == i for i in range(3))",
        "assert f() - 5 == 0",
        "assert -f() == -3",
        "assert (f() or 0) == 3",
        "assert (1 if f() else 0) == 1",
        "assert f().__eq__(3)",
        "assert getattr(f(), '__eq__')(3)",
        "assert operator.eq(f(), 3)",
        "assert not isinstance(f(), int)",
        "assert not math.isclose(f(), 1.0)",
        "assert numpy.allclose(f(), [1.0])",
        "assert [1, 2] == sorted(f(), key=lambda x: -x)",
    ],
)
def test_other_shapes_stay_in_process(code: str) -> None:
    assert rewrite_asserts(code) is None


@pytest.mark.parametrize(
    "code",
    [
        "assert f() == " + "[" * 150 + "]" * 150,  # a literal too large for the host
        "assert f() == [" + "0, " * 40_000 + "]",
        "assert f" + ".b" * 700 + " == 1",  # compiles, but too deep for ast.unparse
        "assert f(" + "-" * 700 + "1) == 1",
        "assert f" + "[0]" * 700,
    ],
)
def test_code_too_large_to_rewrite_stays_in_process(code: str) -> None:
    assert rewrite_asserts(code) is None


@pytest.mark.parametrize(
    ("code", "line"),
    [
        ("assert f(", 1),
        ("assert f() == 1\nassert g(]", 2),
        ("assert (yield)", 1),
        ("return 5", 1),
        ("assert f() == 1\n  assert g()", 2),
    ],
)
def test_syntax_errors_raise_value_error_with_the_line(code: str, line: int) -> None:
    with pytest.raises(ValueError, match=f"line {line}"):
        rewrite_asserts(code)


@pytest.mark.parametrize(
    "code",
    [
        "assert f() == 1\x00",
        "assert f" + ".b" * 100_000 + " == 1",
        "assert " + "-" * 100_000 + "f() == 1",
        "assert " + "not " * 100_000 + "f()",
        "assert f" + "()" * 100_000 + " == 1",
        "assert f(" + "(" * 300 + ")" * 300 + ") == 1",
    ],
)
def test_uncompilable_code_raises_value_error(code: str) -> None:
    with pytest.raises(ValueError, match="test code"):
        rewrite_asserts(code)


@pytest.mark.parametrize(
    "code",
    [
        "assert f('é') == 'ü'; assert g() == 1\r\nassert h(\r\n  1) == 2\rassert k()\n",
        "\fassert f() == 1\nassert (\n    g()\n)  # done",
        "assert f('\u2028') == '\x85'\nassert g('\x0c\x1c') == 1\n",
        'assert f() == """a\nb"""\n\n\nassert g() == 1',
    ],
)
def test_sources_are_the_asserts_own_text(code: str) -> None:
    checks = rewrite_asserts(code)
    assert checks is not None
    expected = [ast.get_source_segment(code, node) for node in ast.parse(code).body]
    assert [check.source for check in checks] == expected


def test_many_asserts_take_linear_time() -> None:
    started = time.monotonic()
    checks = rewrite_asserts("assert f(1) == 1\n" * 5_000)
    assert checks is not None and len(checks) == 5_000
    assert time.monotonic() - started < 10  # get_source_segment per assert would be quadratic


LITERALS = ["1", "-1.5", "(1, 2)", "'a'", "None", "True", "[1]", "{1: 2}", "1e-6"]
CALLS = ["math.isclose(f(), 1.0)", "abs(f() - 1)", "isinstance(f(), int)", "not f()"]
ATOMS = st.sampled_from([*LITERALS, *CALLS, "f()", "g(1)", "x", "x.y"])
BINARY = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in", "is", "is not"])
EXPRESSIONS = st.recursive(
    ATOMS,
    lambda inner: st.builds(
        lambda a, op, b: f"({a} {op} {b})",
        inner,
        BINARY | st.sampled_from(["and", "or", "-"]),
        inner,
    ),
    max_leaves=4,
)
CODES = st.lists(EXPRESSIONS.map(lambda e: f"assert {e}"), min_size=1, max_size=3).map("\n".join)


@pytest.mark.filterwarnings("ignore::SyntaxWarning", "ignore::DeprecationWarning")
@settings(max_examples=500, deadline=None)
@given(st.one_of(CODES, st.text(max_size=40), CODES.map(lambda code: code[:-3])))
def test_rewriting_only_ever_raises_value_error(code: str) -> None:
    try:
        checks = rewrite_asserts(code)
    except ValueError:
        return
    for check in checks or []:
        tree = ast.parse(check.expression, mode="eval")
        assert not any(isinstance(node, ast.Compare | ast.BoolOp) for node in ast.walk(tree))


def test_nothing_is_executed() -> None:
    code = "assert __import__('os')._exit(3) == 1\nassert (lambda: exec('1/0'))()"
    checks = rewrite_asserts(code)
    assert checks is not None
    assert [c.expression for c in checks] == [
        "__import__('os')._exit(3)",
        "(lambda: exec('1/0'))()",
    ]


# --- the checks on the host -----------------------------------------------------------------


class AlwaysEqual:
    """The 'AlwaysEqual' reward hack: equal to anything, so `assert f() == 55` passes."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __lt__(self, other: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True

    __hash__ = object.__hash__


class FakeInt(int):
    pass


@pytest.mark.parametrize(
    ("check", "value", "passed"),
    [
        (Equals(55), 55, True),
        (Equals(55), 55.0, True),
        (Equals(1), True, True),
        (Equals(55), "55", False),
        (Equals((1, 2)), [1, 2], False),
        (Equals([1, 2], json_expected=True), (1, 2), True),
        (Equals(0.3, abs_tol=1e-9), 0.1 + 0.2, True),
        (Equals(math.nan), math.nan, False),
        (Equals(55), AlwaysEqual(), False),
        (Equals(55), FakeInt(55), False),
        (NotEquals(3), 4, True),
        (NotEquals(3), 3.0, False),
        (NotEquals(3), AlwaysEqual(), False),
        (Truthy(), [0], True),
        (Truthy(), 0, False),
        (Truthy(), "", False),
        (Truthy(negate=True), None, True),
        (Truthy(negate=True), 1, False),
        (Truthy(), AlwaysEqual(), False),
        (Truthy(negate=True), types.SimpleNamespace(), False),
        (Compare("<", 3), 2, True),
        (Compare("<", 3), 3, False),
        (Compare("<", 3), "a", False),  # TypeError: a failure, not an exception
        (Compare("<", 3), AlwaysEqual(), False),
        (Compare(">=", 0, literal_left=True), -1, True),
        (Compare("<", [1, 2]), [1, 1, 5], True),
        (Compare("in", 3, literal_left=True), [1, 3], True),
        (Compare("in", 3, literal_left=True), 5, False),
        (Compare("in", "b", literal_left=True), "abc", True),
        (Compare("in", "a", literal_left=True), {"a": 1}, True),
        (Compare("in", (1, 2)), 1, True),
        (Compare("in", {1, 2}), [1], False),  # unhashable: TypeError
        (Compare("not in", 3, literal_left=True), [1], True),
        (Compare("is", None), None, True),
        (Compare("is", None), 0, False),
        (Compare("is", True), 1, False),
        (Compare("is not", None), 0, True),
        (IsInstance(("int",)), 3, True),
        (IsInstance(("int",)), True, True),
        (IsInstance(("int",)), 3.0, False),
        (IsInstance(("list", "tuple")), (1,), True),
        (IsInstance(("int",)), FakeInt(3), False),
        (IsClose(0.3), 0.1 + 0.2, True),
        (IsClose(0.3), 0.31, False),
        (IsClose(2, abs_tol=0.5), 2.4, True),
        (IsClose(1.0), True, True),
        (IsClose(1.0), "1.0", False),
        (IsClose(1.0), 1 + 0j, False),  # math.isclose refuses complex
        (IsClose(1.0), 10**400, False),  # OverflowError: a failure
        (IsClose(1.0), math.nan, False),
        (IsClose(math.inf), math.inf, True),
        (IsClose(2.0, 0.0, 0.5, "<"), 2.5, False),
        (IsClose(2.0, 0.0, 0.5, "<="), 2.5, True),
        (IsClose(2.0, 0.0, 0.5, "<"), 2 + 0.1j, True),  # abs() of a complex, as in Python
        (IsClose(math.inf, 0.0, 1.0, "<="), math.inf, False),  # inf - inf is nan
        (IsClose(2.0, 0.0, 0.5, "<"), [2.0], False),
        (IsClose(2.0, 0.0, 0.5, "<"), AlwaysEqual(), False),
    ],
)
def test_checks_decide_on_plain_values(check: Check, value: object, passed: bool) -> None:
    assert check.passed(value) is passed


@pytest.mark.parametrize(
    "build",
    [
        lambda: Equals(1, abs_tol=-1.0),
        lambda: NotEquals(1, rel_tol=math.nan),
        lambda: IsClose(1.0, rel_tol=-1e-9),
        lambda: Compare("is", 5),
        lambda: IsInstance(("MyClass",)),
        lambda: IsInstance(()),
    ],
)
def test_invalid_checks_are_refused(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


OPS: tuple[CompareOp, ...] = ("<", "<=", ">", ">=", "in", "not in")
CHECKS: list[Check] = [
    Equals(55),
    Equals([1, (2,)], json_expected=True, abs_tol=0.1),
    NotEquals({"a": 1}),
    Truthy(),
    Truthy(negate=True),
    *(Compare(op, 3) for op in OPS),
    *(Compare(op, "a", literal_left=True) for op in OPS),
    Compare("is", None),
    Compare("is not", False),
    IsInstance(("int", "list")),
    IsClose(1.0),
    IsClose(1.0, 0.0, 0.5, "<"),
]
ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=400, max_value=4300).map(lambda n: 10**n)
    | st.floats()
    | st.complex_numbers()
    | st.text(max_size=4)
    | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(ANY_VALUE)
def test_checks_never_raise(value: object) -> None:
    for check in CHECKS:
        assert type(check.passed(value)) is bool


# --- end to end, in-process stand-in for the sandbox ----------------------------------------


def run_checks(program: str, test: str) -> list[bool]:
    """What the service does, with `exec` standing in for the sandbox's program run."""
    checks = rewrite_asserts(test)
    assert checks is not None
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(program, namespace)  # in the sandbox: the candidate's program
    results = []
    for call in checks:
        try:
            tree = sandbox_encode(eval(call.expression, namespace), 100, 100_000)  # sandbox
        except ValueError:
            results.append(False)  # reported as "returned a ..., not a plain value"
            continue
        results.append(call.check.passed(decode(json.loads(json.dumps(tree)))))  # host
    return results


TEST = """
import math
assert fib(10) == 55
assert fib(1) != 2
assert fib(0) is not None and isinstance(fib(3), int)
assert fib(5) in (5, 6)
assert 3 < fib(6)
assert math.isclose(ratio(30), 1.618033988749895)
assert abs(ratio(30) - 1.618) < 1e-3
assert fib(2)
"""
HONEST = """
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

def ratio(n):
    return fib(n + 1) / fib(n)
"""


def test_an_honest_program_passes() -> None:
    assert run_checks(HONEST, TEST) == [True] * 9


def test_the_always_equal_hack_fails_every_check() -> None:
    hack = """
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __gt__(self, other): return True
    def __sub__(self, other): return 0
    def __rsub__(self, other): return 0
    def __abs__(self): return 0
    def __float__(self): return 1.618033988749895
    def __bool__(self): return True
    __hash__ = object.__hash__
    __class__ = int

def fib(n): return AlwaysEqual()
def ratio(n): return AlwaysEqual()
"""
    assert run_checks(hack, TEST) == [False] * 9


def test_a_program_that_shadows_what_the_checks_use_cannot_pass() -> None:
    shadowing = """
import time
import types
isinstance = lambda *args: True
abs = lambda x: 0
math = types.SimpleNamespace(isclose=lambda *args, **kwargs: True)
int = object
def fib(n): return "wrong"
def ratio(n): return 0.0
"""
    test = """
import math
assert isinstance(fib(3), int)
assert math.isclose(ratio(30), 1.618033988749895)
assert abs(ratio(30) - 1.618) < 1e-3
"""
    assert run_checks(shadowing, test) == [False] * 3
    # the rest of TEST judges "wrong" as Python would: it is not 2, not None, and truthy
    assert run_checks(shadowing, TEST) == [
        False,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        True,
    ]


def test_subclasses_of_the_expected_type_fail() -> None:
    subclass = """
class Sneaky(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
def fib(n): return Sneaky(0)
def ratio(n): return Sneaky(0)
"""
    assert run_checks(subclass, TEST) == [False] * 9
