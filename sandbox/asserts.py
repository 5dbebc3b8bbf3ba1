"""Rewrite assert-only test code into call checks that the host decides.

``assert f(1) == 55`` becomes a :class:`CallCheck`: the sandbox evaluates ``f(1)`` in the
program's namespace and returns its plain value (:mod:`rmserve.sandbox.values`); the host applies
``Equals(55)`` to it. A check depends only on that value and the test's literals. The sandbox's
part never lets a candidate object meet a test value (no comparison, arithmetic, boolean operator
or predicate in it), so an ``__eq__`` that is always true, or a patched builtin, decides nothing.
Test code of any other shape stays in-process (``None``).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

from rmserve.sandbox.values import parse_literal, values_equal

CompareOp: TypeAlias = Literal["<", "<=", ">", ">=", "in", "not in", "is", "is not"]
_FAILS = (ArithmeticError, TypeError, ValueError, RecursionError)  # a comparison gone wrong
_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)
_TYPES: dict[str, type] = {kind.__name__: kind for kind in _PLAIN[1:]}
_OPS: dict[str, Callable[[Any, Any], object]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
    "is": operator.is_, "is not": operator.is_not,
}  # fmt: skip
_AST_OPS = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in", ast.NotIn: "not in",
    ast.Is: "is", ast.IsNot: "is not", ast.Eq: "==", ast.NotEq: "!=",
}  # fmt: skip
_MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
_NEGATED = {"==": "!=", "!=": "==", "in": "not in", "not in": "in", "is": "is not", "is not": "is"}
# Names of predicates (or ways to reach dunders) a candidate object could answer in the sandbox.
_PREDICATES = {
    "isinstance", "issubclass", "callable", "hasattr", "getattr", "isclose", "allclose",
    "array_equal", "array_equiv", "eq", "ne", "lt", "le", "gt", "ge", "contains", "is_",
    "is_not", "truth", "not_",
}  # fmt: skip
_CONSTANT_NODES = (
    ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.BinOp, ast.UnaryOp,
    ast.operator, ast.unaryop, ast.expr_context,
)  # fmt: skip
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # the tokenizer's lines
_IMPORTS = {("math", None): "math", ("math", "isclose"): "isclose"}  # dropped: used on the host


def _is(value: object, *kinds: type) -> bool:
    """``type(value)`` is one of ``kinds`` (by identity)."""
    return any(type(value) is kind for kind in kinds)


def _tolerance(*tolerances: float | None) -> None:
    if any(tol is not None and not tol >= 0 for tol in tolerances):  # also nan
        raise ValueError(f"tolerances must be non-negative numbers, not {tolerances!r}")


@dataclass(frozen=True)
class _Equality:
    expected: object
    json_expected: bool = False
    abs_tol: float | None = None
    rel_tol: float | None = None

    def __post_init__(self) -> None:
        _tolerance(self.abs_tol, self.rel_tol)

    def _equal(self, value: object) -> bool | None:
        """:func:`values_equal`, or None if ``value`` cannot be compared."""
        if not _is(value, *_PLAIN):
            return None
        try:
            return bool(values_equal(
                value, self.expected, json_expected=self.json_expected,
                abs_tol=self.abs_tol, rel_tol=self.rel_tol,
            ))  # fmt: skip
        except _FAILS:
            return None


@dataclass(frozen=True)
class Equals(_Equality):
    """The value equals ``expected`` (:func:`values_equal`)."""

    def passed(self, value: object) -> bool:
        return self._equal(value) is True


@dataclass(frozen=True)
class NotEquals(_Equality):
    """The value does not equal ``expected``."""

    def passed(self, value: object) -> bool:
        return self._equal(value) is False


@dataclass(frozen=True)
class Truthy:
    """``assert E`` (``assert not E`` when ``negate``): ``bool()`` of the plain value."""

    negate: bool = False

    def passed(self, value: object) -> bool:
        return _is(value, *_PLAIN) and bool(value) is not self.negate


@dataclass(frozen=True)
class Compare:
    """``value <op> literal``, or ``literal <op> value`` when ``literal_left``."""

    op: CompareOp
    literal: object
    literal_left: bool = False

    def __post_init__(self) -> None:
        if self.op in ("is", "is not") and not any(self.literal is x for x in (None, True, False)):
            raise ValueError("'is' compares only with None, True or False")

    def passed(self, value: object) -> bool:
        left, right = (self.literal, value) if self.literal_left else (value, self.literal)
        try:
            return _is(value, *_PLAIN) and bool(_OPS[self.op](left, right))
        except _FAILS:
            return False


@dataclass(frozen=True)
class IsInstance:
    """``isinstance(value, T)`` for the builtin types in ``type_names`` (bool is an int)."""

    type_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.type_names or not set(self.type_names) <= _TYPES.keys():
            raise ValueError(f"not builtin value types: {self.type_names!r}")

    def passed(self, value: object) -> bool:
        kinds = tuple(_TYPES[name] for name in self.type_names)
        return _is(value, *_PLAIN) and isinstance(value, kinds)


@dataclass(frozen=True)
class IsClose:
    """``math.isclose(value, expected, ...)``, or ``abs(value - expected) < abs_tol`` (``<=``)."""

    expected: float
    rel_tol: float = 1e-09
    abs_tol: float = 0.0
    comparison: Literal["isclose", "<", "<="] = "isclose"

    def __post_init__(self) -> None:
        _tolerance(self.abs_tol, self.rel_tol)

    def passed(self, value: object) -> bool:
        expected, rel_tol, abs_tol = self.expected, self.rel_tol, self.abs_tol
        try:
            if self.comparison == "isclose":
                number = cast(float, value)
                close = _is(value, bool, int, float)
                return close and math.isclose(number, expected, rel_tol=rel_tol, abs_tol=abs_tol)
            if not _is(value, bool, int, float, complex):  # abs() of a complex, as in Python
                return False
            difference = abs(cast(complex, value) - expected)
            return difference < abs_tol if self.comparison == "<" else difference <= abs_tol
        except _FAILS:
            return False


Check: TypeAlias = Equals | NotEquals | Truthy | Compare | IsInstance | IsClose
_Found: TypeAlias = tuple[ast.expr, Check]  # the sandbox's expression, the host's check


@dataclass(frozen=True)
class CallCheck:
    """Evaluate ``expression`` in the sandbox; the host applies ``check`` to its value."""

    expression: str
    check: Check
    source: str


def _literal(node: ast.expr) -> tuple[object] | None:
    """``(value,)`` if ``node`` is a literal, else None; ``ValueError`` if it is too large."""
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return (parse_literal(ast.unparse(node)),)


def _real(value: object) -> float | None:
    """``value`` if it is an int or a float (not a bool), else None."""
    return value if type(value) is int or type(value) is float else None


def _number(node: ast.expr) -> float | None:
    found = _literal(node)
    return None if found is None else _real(found[0])


def _split(left: ast.expr, right: ast.expr) -> tuple[ast.expr, object, bool] | None:
    """``(E, literal, literal_left)`` when exactly one side is a literal."""
    left_literal, right_literal = _literal(left), _literal(right)
    if left_literal is not None and right_literal is None:
        return right, left_literal[0], True
    if left_literal is None and right_literal is not None:
        return left, right_literal[0], False
    return None


def _isinstance(node: ast.Call) -> _Found | None:
    """``isinstance(E, T)`` or ``isinstance(E, (T1, T2))`` with builtin value types."""
    if len(node.args) != 2 or node.keywords:
        return None
    kinds = node.args[1]
    elements = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    names = tuple(element.id for element in elements if isinstance(element, ast.Name))
    if not names or len(names) != len(elements) or not set(names) <= _TYPES.keys():
        return None
    return node.args[0], IsInstance(names)


def _isclose(node: ast.Call) -> _Found | None:
    """``math.isclose(E, L, rel_tol=R, abs_tol=A)``, in either argument order."""
    tolerances = {keyword.arg: _number(keyword.value) for keyword in node.keywords}
    if len(node.args) != 2 or not tolerances.keys() <= {"rel_tol", "abs_tol"}:
        return None
    rel_tol, abs_tol = tolerances.get("rel_tol", 1e-09), tolerances.get("abs_tol", 0.0)
    parts = _split(node.args[0], node.args[1])
    expected = None if parts is None else _real(parts[1])
    if parts is None or expected is None or rel_tol is None or abs_tol is None:
        return None
    return parts[0], IsClose(expected, rel_tol, abs_tol)


def _abs_difference(node: ast.Compare, op: str) -> _Found | None:
    """``abs(E - L) < tol`` / ``abs(L - E) <= tol``, or ``tol > abs(E - L)`` / ``>=``."""
    measured, bound = node.left, node.comparators[0]
    if isinstance(bound, ast.Call):
        measured, bound, op = bound, measured, _MIRRORED[op]
    if not (
        op in ("<", "<=")
        and isinstance(measured, ast.Call)
        and ast.unparse(measured.func) == "abs"
        and len(measured.args) == 1
        and not measured.keywords
        and isinstance(difference := measured.args[0], ast.BinOp)
        and isinstance(difference.op, ast.Sub)
    ):
        return None
    parts, tolerance = _split(difference.left, difference.right), _number(bound)
    expected = None if parts is None else _real(parts[1])
    if parts is None or expected is None or tolerance is None:
        return None
    return parts[0], IsClose(expected, 0.0, tolerance, "<" if op == "<" else "<=")


def _compare(node: ast.Compare, negate: bool) -> _Found | None:
    """One comparison with a literal on one side (``negate``: under ``not``)."""
    if len(node.ops) != 1:
        return None  # chained: stays in-process
    op = _AST_OPS[type(node.ops[0])]
    if negate:
        if op not in _NEGATED:
            return None  # `not (x < 1)` is not `x >= 1` (nan, TypeError)
        op = _NEGATED[op]
    elif op in _MIRRORED and (found := _abs_difference(node, op)) is not None:
        return found
    parts = _split(node.left, node.comparators[0])
    if parts is None:
        return None
    expression, literal, literal_left = parts
    if op in ("==", "!="):
        return expression, (Equals if op == "==" else NotEquals)(literal)
    if op in ("is", "is not") and not any(literal is x for x in (None, True, False)):
        return None
    return expression, Compare(cast(CompareOp, op), literal, literal_left)


def _check(node: ast.expr, names: set[str]) -> _Found | None:
    """The sandbox's expression and the host's check for one conjunct of an assert."""
    negate = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
    inner = node.operand if isinstance(node, ast.UnaryOp) and negate else node
    if isinstance(inner, ast.Compare):
        return _compare(inner, negate)
    function = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
    if isinstance(node, ast.Call) and function == "isinstance":
        return _isinstance(node)
    # A bare `isclose` only as the test imported it from math (numpy's has other defaults).
    if isinstance(node, ast.Call) and (
        function == "math.isclose" or function in names & {"isclose"}
    ):
        return _isclose(node)
    if isinstance(inner, ast.BoolOp) or _literal(inner) is not None:
        return None
    return inner, Truthy(negate)


def _sandbox_safe(expression: ast.expr, names: set[str]) -> bool:
    """Whether the sandbox's part keeps candidate objects away from the test's values.

    No comparison, boolean operator, conditional, arithmetic on anything but constants,
    predicate, dunder attribute, or name bound by a dropped import.
    """
    for node in ast.walk(expression):
        if isinstance(node, ast.Compare | ast.BoolOp | ast.IfExp):
            return False
        if isinstance(node, ast.BinOp | ast.UnaryOp) and not all(
            isinstance(part, _CONSTANT_NODES) for part in ast.walk(node)
        ):
            return False
        name = node.id if isinstance(node, ast.Name) else ""
        attribute = node.attr if isinstance(node, ast.Attribute) else ""
        if name in _PREDICATES | names or attribute in _PREDICATES or attribute[:2] == "__":
            return False
    return True


def _conjuncts(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return [part for value in node.values for part in _conjuncts(value)]
    return [node]


def _segment(lines: list[bytes], node: ast.stmt) -> str:
    """``ast.get_source_segment`` on lines split once (it splits the whole code each time)."""
    last = node.end_lineno if node.end_lineno is not None else node.lineno
    chunk = b"".join(lines[node.lineno - 1 : last])
    end_column = node.end_col_offset if node.end_col_offset is not None else len(lines[last - 1])
    end = len(chunk) - len(lines[last - 1]) + end_column
    return chunk[node.col_offset : end].decode(errors="replace")


def _imported(statement: ast.stmt) -> set[str] | None:
    """The names an allowed (dropped) import binds, or None for any other statement."""
    keys: list[tuple[tuple[str, str | None], str | None]]
    if isinstance(statement, ast.Import):
        keys = [((alias.name, None), alias.asname) for alias in statement.names]
    elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
        keys = [((statement.module, alias.name), alias.asname) for alias in statement.names]
    else:
        return None
    if any(alias is not None or key not in _IMPORTS for key, alias in keys):
        return None
    return {_IMPORTS[key] for key, _ in keys}


def rewrite_asserts(code: str) -> list[CallCheck] | None:
    """The call checks equivalent to ``code``, or None if it must run in-process.

    Every top-level statement must be an assert of a known shape (a literal message is ignored)
    or ``import math`` / ``from math import isclose``, which are dropped; code without an assert
    gives None. ``ValueError`` on a syntax error. Nothing is executed.
    """
    try:
        tree = ast.parse(code, "<test>")
        compile(tree, "<test>", "exec", dont_inherit=True)  # errors ast.parse misses; not run
    except SyntaxError as exc:
        raise ValueError(f"test code line {exc.lineno}: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise ValueError(f"test code cannot be compiled: {exc or type(exc).__name__}") from None
    names: set[str] = set()
    for statement in tree.body:
        bound = set() if isinstance(statement, ast.Assert) else _imported(statement)
        if bound is None:
            return None
        names |= bound
    checks: list[CallCheck] = []
    lines = [line.encode() for line in _LINE.findall(code)]
    try:
        for statement in tree.body:
            if not isinstance(statement, ast.Assert):
                continue
            if statement.msg is not None and _literal(statement.msg) is None:
                return None
            source = _segment(lines, statement)
            for part in _conjuncts(statement.test):
                found = _check(part, names)
                if found is None or not _sandbox_safe(found[0], names):
                    return None
                checks.append(CallCheck(ast.unparse(found[0]), found[1], source))
    except (ValueError, RecursionError):  # a literal too large, a negative tolerance, deep code
        return None
    return checks or None
