"""Step-score activations and aggregates of process reward models."""

from __future__ import annotations

import math

import pytest

from rmserve.models.process import AGGREGATES, step_score
from rmserve.models.spec import ProcessOptions


def options(**kwargs: object) -> ProcessOptions:
    return ProcessOptions.model_validate({"step_tag": "<s>", **kwargs})


def test_activations() -> None:
    row = [0.5, 2.0]
    assert step_score(row, options()) == pytest.approx(math.exp(2) / (math.exp(0.5) + math.exp(2)))
    assert step_score(row, options(activation="sigmoid")) == pytest.approx(1 / (1 + math.exp(-2)))
    assert step_score(row, options(activation="none", positive_label=0)) == 0.5
    # Large logits do not overflow.
    assert step_score([1000.0, 1001.0], options()) == pytest.approx(1 / (1 + math.exp(-1)))


def test_aggregates() -> None:
    scores = [0.9, 0.5, 0.8]
    assert AGGREGATES["min"](scores) == 0.5
    assert AGGREGATES["last"](scores) == 0.8
    assert AGGREGATES["prod"](scores) == pytest.approx(0.36)
    assert AGGREGATES["mean"](scores) == pytest.approx(2.2 / 3)
