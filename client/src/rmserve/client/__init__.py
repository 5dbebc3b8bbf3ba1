"""Python client for rmserve: sync and async scoring clients, trainer adapters (verl:
`rmserve.client.verl`, `rmserve.client.verl_manager`; OpenRLHF: `rmserve.client.openrlhf`;
TRL) and the `rmserve score` command."""

from __future__ import annotations

from rmserve.client.client import (
    AsyncRewardClient,
    ItemError,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
    ScoreResult,
)
from rmserve.client.policy import ItemFailed

__all__ = [
    "AsyncRewardClient",
    "ItemError",
    "ItemFailed",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ScoreResult",
]
