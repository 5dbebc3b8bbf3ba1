"""Plain values between the sandbox and the host, and how the host compares them.

A call test's value is encoded inside the sandbox by :func:`sandbox_encode` (shipped as source),
travels as JSON, and is rebuilt on the host by :func:`decode` into plain builtin objects. The
host alone decides pass or fail (:func:`values_equal`); expected values never enter the sandbox.
The sandbox is not trusted: whatever it sends, ``decode`` either returns plain builtins (``None``,
``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``set``,
``frozenset``, ``dict``) or raises ``ValueError``. A forged encoding can only claim some plain
value, never an object that compares equal to anything.
"""

from __future__ import annotations

import ast
import math
import re

MAX_INT_DIGITS = 4300  # CPython's default int <-> str limit
_INT_BITS = 14_300  # a little above MAX_INT_DIGITS * log2(10)
_INT = re.compile(r"0|-?[1-9][0-9]*")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_CONTAINERS = ("list", "tuple", "set", "frozenset", "dict")
_SEQUENCES = (list, tuple)
_SETS = (set, frozenset)
_REALS = (bool, int, float)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)
_JSON = (type(None), bool, int, float, str, list, dict)


def sandbox_encode(value: object, max_depth: int, max_items: int) -> object:
    """Encode a plain builtin value as a JSON-able tree; ``ValueError`` for anything else.

    Runs inside the sandbox, shipped as source: self-contained. It never calls a method of the
    value: only ``type(x) is T`` tests, iteration of exact builtin containers and the builtin
    types' own ``__repr__``/``hex``. ``max_depth`` bounds container nesting (and so cycles),
    ``max_items`` the number of values in total. Not a trust boundary: ``decode`` is.
    """
    plain = (bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)
    name_of = type.__dict__["__name__"].__get__  # not a metaclass's __name__
    mro_of = type.__dict__["__mro__"].__get__

    def refuse(x: object, nested: bool) -> ValueError:
        cls = type(x)
        name = str.__str__(name_of(cls))  # an exact str even if __name__ was set to a subclass
        base = ""
        for ancestor in mro_of(cls):
            for builtin in plain:
                if ancestor is builtin and base == "":
                    base = f" (a subclass of {str.__str__(name_of(builtin))})"
        article = "an" if name[:1] != "" and name[0] in "aeiouAEIOU" else "a"
        where = "a value containing " if nested else ""
        return ValueError(f"returned {where}{article} {name}{base}, not a plain value")

    count = 0
    root: list[object] = [None]
    stack: list[tuple[object, int, list[object], int]] = [(value, 0, root, 0)]
    while stack:
        x, depth, out, index = stack.pop()
        node: object
        if x is None:
            node = ["none"]
        elif type(x) is bool:
            node = ["bool", x is True]
        elif type(x) is int:
            text = ""
            if int.bit_length(x) <= 14_300:
                try:
                    text = int.__repr__(x)
                except ValueError:  # over sys.get_int_max_str_digits()
                    text = ""
            if text == "" or len(text.lstrip("-")) > 4300:
                raise ValueError("returned an int too large to send (over 4300 digits)")
            node = ["int", text]
        elif type(x) is float:
            node = ["float", float.__repr__(x)]
        elif type(x) is complex:
            node = ["complex", complex.__repr__(x)]
        elif type(x) is str:
            node = ["str", str.__str__(x)]
        elif type(x) is bytes:
            node = ["bytes", bytes.hex(x)]
        elif (
            type(x) is list
            or type(x) is tuple
            or type(x) is set
            or type(x) is frozenset
            or type(x) is dict
        ):
            if depth >= max_depth:
                raise ValueError(f"returned a value nested over {max_depth} levels (or a cycle)")
            pairs = type(x) is dict
            too_many = ValueError(f"returned a value of over {max_items} elements")
            if count + len(x) > max_items:  # before copying it
                raise too_many
            items = tuple(dict.items(x)) if type(x) is dict else tuple(x)  # never user code
            count += len(items) * (2 if pairs else 1)
            if count > max_items:
                raise too_many
            children: list[object] = []
            for item in items:
                if pairs:
                    pair: list[object] = [None, None]
                    children.append(pair)
                    stack.append((item[1], depth + 1, pair, 1))
                    stack.append((item[0], depth + 1, pair, 0))
                else:
                    stack.append((item, depth + 1, children, len(children)))
                    children.append(None)
            node = [name_of(type(x)), children]
        else:
            raise refuse(x, depth > 0)
        out[index] = node
    return root[0]


