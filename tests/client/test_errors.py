"""The exceptions the client and the trainer adapters raise to user code survive pickle (Ray
hands a worker's exception to verl's driver pickled): same type, message and fields."""

from __future__ import annotations

import pickle

import pytest

from rmserve.client import ItemFailed, RewardServiceError
from rmserve.client.client import ItemError, ScoreResult
from rmserve.client.trl import UnscoredItemsError

FAILED = ScoreResult(index=1, error=ItemError(type="timeout", message="not scored in 30s"))


@pytest.mark.parametrize(
    "error",
    [
        ItemFailed("parse_error", "the judge's answer has no score"),
        RewardServiceError(422, "invalid_request", "no user message", "items.3.messages"),
        RewardServiceError(503, "unavailable", "draining", retry_after_s=2.5, retryable=False),
        RewardServiceError(None, "timeout", "ReadTimeout: timed out"),
        UnscoredItemsError("rmserve_reward", [ScoreResult(index=0, score=1.0), FAILED], [1]),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_exception_pickles_with_its_type_message_and_fields(error: Exception) -> None:
    error.add_note("raised in a Ray worker")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)  # the fields, and the note


def test_the_fields_an_adapter_reads_come_back() -> None:
    failed = pickle.loads(pickle.dumps(ItemFailed("timeout", "not scored in 30s")))
    assert (failed.type, failed.message, failed.summary) == (
        "timeout",
        "not scored in 30s",
        "timeout: not scored in 30s",
    )
    refused = pickle.loads(pickle.dumps(RewardServiceError(429, "rate_limited", "slow down")))
    assert (refused.status, refused.param, refused.retryable) == (429, None, True)
    unscored = pickle.loads(pickle.dumps(UnscoredItemsError("r", [FAILED], [0])))
    assert unscored.failed == [0] and unscored.results[0].error == FAILED.error
