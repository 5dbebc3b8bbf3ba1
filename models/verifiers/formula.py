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
from collections.abc import Mapping
from typing import Any

from simpleeval import SimpleEval  # type: ignore[import-untyped]

_FUNCTIONS: dict[str, Any] = {
    "min": min,
    "max": max,
    "abs": abs,
    "clip": lambda x, lo, hi: max(lo, min(hi, x)),
}
_OPERATORS: dict[type[ast.AST], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call)


class Formula:
    def __init__(self, text: str) -> None:
        """Raise ValueError saying what is not allowed."""
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"formula {text!r} is not valid: {exc.msg}") from None
        names: list[str] = []
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED + tuple(_OPERATORS)):
                raise ValueError(f"formula {text!r}: {type(node).__name__} is not allowed")
            if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
                raise ValueError(f"formula {text!r}: only numbers are allowed as constants")
            if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords
            ):
                raise ValueError(f"formula {text!r}: calls may only be {', '.join(_FUNCTIONS)}")
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
        except (ZeroDivisionError, OverflowError) as exc:
            raise ValueError(f"formula {self.text!r}: {exc}") from None
        if not math.isfinite(value):
            raise ValueError(f"formula {self.text!r} is not finite ({value})")
        return value
