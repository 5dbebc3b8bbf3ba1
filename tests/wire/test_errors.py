"""wire.errors: an item's and a tool's error survive pickle with their code and message."""

from __future__ import annotations

import pickle

import pytest

from rmserve.wire.errors import ItemError, ToolError


@pytest.mark.parametrize("kind", [ItemError, ToolError])
def test_an_error_pickles_with_its_code_and_message(kind: type[ItemError | ToolError]) -> None:
    error = kind("too_long", "the prompt has 9000 tokens; the model takes 8192")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind
    assert (copy.code, copy.message, str(copy)) == (error.code, error.message, str(error))
