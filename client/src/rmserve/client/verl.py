"""verl custom reward functions that score with an rmserve reward model.

    compute_score_async   the reward loop (verl 0.8+, the only path in 0.9): awaited once per
                          sample; concurrent calls are coalesced into one POST /v1/score
    compute_score         sync, the same per sample (the legacy naive manager, older verl)
    compute_score_batch   the legacy `batch` reward manager only (not in the reward loop)

On verl 0.9.1, as command-line overrides (verl's schema has no `reward_kwargs`, hence the `+`;
verl/trainer/config/reward/reward.yaml:8-13, read at verl/trainer/ppo/reward.py:70-86):

    reward.custom_reward_function.path=pkg://rmserve.client.verl
    reward.custom_reward_function.name=compute_score_async
    '+reward.custom_reward_function.reward_kwargs={model: math, url: "http://rmserve:8000",
                                                    api_key_file: /run/secrets/rmserve-key}'

Settings come from `reward_kwargs` or else the environment: `model` (RMSERVE_MODEL, required),
`url` (RMSERVE_URL, default http://127.0.0.1:8000), the API key from `api_key_file` (a file
holding it) or `api_key_env` (the name of an environment variable holding it), else
RMSERVE_API_KEY; `options` (the request's options), `on_error` and `error_score`
(RMSERVE_ON_ERROR: "raise" or the number a failed item gets). A literal `api_key` is refused:
verl prints its whole config (verl/trainer/main_ppo.py:144). Environment variables are read in
the Ray worker that scores, which inherits the launching shell's only when main_ppo starts a
local Ray itself.

verl hands a reward function no group id, so an item's GRPO `group` is a hash of its prompt (the
agent loop always adds the prompt as extra_info["raw_prompt"]); an item without a prompt is in
no group. RMServeRewardManager (rmserve.client.verl_manager) groups by verl's own `uid`.

Every item returns the same keys (verl takes the first sample's keys as the schema of
`reward_extra_info`): `score`, `rmserve_ok`, `rmserve_error` ("type: message", "" when ok),
`critique`, `verdict`, `step_scores` (a JSON list, "" when none). An item the service could not
score raises ItemFailed (on_error "raise", the default), or with on_error "flag" gets the
explicit `error_score` and `rmserve_ok` False; it never becomes a silent 0.0. A request that
fails for good (service down, unknown model) raises RewardServiceError.
"""

from __future__ import annotations

from rmserve.client.policy import ItemFailed
from rmserve.client.verl_scoring import (
    EXTRA_INFO_KEYS,
    aclose,
    build_item,
    compute_score,
    compute_score_async,
    compute_score_batch,
    reset,
)

__all__ = [
    "EXTRA_INFO_KEYS",
    "ItemFailed",
    "aclose",
    "build_item",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "reset",
]
