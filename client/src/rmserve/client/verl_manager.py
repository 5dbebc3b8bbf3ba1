"""A verl reward-loop manager that scores every sample with rmserve, keeping the chat.

Unlike a custom reward function, which sees the decoded response and `extra_info`, the manager
reads the sample itself: the prompt's chat messages (`raw_prompt`: system, user and tool turns as
given), the response decoded like verl's naive manager (valid length from the attention mask,
`skip_special_tokens=True`) and verl's `uid`, the id the trainer gives the n rollouts of one
prompt (verl/trainer/ppo/ray_trainer.py:1481-1484, kept for the reward at 572-586, verl 0.9.1),
which becomes the item's GRPO `group` (the prompt's hash only where a sample has no uid).
Concurrent samples are coalesced into one POST /v1/score, and each returns
`{"reward_score", "reward_extra_info"}` with the fixed keys of `rmserve.client.verl`.

On verl 0.9.1, as command-line overrides (verl/trainer/config/reward/reward.yaml:16-23, loaded
by verl/trainer/ppo/reward.py:89-106; `reward_kwargs` is no key of verl's schema, hence the `+`;
verl/experimental/reward_loop/reward_manager/dapo.py:33-35 reads it the same way):

    reward.reward_manager.source=importlib
    reward.reward_manager.name=RMServeRewardManager
    reward.reward_manager.module.path=pkg://rmserve.client.verl_manager
    '+reward.reward_kwargs={model: skywork-rm, url: "http://rmserve:8000",
                            api_key_file: /run/secrets/rmserve-key}'

Settings are `reward.reward_kwargs` over the environment, as for `rmserve.client.verl` (a literal
`api_key` is refused: verl prints its config). verl 0.7 reads `reward_model.reward_loop_source`,
`reward_loop_module_path`, `reward_loop_class_name` and `reward_model.reward_kwargs`; 0.9.1's
main_ppo ignores those (only the fully async trainer migrates them,
verl/experimental/reward_loop/reward_loop.py:39-90). The class registers itself as "rmserve"
when this module is imported, but nothing imports it in verl's fresh worker processes, so
`reward.reward_manager.name=rmserve` with the default `source=register` fails there
(verl/workers/config/reward.py:53-58): load it with `source=importlib`. This module imports
without verl; the class then refuses to be built.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from rmserve.client.verl_scoring import (
    Settings,
    plain,
    prompt_messages,
    score_item,
    trajectory,
)

NAME = "rmserve"
log = logging.getLogger(__name__)

_Base: Any
try:
    from verl.experimental.reward_loop.reward_manager.base import (  # type: ignore[import-not-found, no-redef]
        RewardManagerBase as _Base,
    )
except ImportError:
    _Base = object
    HAVE_VERL = False
else:
    HAVE_VERL = True


class RMServeRewardManager(_Base):  # type: ignore[misc]
    """verl's RewardManagerBase scoring with rmserve. verl 0.8 and 0.9 build it with keywords
    (config=, tokenizer=, compute_score=, reward_router_address=, reward_model_tokenizer=), 0.7
    positionally in that order; the custom reward function verl passes is not used."""

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: Any = None,
        **_: Any,
    ) -> None:
        if not HAVE_VERL:
            raise RuntimeError(
                "RMServeRewardManager is a verl reward manager and needs verl (0.7 or newer) in "
                "this environment; without verl, score with rmserve.client.RewardClient"
            )
        if "compute_score" in inspect.signature(_Base.__init__).parameters:
            super().__init__(config, tokenizer, compute_score)  # verl 0.8, 0.9
        else:
            super().__init__(config, tokenizer)  # verl 0.7
        self.tokenizer = tokenizer
        self.settings = Settings.from_kwargs(with_group_size(reward_kwargs(config), config))

    async def run_single(self, data: Any) -> dict[str, Any]:
        """One sample's reward (several sequences of one trajectory: the last one, as naive)."""
        item = data[-1:][0]
        response_ids = item.batch["responses"]
        valid_length = item.batch["attention_mask"][-response_ids.shape[-1] :].sum()
        valid_ids = response_ids[:valid_length]
        response = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.tokenizer.decode(valid_ids, skip_special_tokens=True)
        )
        extra = await score_item(self.settings, sample_item(item.non_tensor_batch, response))
        return {"reward_score": extra["score"], "reward_extra_info": extra}


def sample_item(fields: Mapping[str, Any], response: str) -> dict[str, Any]:
    """The item of one sample's non_tensor_batch and decoded response: the prompt's messages
    (`tool_extra_fields` merged into `extra_info`, as the naive manager does), the ground truth,
    the data source, and `uid` as the group. The agent loop passes the batch's fields, `uid`
    included, with every sample (verl/experimental/agent_loop/agent_loop.py:645 and 1013-1014,
    verl 0.9.1)."""
    extra_info = {**(fields.get("extra_info") or {}), **(fields.get("tool_extra_fields") or {})}
    messages = prompt_messages(extra_info, fields.get("raw_prompt"))
    reward_model = fields.get("reward_model") or {}
    return trajectory(
        messages,
        response,
        reward_model.get("ground_truth"),
        fields.get("data_source"),
        uid=fields.get("uid"),
    )


def reward_kwargs(config: Any) -> dict[str, Any]:
    """`reward.reward_kwargs` (verl 0.8+) or `reward_model.reward_kwargs` (0.7), as plain data."""
    for section in ("reward", "reward_model"):
        block = _get(config, section)
        kwargs = _get(block, "reward_kwargs") if block is not None else None
        if kwargs:
            found = plain(kwargs)
            if not isinstance(found, dict):
                raise TypeError(f"{section}.reward_kwargs must be a mapping")
            return found
    return {}


def with_group_size(kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
    """reward_kwargs with `group_size` (the n rollouts of a prompt, sent one per request by the
    agent loop, which the service assembles for a listwise judge) from the trainer's config
    when not given: actor_rollout_ref.rollout.n, if validation samples as many per prompt
    (rollout.val_kwargs.n). The reward manager cannot tell a validation sample from a training
    one (verl/experimental/agent_loop/agent_loop.py:1013-1024, verl 0.9.1), so when the two
    differ no size is sent and a warning says to set reward_kwargs.group_size."""
    if "group_size" in kwargs:
        return kwargs
    rollout = _get(_get(config, "actor_rollout_ref"), "rollout")
    n, val_n = _get(rollout, "n"), _get(_get(rollout, "val_kwargs"), "n")
    if not isinstance(n, int) or n < 2:
        return kwargs
    if val_n is not None and val_n != n:
        log.warning(
            "rmserve reward: rollout.n (%s) and rollout.val_kwargs.n (%s) differ, so items are "
            "sent without group_size; a listwise judge then needs each group in one request. "
            "Set reward_kwargs.group_size to the size your judge should wait for",
            n,
            val_n,
        )
        return kwargs
    return {**kwargs, "group_size": n}


def _get(container: Any, key: str) -> Any:
    if container is None:
        return None
    if isinstance(container, Mapping):  # dicts and OmegaConf's DictConfig
        return container.get(key)
    return getattr(container, key, None)


def _register() -> None:
    from verl.experimental.reward_loop.reward_manager.registry import (  # type: ignore[import-not-found]
        register,
    )

    # verl loads modules by path under fresh names: another load may have registered its copy.
    with contextlib.suppress(ValueError):
        register(NAME)(RMServeRewardManager)


if HAVE_VERL:
    _register()
