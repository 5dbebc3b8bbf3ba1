"""Composite-reward formulas: arithmetic over named rewards, parsed and evaluated safely.

`0.7*math + 0.3*rm - 0.1*length` and the like: numbers, variables, + - * / ** and unary minus,
parentheses, and the functions min, max, abs and clip(x, lo, hi). The text is parsed with `ast`
and every node checked against that list at load time; evaluation uses `simpleeval` with only
those operators, functions and the variables' values. Nothing is ever `eval`'d.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from simpleeval import SimpleEval  # type: ignore[import-untyped]


def _in_floats(op: Callable[..., float]) -> Callable[..., float]:
    """`op` on floats, so that no formula computes huge integers for minutes (9**9**9): a
    result out of range is an OverflowError or inf, which `evaluate` refuses."""
    return lambda *args: op(*(float(arg) for arg in args))


_FUNCTIONS: dict[str, Any] = {
    "min": lambda *values: min(values),
    "max": lambda *values: max(values),
    "abs": abs,
    "clip": lambda x, lo, hi: max(lo, min(hi, x)),
}
# How many arguments each function takes: (at least, at most).
_ARITY = {"min": (1, None), "max": (1, None), "abs": (1, 1), "clip": (3, 3)}
_OPERATORS: dict[type[ast.AST], Any] = {
    ast.Add: _in_floats(operator.add),
    ast.Sub: _in_floats(operator.sub),
    ast.Mult: _in_floats(operator.mul),
    ast.Div: _in_floats(operator.truediv),
    # ValueError for a complex result ((-8)**0.5) or 0**-1, OverflowError when too large.
    ast.Pow: _in_floats(math.pow),
    ast.USub: _in_floats(operator.neg),
    ast.UAdd: _in_floats(operator.pos),
}
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call)
# Deeper expressions are refused: evaluating them would exhaust the interpreter's stack.
_MAX_DEPTH = 100


class Formula:
    def __init__(self, text: str) -> None:
        """Raise ValueError saying what is not allowed."""
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"formula {text!r} is not valid: {exc.msg}") from None
        except (MemoryError, RecursionError):  # the parser's stack overflowed
            raise ValueError(f"formula {_shown(text)} is nested too deeply") from None
        if _depth(tree) > _MAX_DEPTH:
            raise ValueError(f"formula {_shown(text)} is nested too deeply (over {_MAX_DEPTH})")
        names: list[str] = []
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED + tuple(_OPERATORS)):
                raise ValueError(f"formula {text!r}: {type(node).__name__} is not allowed")
            if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
                raise ValueError(f"formula {text!r}: only numbers are allowed as constants")
            if isinstance(node, ast.Call):
                if not (
                    isinstance(node.func, ast.Name)
                    and node.func.id in _FUNCTIONS
                    and not node.keywords
                ):
                    raise ValueError(f"formula {text!r}: calls may only be {', '.join(_FUNCTIONS)}")
                _check_arity(text, node.func.id, len(node.args))
            if isinstance(node, ast.Name) and node.id not in _FUNCTIONS:
                names.append(node.id)
        self.text = text
        self.variables = sorted(set(names))

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value; ValueError when it is not a finite number (e.g. 1/0)."""
        evaluator = SimpleEval(
            operators=dict(_OPERATORS), functions=dict(_FUNCTIONS), names=dict(values)
        )
        try:
            value = float(evaluator.eval(self.text))
        except (ZeroDivisionError, OverflowError, ValueError) as exc:
            raise ValueError(f"formula {self.text!r}: {exc}") from None
        if not math.isfinite(value):
            raise ValueError(f"formula {self.text!r} is not finite ({value})")
        return value


def _check_arity(text: str, function: str, given: int) -> None:
    least, most = _ARITY[function]
    if given < least or (most is not None and given > most):
        count = f"{least}" if least == most else f"at least {least}"
        noun = "argument" if least == 1 else "arguments"
        raise ValueError(f"formula {text!r}: {function}() takes {count} {noun}, not {given}")


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:60]) + "..."


def _depth(tree: ast.AST) -> int:
    """How deeply the expression nests (iteratively: a deep tree must not overflow the stack)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest
