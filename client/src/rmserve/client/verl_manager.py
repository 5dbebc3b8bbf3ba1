"""A verl reward-loop manager that scores every sample with rmserve, keeping the chat.

Unlike a custom reward function, which sees the decoded response and `extra_info`, the manager
reads the sample itself: the prompt's chat messages (`raw_prompt`: system, user and tool turns as
given) and the response decoded like verl's naive manager (valid length from the attention mask,
`skip_special_tokens=True`). Concurrent samples are coalesced into one POST /v1/score, and each
returns `{"reward_score", "reward_extra_info"}` with the fixed keys of `rmserve.client.verl`.

    reward:
      reward_manager: {source: importlib, name: RMServeRewardManager,
                       module: {path: "pkg://rmserve.client.verl_manager"}}
      reward_kwargs: {model: skywork-rm, url: "http://rmserve:8000"}   # or the RMSERVE_* env

Settings are `reward.reward_kwargs` (verl 0.7: `reward_model.reward_kwargs`) over the
environment, as for `rmserve.client.verl`. Where verl is importable the class is also registered
as "rmserve"; this module imports without verl, and the class then refuses to be built.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
        self.settings = Settings.from_kwargs(reward_kwargs(config))

    async def run_single(self, data: Any) -> dict[str, Any]:
        """One sample's reward (several sequences of one trajectory: the last one, as naive)."""
        item = data[-1:][0]
        response_ids = item.batch["responses"]
        valid_length = item.batch["attention_mask"][-response_ids.shape[-1] :].sum()
        valid_ids = response_ids[:valid_length]
        response = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.tokenizer.decode(valid_ids, skip_special_tokens=True)
        )
        prompt, ground_truth, data_source = sample_info(item.non_tensor_batch)
        extra = await score_item(
            self.settings, trajectory(prompt, response, ground_truth, data_source)
        )
        return {"reward_score": extra["score"], "reward_extra_info": extra}


def sample_info(fields: Mapping[str, Any]) -> tuple[list[Any], Any, Any]:
    """The prompt's messages, the ground truth and the data source of one sample's
    non_tensor_batch (`tool_extra_fields` merged into `extra_info`, as the naive manager does)."""
    extra_info = {**(fields.get("extra_info") or {}), **(fields.get("tool_extra_fields") or {})}
    messages = prompt_messages(extra_info, fields.get("raw_prompt"))
    reward_model = fields.get("reward_model") or {}
    return messages, reward_model.get("ground_truth"), fields.get("data_source")


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


def _get(container: Any, key: str) -> Any:
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
