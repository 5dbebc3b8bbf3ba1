"""Calculator tool: real arithmetic on an expression, evaluated by `simpleeval` (never `eval`).

Only numbers, `+ - * / // % **`, parentheses, the constants `pi`, `e`, `tau` and a fixed set of
math functions are accepted. `^` means power, as in math notation (not Python's XOR): it is
rewritten to `**` before parsing, so `2^10` is 1024, `2^3^2` is 512 and `-2^2` is -4. Integers
stay exact; work is bounded (exponents and factorial arguments are checked before computing,
integer results are limited to `MAX_INT_DIGITS` digits), and every failure is a `ToolError`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field
from simpleeval import InvalidExpression, SimpleEval  # type: ignore[import-untyped]

from rmserve.wire.errors import ToolError

MAX_EXPRESSION_CHARS: Final = 500
MAX_INT_DIGITS: Final = 4000  # below Python's 4300-digit int/str conversion limit
MAX_FACTORIAL: Final = 1000
MAX_COMB_N: Final = 10_000
MAX_ROUND_DIGITS: Final = 100
_MAX_INT_BITS: Final = math.ceil(MAX_INT_DIGITS * math.log2(10))

Number = int | float


class CalculatorArguments(BaseModel):
    """Arguments of the calculator tool."""

    model_config = ConfigDict(extra="forbid")

    expression: str = Field(
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        description=(
            "An arithmetic expression, e.g. `(3.5 + 2) * 4^2 / sqrt(2)`. Operators: + - * / // "
            "% and ** or ^ (both mean power). Constants: pi, e, tau. Functions: sqrt, exp, "
            "log(x) (natural), log(x, base), log10, log2, sin, cos, tan, asin, acos, atan "
            "(radians), abs, round(x, ndigits), floor, ceil, factorial, comb, perm, gcd, lcm, "
            "min, max. Integers are exact."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Bounded operations


def _check(value: Any) -> Number:
    """A real number within the size limit, else ToolError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, complex):
            raise ToolError(
                "invalid_arguments",
                "the result is a complex number (e.g. a fractional power of a negative "
                "number); only real arithmetic is supported",
            )
        raise ToolError("invalid_arguments", "the expression does not evaluate to a number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("invalid_arguments", f"an integer exceeds {MAX_INT_DIGITS} digits")
    return value


def _binary(function: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Number]:
    return lambda a, b: _check(function(_check(a), _check(b)))


def _power(base: Any, exponent: Any) -> Number:
    base, exponent = _check(base), _check(exponent)
    if _power_bits(base, exponent) > _MAX_INT_BITS:
        raise ToolError(
            "invalid_arguments", f"{base} ** {exponent} would exceed {MAX_INT_DIGITS} digits"
        )
    return _check(base**exponent)


def _power_bits(base: Number, exponent: Number) -> int:
    """A lower bound on the bits of an integer power (0 unless both are ints)."""
    if isinstance(base, float) or isinstance(exponent, float) or exponent <= 0:
        return 0
    return (abs(base).bit_length() - 1) * exponent


def _whole(value: Any, function: str, low: int, high: int) -> int:
    """`value` as an int in [low, high] (integral floats accepted), else ToolError."""
    value = _check(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise ToolError(
            "invalid_arguments",
            f"{function}() needs whole numbers from {low} to {high}, got {value!r}",
        )
    return value


def _factorial(n: Any) -> int:
    return math.factorial(_whole(n, "factorial", 0, MAX_FACTORIAL))


def _comb(n: Any, k: Any) -> int:
    return math.comb(_whole(n, "comb", 0, MAX_COMB_N), _whole(k, "comb", 0, MAX_COMB_N))


def _perm(n: Any, k: Any) -> int:
    return math.perm(_whole(n, "perm", 0, MAX_COMB_N), _whole(k, "perm", 0, MAX_COMB_N))


def _round(x: Any, ndigits: Any = None) -> Number:
    if ndigits is None:
        return round(_check(x))
    digits = _whole(ndigits, "round", -MAX_ROUND_DIGITS, MAX_ROUND_DIGITS)
    return round(_check(x), digits)


def _log(x: Any, base: Any = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


OPERATORS: Final[dict[type[ast.AST], Callable[..., Number]]] = {
    ast.Add: _binary(operator.add),
    ast.Sub: _binary(operator.sub),
    ast.Mult: _binary(operator.mul),
    ast.Div: _binary(operator.truediv),
    ast.FloorDiv: _binary(operator.floordiv),
    ast.Mod: _binary(operator.mod),
    ast.Pow: _power,
    ast.USub: lambda a: -_check(a),
    ast.UAdd: lambda a: +_check(a),
}

FUNCTIONS: Final[dict[str, Callable[..., Number]]] = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": _log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "abs": abs,
    "round": _round,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": _factorial,
    "comb": _comb,
    "perm": _perm,
    "gcd": math.gcd,
    "lcm": math.lcm,
    "min": min,
    "max": max,
}

CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# ---------------------------------------------------------------------------------------------
# Parsing and validation of the syntax tree

_ALLOWED_NODES: Final = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.keyword,
    ast.Load,
    *OPERATORS,
)

_REFUSED: Final[dict[type[ast.AST], str]] = {
    ast.Attribute: "attribute access (`x.y`)",
    ast.Subscript: "indexing (`x[i]`)",
    ast.Lambda: "lambda functions",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.Compare: "comparisons",
    ast.BoolOp: "`and` / `or`",
    ast.IfExp: "conditional expressions",
    ast.JoinedStr: "strings",
    ast.Starred: "`*` unpacking",
    ast.NamedExpr: "assignments",
    ast.BitAnd: "the `&` operator",
    ast.BitOr: "the `|` operator",
    ast.Invert: "the `~` operator",
    ast.LShift: "the `<<` operator",
    ast.RShift: "the `>>` operator",
    ast.MatMult: "the `@` operator",
    ast.Not: "`not`",
}


def _parse(expression: str) -> ast.expr:
    body = expression.strip()
    try:
        tree = ast.parse(body.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        lead = len(expression) - len(expression.lstrip())
        raise ToolError("invalid_arguments", _syntax_message(body, lead, exc)) from None
    except (RecursionError, MemoryError):
        raise ToolError("invalid_arguments", "the expression is nested too deeply") from None
    except ValueError as exc:  # e.g. a null byte
        raise ToolError("invalid_arguments", f"cannot parse expression: {exc}") from None
    _validate_tree(tree)
    return tree.body


def _syntax_message(expression: str, lead: int, exc: SyntaxError) -> str:
    """Name the 1-based position in the expression as given (before `^` became `**`, and
    before `lead` leading blanks were stripped)."""
    lines = expression.replace("^", "**").split("\n")
    line = min(max(exc.lineno or 1, 1), len(lines))
    offset = sum(len(text) + 1 for text in lines[: line - 1]) + max(exc.offset or 1, 1) - 1
    consumed, position = 0, len(expression)
    for index, char in enumerate(expression):
        consumed += 2 if char == "^" else 1
        if consumed > offset:
            position = index
            break
    near = expression[position : position + 10]
    where = f"near {near!r}" if near else "at the end"
    return f"syntax error in expression at position {lead + position + 1} ({where}): {exc.msg}"


def _validate_tree(tree: ast.Expression) -> None:
    callees = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            _validate_constant(node)
        elif isinstance(node, ast.Call):
            _validate_call(node)
        elif isinstance(node, ast.Name):
            _validate_name(node, is_callee=id(node) in callees)
        elif not isinstance(node, _ALLOWED_NODES):
            construct = _REFUSED.get(type(node), f"`{type(node).__name__}` expressions")
            raise ToolError(
                "invalid_arguments",
                f"expression uses {construct}, which is not allowed (only numbers, "
                "+ - * / // % ** ^, parentheses, constants and function calls)",
            )


def _validate_constant(node: ast.Constant) -> None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = (
            "strings"
            if isinstance(value, str | bytes)
            else "complex numbers"
            if isinstance(value, complex)
            else repr(value)
        )
        raise ToolError(
            "invalid_arguments", f"only real numbers are allowed in expression, not {what}"
        )


def _validate_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name):
        raise ToolError(
            "invalid_arguments", "only named functions can be called in expression, e.g. sqrt(2)"
        )
    if node.func.id not in FUNCTIONS:
        raise ToolError(
            "invalid_arguments",
            f"unknown function {node.func.id!r} in expression; available: {', '.join(FUNCTIONS)}",
        )


def _validate_name(node: ast.Name, is_callee: bool) -> None:
    if node.id in CONSTANTS or (is_callee and node.id in FUNCTIONS):
        return
    hint = " (call functions with parentheses, e.g. sqrt(2))" if node.id in FUNCTIONS else ""
    raise ToolError(
        "invalid_arguments",
        f"unknown name {node.id!r} in expression; the constants are {', '.join(CONSTANTS)}{hint}",
    )


# ---------------------------------------------------------------------------------------------
# Public API


def _evaluator() -> Any:
    evaluator = SimpleEval(operators=OPERATORS, functions=FUNCTIONS, names=CONSTANTS)
    handlers = {ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.keyword}
    evaluator.nodes = {kind: h for kind, h in evaluator.nodes.items() if kind in handlers}
    return evaluator


def calculate(expression: str) -> int | float:
    """Evaluate `expression`; ToolError("invalid_arguments", ...) for anything refused."""
    if not expression.strip():
        raise ToolError("invalid_arguments", "expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            "invalid_arguments", f"expression is longer than {MAX_EXPRESSION_CHARS} characters"
        )
    node = _parse(expression)
    try:
        value = _check(_evaluator().eval(expression, previously_parsed=node))
    except ToolError:
        raise
    except ZeroDivisionError:
        raise ToolError("invalid_arguments", "division by zero") from None
    except OverflowError:
        raise ToolError("invalid_arguments", "numeric overflow: the result is too large") from None
    except RecursionError:
        raise ToolError("invalid_arguments", "the expression is nested too deeply") from None
    except (ValueError, TypeError, ArithmeticError, InvalidExpression) as exc:
        hint = " (e.g. sqrt or log of a negative number, asin(2))" if "domain" in str(exc) else ""
        raise ToolError("invalid_arguments", f"cannot evaluate expression: {exc}{hint}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("invalid_arguments", f"the result is not a finite number ({value})")
    return value


def format_result(value: int | float) -> str:
    """Exact digits for an int; up to 15 significant digits for a float (`0.1 + 0.2` → 0.3)."""
    if isinstance(value, int):
        return str(value)
    return format(value + 0.0, ".15g")  # + 0.0 turns -0.0 into 0.0
