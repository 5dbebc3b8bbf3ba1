"""sandbox.values: the sandbox's encoding of plain values, the host's decoding and comparison.

The encoder runs with the candidate's objects, so it must refuse everything but exact builtin
values without calling into them; the decoder reads untrusted JSON, so it must reject anything
malformed with ValueError alone; the comparison is Python's ``==`` on plain values, with JSON's
lists standing for tuples and an optional float tolerance.
"""

from __future__ import annotations

import builtins
import inspect
import json
import math
import subprocess
import sys
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmserve.sandbox import values
from rmserve.sandbox.values import (
    check_json_value,
    decode,
    parse_literal,
    sandbox_encode,
    values_equal,
)


def roundtrip(value: object, max_depth: int = 100, max_items: int = 100_000) -> object:
    """Encode as in the sandbox, send as JSON, decode as on the host."""
    wire = json.dumps(sandbox_encode(value, max_depth, max_items))
    return decode(json.loads(wire), max_depth=max_depth, max_items=max_items)


def canonical(value: object) -> object:
    """A comparable, type-exact form: nan equals nan, -0.0 differs from 0.0, sets are sorted."""
    kind = type(value).__name__
    if isinstance(value, float | complex):
        return kind, repr(value)
    if isinstance(value, list | tuple):
        return kind, [canonical(item) for item in value]
    if isinstance(value, set | frozenset):
        return kind, sorted(repr(canonical(item)) for item in value)
    if isinstance(value, dict):
        return kind, sorted(repr((canonical(k), canonical(v))) for k, v in value.items())
    return kind, value


def nested_lists(depth: int) -> list[Any]:
    root: list[Any] = []
    current = root
    for _ in range(depth):
        current.append([])
        current = current[0]
    return root


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.builds(
        lambda digits, sign: sign * (10**digits - 1), st.integers(1, 4300), st.sampled_from([1, -1])
    )
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
HASHABLE = st.recursive(
    SCALARS,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=4),
    max_leaves=10,
)
PLAIN = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.sets(HASHABLE, max_size=5)
        | st.frozensets(HASHABLE, max_size=5)
        | st.dictionaries(HASHABLE, inner, max_size=5)
    ),
    max_leaves=30,
)


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(PLAIN)
def test_plain_values_survive_encode_json_decode(value: object) -> None:
    assert canonical(roundtrip(value)) == canonical(value)


@pytest.mark.parametrize(
    ("value", "tree"),
    [
        (55, ["int", "55"]),
        (-7, ["int", "-7"]),
        (True, ["bool", True]),
        (None, ["none"]),
        (0.1, ["float", "0.1"]),
        (math.nan, ["float", "nan"]),
        (-math.inf, ["float", "-inf"]),
        (1 + 2j, ["complex", "(1+2j)"]),
        ("é", ["str", "é"]),
        (b"\x00\xff", ["bytes", "00ff"]),
        ([1, (2,)], ["list", [["int", "1"], ["tuple", [["int", "2"]]]]]),
        ({"a": None}, ["dict", [[["str", "a"], ["none"]]]]),
        (frozenset(), ["frozenset", []]),
    ],
)
def test_the_encoding_is_strictly_typed(value: object, tree: object) -> None:
    assert sandbox_encode(value, 10, 100) == tree


def test_bool_stays_bool_and_int_stays_int() -> None:
    assert type(roundtrip(True)) is bool
    assert type(roundtrip(1)) is int
    assert type(roundtrip((1.0,))[0]) is float  # type: ignore[index]


def test_limits_are_inclusive() -> None:
    assert roundtrip(nested_lists(9), max_depth=10) == nested_lists(9)
    assert roundtrip(list(range(100)), max_items=100) == list(range(100))
    assert roundtrip(10**4299) == 10**4299
    with pytest.raises(ValueError, match="nested"):
        roundtrip(nested_lists(10), max_depth=10)
    with pytest.raises(ValueError, match="over 100 elements"):
        roundtrip(list(range(101)), max_items=100)


# --- the encoder ships as source ------------------------------------------------------------


