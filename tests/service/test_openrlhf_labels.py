"""OpenRLHF labels (any JSON value, prompts_dataset.py:26-45 of OpenRLHF v0.11.0) as item
fields."""

from __future__ import annotations

from typing import Any

import pytest

from rmserve.service.openrlhf_labels import label_fields
from rmserve.web.errors import UnprocessableEntity


@pytest.mark.parametrize(
    ("label", "fields"),
    [
        ("", {}),
        (None, {}),
        ("  \n", {}),
        ("\\frac{1}{2}", {"reference": "\\frac{1}{2}"}),
        (72, {"reference": "72"}),
        (0.5, {"reference": "0.5"}),
        ([], {}),
        (["assert f() == 1"], {"tests": [{"code": "assert f() == 1"}]}),
        (
            [{"input": "2\n", "output": "4\n"}],
            {"tests": [{"stdin": "2\n", "expected_stdout": "4\n"}]},
        ),
        ({"reference": 3, "metadata": {"id": 7}}, {"reference": "3", "metadata": {"id": 7}}),
        ({"reference": ""}, {}),
        (
            {"documents": [{"id": "d1", "text": "Paris"}]},
            {"documents": [{"id": "d1", "text": "Paris"}]},
        ),
    ],
)
def test_labels_become_item_fields(label: Any, fields: dict[str, Any]) -> None:
    assert label_fields(label, 0) == fields


@pytest.mark.parametrize(
    ("label", "param", "why"),
    [
        (False, "labels[3]", "boolean"),
        ({"reference": True}, "labels[3].reference", "boolean"),
        ({"ground_truth": "4"}, "labels[3]", "unknown fields ['ground_truth']"),
        ([{"input": "1", "stdin": "1", "output": "2"}], "labels[3][0]", "not both"),
        ([{"stdin": "1"}], "labels[3][0]", "expected_stdout"),
        ([["nested"]], "labels[3][0]", "a test is test code"),
        (["x"] * 101, "labels[3]", "at most 100"),
        ({"tests": "assert True"}, "labels[3]", "a list of tests"),
        ({"documents": [{"text": "no id"}]}, "labels[3].documents[0]", "id"),
    ],
)
def test_a_malformed_label_names_itself(label: Any, param: str, why: str) -> None:
    with pytest.raises(UnprocessableEntity) as raised:
        label_fields(label, 3)
    assert raised.value.param == param and why in raised.value.message