def _malformed(what: str) -> ValueError:
    return ValueError(f"malformed value from the sandbox: {what}")


def _scalar(node: list[object]) -> object:
    """One non-container node; its tag is a str."""
    tag = node[0]
    if tag == "none" and len(node) == 1:
        return None
    if len(node) != 2:
        raise _bad_node(node)
    payload = node[1]
    if tag == "bool" and type(payload) is bool:
        return payload
    if tag == "str" and type(payload) is str:
        return payload
    if type(payload) is not str:
        raise _bad_node(node)
    if tag == "int" and len(payload.lstrip("-")) <= MAX_INT_DIGITS and _INT.fullmatch(payload):
        return int(payload)
    if tag == "bytes" and _HEX.fullmatch(payload):
        return bytes.fromhex(payload)
    try:
        if tag == "float" and len(payload) <= 32 and float.__repr__(float(payload)) == payload:
            return float(payload)
        if tag == "complex" and len(payload) <= 64:
            number = complex(payload)
            if complex.__repr__(number) == payload:
                return number
    except ValueError:
        pass
    raise _bad_node(node)


def _bad_node(node: list[object]) -> ValueError:
    tag = str(node[0])
    if tag in {"none", "bool", "int", "float", "complex", "str", "bytes", *_CONTAINERS}:
        return _malformed(f"a bad {tag!r} node")
    return _malformed(f"unknown tag {tag[:40]!r}")


def _build(tag: str, items: list[object]) -> object:
    if tag == "list":
        return items
    if tag == "tuple":
        return tuple(items)
    try:
        built: set[object] | frozenset[object] | dict[object, object]
        if tag == "dict":
            built = dict(zip(items[0::2], items[1::2], strict=True))
            expected = len(items) // 2
        else:
            built = set(items) if tag == "set" else frozenset(items)
            expected = len(items)
    except TypeError:
        raise _malformed(f"an unhashable {'key' if tag == 'dict' else 'element'}") from None
    if len(built) != expected:
        raise _malformed(f"a {tag} with duplicate {'keys' if tag == 'dict' else 'elements'}")
    return built


def decode(tree: object, *, max_depth: int = 100, max_items: int = 100_000) -> object:
    """Rebuild the plain value a sandbox encoded; ``ValueError`` if the tree is malformed.

    The tree is untrusted. Validation is strict (canonical literals, known tags, exact arity),
    iterative (no recursion), and bounded by ``max_depth`` and ``max_items`` as in the sandbox.
    """
    values: list[object] = []
    stack: list[tuple[object, int, str, int]] = [(tree, 0, "", 0)]
    count = 0
    while stack:
        node, depth, build, size = stack.pop()
        if build:
            items = values[len(values) - size :]
            del values[len(values) - size :]
            values.append(_build(build, items))
            continue
        if type(node) is not list or not node or type(node[0]) is not str:
            raise _malformed("a node is not [tag, ...]")
        tag = node[0]
        if tag not in _CONTAINERS:
            values.append(_scalar(node))
            continue
        if len(node) != 2 or type(node[1]) is not list:
            raise _malformed(f"a bad {tag!r} node")
        if depth >= max_depth:
            raise _malformed(f"nested over {max_depth} levels")
        children: list[object] = node[1]
        if tag == "dict":
            flat: list[object] = []
            for pair in children:
                if type(pair) is not list or len(pair) != 2:
                    raise _malformed("a dict item is not [key, value]")
                flat.extend(pair)
            children = flat
        count += len(children)
        if count > max_items:
            raise _malformed(f"over {max_items} elements")
        stack.append((None, depth, tag, len(children)))
        stack.extend((child, depth + 1, "", 0) for child in reversed(children))
    return values[0]