def shipped_source() -> str:
    return "from __future__ import annotations\n\n" + inspect.getsource(sandbox_encode)


def test_sandbox_encode_works_from_its_source_alone() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(shipped_source(), "<shipped>", "exec"), namespace)
    assert set(namespace) == {"__builtins__", "annotations", "sandbox_encode"}
    encoded = namespace["sandbox_encode"]([1, {"a": (2.5, None)}], 10, 100)
    assert encoded == sandbox_encode([1, {"a": (2.5, None)}], 10, 100)
    with pytest.raises(ValueError, match="a subclass of int"):
        namespace["sandbox_encode"](type("MyInt", (int,), {})(3), 10, 100)


def test_sandbox_encode_uses_no_module_global() -> None:
    module_globals = set(vars(values)) - set(dir(builtins))
    names: set[str] = set()
    codes = [sandbox_encode.__code__]
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    assert names & module_globals == set()


def test_sandbox_encode_runs_in_an_isolated_interpreter() -> None:
    script = shipped_source() + (
        "\nimport json, sys\n"
        "class Sneaky(int):\n    pass\n"
        "print(json.dumps(sandbox_encode([1, 'x', {2: b'a'}], 10, 100)))\n"
        "try:\n    sandbox_encode(Sneaky(1), 10, 100)\n"
        "except ValueError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    first, second = done.stdout.splitlines()
    assert decode(json.loads(first)) == [1, "x", {2: b"a"}]
    assert second == "returned a Sneaky (a subclass of int), not a plain value"


# --- adversarial values for the encoder -----------------------------------------------------


class AlwaysEqual:
    """The 'AlwaysEqual' reward hack: an object equal to anything, so `assert f() == x` passes."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


class Booby:
    """Every dunder the encoder must never call records the call and lies or raises."""

    calls: list[str] = []  # noqa: RUF012 - shared on purpose

    def __repr__(self) -> str:
        Booby.calls.append("repr")
        raise RuntimeError("repr")

    def __hash__(self) -> int:
        Booby.calls.append("hash")
        return 0

    def __eq__(self, other: object) -> bool:
        Booby.calls.append("eq")
        return True

    def __iter__(self) -> Any:
        Booby.calls.append("iter")
        raise RuntimeError("iter")

    def __len__(self) -> int:
        Booby.calls.append("len")
        return 0

    def __index__(self) -> int:
        Booby.calls.append("index")
        return 55


class Meta(type):
    """A metaclass whose comparisons and name lookups raise: the message must still be built."""

    def __eq__(cls, other: object) -> bool:
        raise RuntimeError("eq on a class")

    __hash__ = type.__hash__

    def __getattribute__(cls, name: str) -> Any:
        if name in ("__name__", "__qualname__", "__mro__"):
            raise RuntimeError(name)
        return super().__getattribute__(name)


class Hidden(metaclass=Meta):
    pass


class NameIsAStrSubclass:
    pass


class LyingStr(str):
    def __str__(self) -> str:
        return "int"

    def __format__(self, spec: str) -> str:
        return "int"


NameIsAStrSubclass.__name__ = LyingStr("Lying")


def _generator() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (type("MyInt", (int,), {})(55), "returned a MyInt (a subclass of int), not a plain value"),
        (type("MyStr", (str,), {})("x"), "a MyStr (a subclass of str)"),
        (type("MyList", (list,), {})([1]), "a MyList (a subclass of list)"),
        (type("MyDict", (dict,), {})(a=1), "a MyDict (a subclass of dict)"),
        (type("MyFloat", (float,), {})(1.0), "a MyFloat (a subclass of float)"),
        (type("MyTuple", (tuple,), {})(()), "a MyTuple (a subclass of tuple)"),
        (AlwaysEqual(), "returned an AlwaysEqual, not a plain value"),
        ([1, [2, AlwaysEqual()]], "returned a value containing an AlwaysEqual"),
        ({AlwaysEqual(): 1}, "containing an AlwaysEqual"),
        ({1: AlwaysEqual()}, "containing an AlwaysEqual"),
        ({AlwaysEqual()}, "containing an AlwaysEqual"),
        (Hidden(), "returned a Hidden, not a plain value"),
        (NameIsAStrSubclass(), "returned a Lying, not a plain value"),
        (lambda: 55, "returned a function"),
        (_generator(), "returned a generator"),
        (math, "returned a module"),
        (int, "returned a type"),
        (Ellipsis, "returned an ellipsis"),
        (range(3), "returned a range"),
        (bytearray(b"x"), "returned a bytearray"),
        ({1: 2}.keys(), "returned a dict_keys"),
    ],
)
def test_anything_but_exact_builtins_is_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="not a plain value") as caught:
        sandbox_encode(value, 100, 1000)
    assert message in str(caught.value)


def test_no_method_of_a_candidate_object_is_called() -> None:
    Booby.calls.clear()
    for value in ([Booby()], {Booby(): 1}, {1: Booby()}, {Booby()}, (Booby(),), Booby()):
        with pytest.raises(ValueError, match="Booby"):
            sandbox_encode(value, 100, 1000)
    assert Booby.calls == ["hash", "hash"]  # building the dict and the set above, not encoding


def test_numpy_values_are_not_plain() -> None:
    numpy = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=r"a float64 \(a subclass of float\)"):
        sandbox_encode(numpy.float64(1.5), 10, 10)
    with pytest.raises(ValueError, match="an int64"):
        sandbox_encode(numpy.int64(5), 10, 10)
    with pytest.raises(ValueError, match="ndarray, not a plain value"):
        sandbox_encode(numpy.arange(3), 10, 10)


def test_cycles_and_deep_nesting_stop_at_the_depth_limit() -> None:
    looped: list[object] = []
    looped.append(looped)
    mapping: dict[str, object] = {}
    mapping["self"] = [mapping]
    for value in (looped, mapping, nested_lists(100_000)):
        with pytest.raises(ValueError, match="nested over 100 levels"):
            sandbox_encode(value, 100, 10**6)


def test_shared_structure_is_bounded_by_the_item_limit() -> None:
    wide: list[object] = list(range(50))
    for _ in range(30):  # 50 ** 30 elements if expanded
        wide = [wide] * 50
    with pytest.raises(ValueError, match="over 100000 elements"):
        sandbox_encode(wide, 100, 100_000)


def test_huge_ints_are_refused_even_without_the_str_limit() -> None:
    with pytest.raises(ValueError, match="too large"):
        sandbox_encode(10**4300, 10, 10)
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # the candidate may lift the interpreter's limit
    try:
        with pytest.raises(ValueError, match="too large"):
            sandbox_encode([1 << 10**6], 10, 10)
        with pytest.raises(ValueError, match="too large"):
            sandbox_encode(-(10**4300), 10, 10)
    finally:
        sys.set_int_max_str_digits(previous)


# --- the decoder reads untrusted trees ------------------------------------------------------


@pytest.mark.parametrize(
    "tree",
    [
        None,
        "int",
        {"int": "1"},
        [],
        [1],
        ["x"],
        ["eval", "1+1"],
        ["none", None],
        ["bool", 1],
        ["bool"],
        ["int", 5],
        ["int", "05"],
        ["int", "-0"],
        ["int", "+1"],
        ["int", "1_000"],
        ["int", " 1"],
        ["int", "\uff11"],  # a full-width digit, which int() accepts
        ["int", "1", "2"],
        ["float", "1"],
        ["float", "1.00"],
        ["float", "-nan"],
        ["float", "Infinity"],
        ["float", " 1.5"],
        ["float", 1.5],
        ["complex", "1+2j"],
        ["complex", "(1+2j) "],
        ["str", 5],
        ["str", ["x"]],
        ["bytes", "0"],
        ["bytes", "0G"],
        ["bytes", "ABCD"],
        ["bytes", "ab cd"],
        ["list"],
        ["list", {}],
        ["list", [5]],
        ["list", [["int", "1"]], "extra"],
        ["dict", [["int", "1"]]],
        ["dict", [[["int", "1"], ["int", "2"], ["int", "3"]]]],
        ["set", [["list", []]]],
        ["frozenset", [["dict", []]]],
        ["set", [["tuple", [["list", []]]]]],
        ["dict", [[["list", []], ["none"]]]],
        ["set", [["int", "1"], ["int", "1"]]],
        ["set", [["int", "1"], ["bool", True]]],
        ["dict", [[["str", "a"], ["none"]], [["str", "a"], ["int", "1"]]]],
        ["int", "1" * 4301],
        ["float", "1" * 400 + ".0"],
    ],
)
def test_malformed_trees_raise_value_error(tree: object) -> None:
    with pytest.raises(ValueError, match="malformed value from the sandbox"):
        decode(tree)


def test_the_longest_int_decodes() -> None:
    assert decode(["int", "9" * 4300]) == int("9" * 4300)
    assert decode(["int", "-" + "9" * 4300]) == -int("9" * 4300)


def test_deep_and_wide_trees_are_bounded_without_recursion() -> None:
    deep: list[object] = ["list", []]
    for _ in range(100_000):
        deep = ["list", [deep]]
    with pytest.raises(ValueError, match="nested over 100 levels"):
        decode(deep)
    with pytest.raises(ValueError, match="over 100000 elements"):
        decode(["list", [["none"]] * 100_001])
    with pytest.raises(ValueError, match="over 10 elements"):
        decode(["dict", [[["int", "1"], ["none"]]] * 6], max_items=10)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)
SCALAR_TAGS = ["none", "bool", "int", "float", "complex", "str", "bytes"]
TAGS = st.sampled_from([*SCALAR_TAGS, "list", "tuple", "set", "frozenset", "dict", "x"])
TREES = st.recursive(
    st.tuples(TAGS).map(list) | st.tuples(TAGS, JSON).map(list),
    lambda inner: st.tuples(TAGS, st.lists(inner | st.lists(inner, max_size=3), max_size=4)).map(
        list
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(JSON, TREES))
def test_random_json_only_ever_raises_value_error(tree: object) -> None:
    try:
        decoded = decode(tree)
    except ValueError:
        return
    # whatever it accepted is plain and encodes back to an equivalent tree
    assert canonical(roundtrip(decoded)) == canonical(decoded)


# --- Python literals and JSON expected values -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("(1, 2)", (1, 2)),
        ("{1, 2}", {1, 2}),
        ("set()", set()),
        ("b'ab'", b"ab"),
        ("-1.5", -1.5),
        ("1+2j", 1 + 2j),
        ("{'a': [None, True]}", {"a": [None, True]}),
        ("  [1]", [1]),
    ],
)
def test_parse_literal(text: str, value: object) -> None:
    assert canonical(parse_literal(text)) == canonical(value)


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "f()",
        "__import__('os')",
        "1 + x",
        "...",
        "{[1]: 2}",
        "(",
        "\x00",
        "1" * 5000,
        "0x" + "f" * 20_000,
        "[" * 150 + "]" * 150,
        "(" * 1000 + ")" * 1000,
        "-" * 50_000 + "1",
        "[" + "0," * 100_001 + "]",
    ],
)
def test_parse_literal_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_literal(text, max_chars=300_000)


def test_parse_literal_size_limit() -> None:
    with pytest.raises(ValueError, match="over 10 characters"):
        parse_literal("[1, 2, 3, 4]", max_chars=10)


def test_check_json_value() -> None:
    check_json_value({"a": [1, 2.5, None, True, "x", {"b": []}], "nan": math.nan})
    for bad, message in [
        ((1, 2), "tuple"),
        ({1, 2}, "set"),
        (b"x", "bytes"),
        ({1: "a"}, "not a string"),
        (1 + 2j, "complex"),
        ([AlwaysEqual()], "AlwaysEqual"),
        (10**5000, "over 4300 digits"),
        (nested_lists(101), "nested over 100 levels"),
        (list(range(100_001)), "over 100000 elements"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_json_value(bad)
    with pytest.raises(ValueError, match="nested over 2"):
        check_json_value([[[1]]], max_depth=2)


# --- comparison on the host -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("got", "expected", "json_expected", "tolerance", "equal"),
    [
        (55, 55, False, {}, True),
        (55, 55.0, False, {}, True),
        (55.0, 55, True, {}, True),
        (True, 1, False, {}, True),
        (1, True, True, {}, True),
        (False, 0.0, False, {}, True),
        (1 + 0j, 1, False, {}, True),
        ("55", 55, True, {}, False),
        ("a", b"a", False, {}, False),
        (None, 0, False, {}, False),
        ((1, 2), [1, 2], True, {}, True),
        ((1, 2), [1, 2], False, {}, False),
        ([1, 2], (1, 2), False, {}, False),
        ([1, 2], (1, 2), True, {}, False),
        ([(1, 2), (3,)], [[1, 2], [3]], True, {}, True),
        ({"a": (1, 2)}, {"a": [1, 2]}, True, {}, True),
        ([1, 2], [1, 2, 3], False, {}, False),
        ([1, 2], [2, 1], False, {}, False),
        ({1: "a"}, {1.0: "a"}, False, {}, True),
        ({"1": 1}, {1: 1}, False, {}, False),
        ({"a": 1}, {"a": 1, "b": 2}, False, {}, False),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, False, {}, True),
        ({1, 2}, frozenset({2, 1}), False, {}, True),
        ({1, 2}, [1, 2], True, {}, False),
        ({(1, 2)}, {(1, 2)}, False, {}, True),
        (math.nan, math.nan, False, {}, False),
        ([math.nan], [math.nan], False, {}, False),
        ({"x": math.nan}, {"x": math.nan}, False, {}, False),
        (math.nan, math.nan, False, {"abs_tol": 1.0}, False),
        (math.inf, math.inf, False, {}, True),
        (math.inf, math.inf, False, {"abs_tol": 1e-9}, True),
        (0.1 + 0.2, 0.3, False, {}, False),
        (0.1 + 0.2, 0.3, False, {"abs_tol": 1e-9}, True),
        (0.1 + 0.2, 0.3, False, {"rel_tol": 1e-9}, True),
        ([0.1 + 0.2, 1], [0.3, 1], True, {"abs_tol": 1e-9}, True),
        ({"k": (0.1 + 0.2,)}, {"k": [0.3]}, True, {"abs_tol": 1e-9}, True),
        (1, 1.0000001, False, {"abs_tol": 1e-6}, True),
        (1.5, 2, False, {"abs_tol": 0.4}, False),
        (1, 2, False, {"abs_tol": 5.0}, False),  # ints compare exactly
        (10**400, 1e308, False, {"abs_tol": 1.0}, False),
        (10**400, 10**400, False, {"abs_tol": 1.0}, True),
        ("0.3", 0.3, False, {"abs_tol": 1.0}, False),
        ({0.30000000000000004}, {0.3}, False, {"abs_tol": 1e-9}, False),  # sets: exact
    ],
)
def test_values_equal(
    got: object, expected: object, json_expected: bool, tolerance: Any, equal: bool
) -> None:
    assert values_equal(got, expected, json_expected=json_expected, **tolerance) is equal


def test_values_equal_on_deep_values_does_not_recurse() -> None:
    assert values_equal(nested_lists(50_000), nested_lists(50_000), json_expected=False)
    assert not values_equal(nested_lists(50_000), nested_lists(49_999), json_expected=False)


@pytest.mark.parametrize("tolerance", [{"abs_tol": -1.0}, {"rel_tol": math.nan}])
def test_values_equal_refuses_bad_tolerances(tolerance: Any) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        values_equal(1.0, 1.0, json_expected=False, **tolerance)


def holds_nan(value: object) -> bool:
    if isinstance(value, float | complex):
        return math.isnan(value.real) or math.isnan(value.imag)
    if isinstance(value, dict):
        return any(holds_nan(key) or holds_nan(item) for key, item in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(holds_nan(item) for item in value)
    return False


@settings(max_examples=200, deadline=None)
@given(PLAIN)
def test_a_decoded_value_equals_its_copy_unless_it_holds_nan(value: object) -> None:
    got, expected = roundtrip(value), roundtrip(value)  # separate objects, as on the host
    assert values_equal(got, expected, json_expected=False) is not holds_nan(value)
