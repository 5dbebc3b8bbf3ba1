"""OpenRLHF labels as item fields. OpenRLHF sends the dataset's label value as it is
(openrlhf/datasets/prompts_dataset.py: `label = "" if label_key is None else data[label_key]`):
any JSON value.

    "" or null (or blank)  no reference: a verifier reports missing_reference, never a 0.0
    string                 the reference
    number                 the reference as text (72 -> "72", 0.5 -> "0.5")
    list                   the code tests (`tests`): a string is test code; an object a test,
                           {"call", "expected"}, {"stdin", "expected_stdout"} (or
                           {"input", "output"}) or {"code"}
    object                 item fields: reference, tests, documents, metadata

Anything else (a boolean, which could mean a reference or a verdict; unknown fields; a malformed
test) is a 422 naming `labels[i]`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import JsonValue, ValidationError

from rmserve.web.errors import UnprocessableEntity
from rmserve.wire.trajectory import CodeTest, Document

LABEL_FIELDS = ("reference", "tests", "documents", "metadata")
MAX_TESTS = 100  # Trajectory.tests


def label_fields(label: JsonValue, index: int) -> dict[str, Any]:
    """The item fields a label gives: "" or null none, a string or number the reference, a
    list the code tests, an object item fields (422 naming `labels[i]` otherwise)."""
    where = f"labels[{index}]"
    if isinstance(label, list):
        tests = code_tests(label, where)
        return {"tests": tests} if tests else {}
    if isinstance(label, dict):
        return object_fields(label, where)
    reference = reference_text(label, where)
    return {"reference": reference} if reference is not None else {}


def reference_text(value: JsonValue, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # no reference: a verifier says missing_reference rather than score 0
    if isinstance(value, bool):
        raise UnprocessableEntity(
            f"{where}: a boolean label is ambiguous; send the reference as a string "
            '("true", "yes", ...)',
            param=where,
        )
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise UnprocessableEntity(
        f"{where}: a reference is a string or a finite number, not {_json_type(value)}",
        param=where,
    )


def code_tests(values: list[JsonValue], where: str) -> list[dict[str, Any]]:
    """Tests: a string is test code; an object a test ({"code"}, {"stdin", "expected_stdout"},
    or {"input", "output"} for stdin / expected_stdout)."""
    if len(values) > MAX_TESTS:
        raise UnprocessableEntity(f"{where}: {len(values)} tests; at most {MAX_TESTS}", param=where)
    return [_code_test(value, f"{where}[{j}]") for j, value in enumerate(values)]


def _code_test(value: JsonValue, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"code": value}
    if not isinstance(value, dict):
        raise UnprocessableEntity(
            f"{where}: a test is test code (a string) or an object, not {_json_type(value)}",
            param=where,
        )
    test = dict(value)
    for alias, field in (("input", "stdin"), ("output", "expected_stdout")):
        if alias in test:
            if field in test:
                raise UnprocessableEntity(
                    f"{where}: give {alias!r} or {field!r}, not both", param=where
                )
            test[field] = test.pop(alias)
    try:
        return CodeTest.model_validate(test).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise UnprocessableEntity(f"{where}: {first_error(exc)}", param=where) from None


def object_fields(label: dict[str, JsonValue], where: str) -> dict[str, Any]:
    unknown = sorted(set(label) - set(LABEL_FIELDS))
    if unknown:
        raise UnprocessableEntity(
            f"{where}: unknown fields {unknown}; a label object has {', '.join(LABEL_FIELDS)}",
            param=where,
        )
    fields: dict[str, Any] = {}
    if (reference := reference_text(label.get("reference"), f"{where}.reference")) is not None:
        fields["reference"] = reference
    tests = label.get("tests")
    if tests is not None:
        if not isinstance(tests, list):
            raise UnprocessableEntity(f"{where}.tests: a list of tests", param=where)
        if checked := code_tests(tests, f"{where}.tests"):
            fields["tests"] = checked
    documents = label.get("documents")
    if documents is not None:
        if not isinstance(documents, list):
            raise UnprocessableEntity(f"{where}.documents: a list of documents", param=where)
        fields["documents"] = [
            _document(d, f"{where}.documents[{j}]") for j, d in enumerate(documents)
        ]
    metadata = label.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise UnprocessableEntity(f"{where}.metadata: an object", param=where)
        fields["metadata"] = metadata
    return fields


def _document(value: JsonValue, where: str) -> dict[str, Any]:
    try:
        return Document.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise UnprocessableEntity(f"{where}: {first_error(exc)}", param=where) from None


def first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    path = ".".join(str(part) for part in error["loc"])
    return f"{path}: {error['msg']}" if path else str(error["msg"])


def _json_type(value: JsonValue) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