def _check_plain(value: object, max_depth: int, max_items: int, json: bool, what: str) -> None:
    """Iteratively check exact types (JSON's or all plain ones), nesting, size, int length."""
    allowed = _JSON if json else _PLAIN
    stack: list[tuple[object, int]] = [(value, 0)]
    count = 0
    while stack:
        item, depth = stack.pop()
        if not any(type(item) is kind for kind in allowed):
            raise ValueError(f"{what} contains a value of type {type(item).__name__}")
        if type(item) is int and item.bit_length() > _INT_BITS:
            raise ValueError(f"{what} contains an int of over {MAX_INT_DIGITS} digits")
        if isinstance(item, list | tuple | set | frozenset | dict):
            if depth >= max_depth:
                raise ValueError(f"{what} is nested over {max_depth} levels")
            count += len(item) * 2 if isinstance(item, dict) else len(item)
            if count > max_items:
                raise ValueError(f"{what} has over {max_items} elements")
            if isinstance(item, dict):
                if json and not all(type(key) is str for key in item):
                    raise ValueError(f"{what} has a dict key that is not a string")
                stack.extend((part, depth + 1) for pair in item.items() for part in pair)
            else:
                stack.extend((part, depth + 1) for part in item)


def parse_literal(text: str, *, max_chars: int = 100_000) -> object:
    """A Python literal (``ast.literal_eval``) of at most ``max_chars``; ``ValueError`` if not."""
    if len(text) > max_chars:
        raise ValueError(f"the literal is over {max_chars} characters")
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a Python literal: {str(exc)[:200] or type(exc).__name__}") from None
    _check_plain(value, 100, 100_000, False, "the literal")
    return value


def check_json_value(value: object, *, max_depth: int = 100, max_items: int = 100_000) -> None:
    """Check a JSON ``expected`` value's types, nesting and size; ``ValueError`` if too big."""
    _check_plain(value, max_depth, max_items, True, "the expected value")


def _tolerance(tol: float | None) -> float:
    if tol is None:
        return 0.0
    if not tol >= 0:  # also nan
        raise ValueError(f"a tolerance must be a non-negative number, not {tol!r}")
    return float(tol)


def values_equal(
    got: object,
    expected: object,
    *,
    json_expected: bool,
    abs_tol: float | None = None,
    rel_tol: float | None = None,
) -> bool:
    """Python ``==`` on plain values, with three differences.

    A tuple in ``got`` matches a list in ``expected`` when ``json_expected`` (JSON has no tuple);
    with a tolerance, a float against a float or int uses ``math.isclose`` (the other tolerance
    is 0); nan equals nothing, also inside lists, tuples and dict values. Set elements and dict
    keys compare as in Python, without tolerance. ``ValueError`` for a negative tolerance.
    """
    tolerant = abs_tol is not None or rel_tol is not None
    absolute, relative = _tolerance(abs_tol), _tolerance(rel_tol)
    stack: list[tuple[object, object]] = [(got, expected)]
    while stack:
        a, b = stack.pop()
        if isinstance(a, _SEQUENCES) or isinstance(b, _SEQUENCES):
            if not (isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES)):
                return False
            as_json = json_expected and type(a) is tuple and type(b) is list
            if (type(a) is not type(b) and not as_json) or len(a) != len(b):
                return False
            stack.extend(zip(a, b, strict=True))
        elif isinstance(a, dict) or isinstance(b, dict):
            if not (isinstance(a, dict) and isinstance(b, dict)) or len(a) != len(b):
                return False
            for key, item in b.items():
                if key not in a:
                    return False
                stack.append((a[key], item))
        elif isinstance(a, _SETS) or isinstance(b, _SETS):
            if not (isinstance(a, _SETS) and isinstance(b, _SETS)) or a != b:
                return False
        elif tolerant and float in (type(a), type(b)) and isinstance(a, _REALS):
            if not isinstance(b, _REALS):
                return False
            try:
                if not math.isclose(a, b, rel_tol=relative, abs_tol=absolute):
                    return False
            except OverflowError:  # an int beyond float range: only == can match it
                if a != b:
                    return False
        elif a != b:
            return False
    return True
