"""Python client for rmserve: sync and async scoring clients, a verl reward function and
the `rmserve score` command."""

from __future__ import annotations

from rmserve.client.client import (
    AsyncRewardClient,
    ItemError,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
    ScoreResult,
)

__all__ = [
    "AsyncRewardClient",
    "ItemError",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ScoreResult",
]
