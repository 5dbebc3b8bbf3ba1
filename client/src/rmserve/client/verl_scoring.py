"""The implementation of `rmserve.client.verl` (see there). It lives apart because verl loads a
custom reward file by path as a fresh module outside sys.modules: the file only re-exports, so
the classes and the per-process clients here are imported, and shared, the ordinary way."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmserve.client.batching import LoopLocal, LoopThread, ProcessLocal, ScoreBatcher
from rmserve.client.client import API_KEY_ENV, DEFAULT_URL, ScoreResult, group_of
from rmserve.client.policy import ON_ERROR_ENV, ErrorPolicy, ItemFailed, checked_score

log = logging.getLogger(__name__)

EXTRA_INFO_KEYS = ("score", "rmserve_ok", "rmserve_error", "critique", "verdict", "step_scores")
PROMPT_KEYS = ("raw_prompt", "prompt", "question")
SETTINGS = frozenset(
    {
        "model",
        "url",
        "api_key_env",
        "api_key_file",
        "options",
        "on_error",
        "error_score",
        "group_size",
    }
)
# verl's naive reward-loop manager adds these when verl runs its own reward model
# (verl/experimental/reward_loop/reward_manager/naive.py:58-65, verl 0.9.1); rmserve ignores them.
VERL_EXTRAS = frozenset({"reward_router_address", "reward_model_tokenizer"})
MAX_GROUP = 256  # the longest `group` the service takes (wire/trajectory.py)


@dataclass(frozen=True)
class Settings:
    """Where and how to score, from verl's reward_kwargs over the environment."""

    url: str
    api_key: str | None = field(repr=False)
    model: str
    options: dict[str, Any] | None
    policy: ErrorPolicy
    # rollout.n: a grouped item says its group's size, so that the service assembles groups
    # that arrive in pieces (one sample per request) before a listwise judge compares them.
    group_size: int | None = None

    def sized(self, item: dict[str, Any]) -> dict[str, Any]:
        """The item with its group's size and an id (so that the service recognises it when
        the client resends it), when it is in a group and the size is known."""
        if self.group_size is None or "group" not in item:
            return item
        return {"id": uuid.uuid4().hex, **item, "group_size": self.group_size}

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Settings:
        if "api_key" in kwargs:
            raise TypeError(
                "rmserve reward: reward_kwargs.api_key is refused: verl prints its config, key "
                "included (main_ppo.py:144, verl 0.9.1). Give api_key_env (the name of an "
                "environment variable holding the key) or api_key_file (a file holding it), or "
                f"set {API_KEY_ENV}"
            )
        unknown = sorted(set(kwargs) - SETTINGS - VERL_EXTRAS)
        if unknown:
            raise TypeError(
                f"rmserve reward: unknown reward_kwargs {unknown}; known: {sorted(SETTINGS)}"
            )
        model = kwargs.get("model") or os.environ.get("RMSERVE_MODEL")
        if not model:
            raise RuntimeError(
                "rmserve reward: set RMSERVE_MODEL (or reward_kwargs.model) to the reward "
                "model's name (GET /v1/models on the service lists them)"
            )
        if "on_error" in kwargs or "error_score" in kwargs:
            policy = ErrorPolicy.parse(kwargs.get("on_error", "raise"), kwargs.get("error_score"))
        else:
            policy = ErrorPolicy.from_env(os.environ.get(ON_ERROR_ENV))
        options = plain(kwargs.get("options"))
        if options is not None and not isinstance(options, dict):
            raise TypeError("rmserve reward: reward_kwargs.options must be a mapping")
        return cls(
            url=str(kwargs.get("url") or os.environ.get("RMSERVE_URL") or DEFAULT_URL),
            api_key=api_key(kwargs.get("api_key_env"), kwargs.get("api_key_file")),
            model=str(model),
            options=options or None,
            policy=policy,
            group_size=_group_size(kwargs.get("group_size")),
        )


def _group_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(
            f"rmserve reward: reward_kwargs.group_size must be a positive integer (rollout.n), "
            f"not {value!r}"
        )
    return value if value > 1 else None


def api_key(env: str | None, file: str | None) -> str | None:
    """The key from the file `file`, or the environment variable `env`, or else RMSERVE_API_KEY
    (None when that is unset). A named source that holds no key is an error, not "no key"."""
    if env and file:
        raise TypeError("rmserve reward: give reward_kwargs.api_key_env or api_key_file, not both")
    if file:
        key = Path(file).expanduser().read_text().strip()
        if not key:
            raise RuntimeError(f"rmserve reward: the api_key_file {file} is empty")
        return key
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise RuntimeError(
                f"rmserve reward: the environment variable {env} (reward_kwargs.api_key_env) is "
                "not set in this process"
            )
        return key
    return os.environ.get(API_KEY_ENV) or None


async def compute_score_async(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The reward of one sample, as verl's reward loop awaits it
    (verl/experimental/reward_loop/reward_manager/naive.py:66-73, verl 0.9.1)."""
    settings = Settings.from_kwargs(kwargs)
    item = build_item(data_source, solution_str, ground_truth, extra_info)
    return await score_item(settings, item)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The reward of one sample, blocking; calls from several threads at once share a batch."""
    coroutine = compute_score_async(data_source, solution_str, ground_truth, extra_info, **kwargs)
    return _background.get().run(coroutine)


def compute_score_batch(
    data_sources: Iterable[str],
    solution_strs: Iterable[str],
    ground_truths: Iterable[Any],
    extra_infos: Iterable[Mapping[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Rewards of a batch, in order: verl's legacy `batch` reward manager
    (verl/workers/reward_manager/batch.py:70-76, verl 0.9.1), which the reward loop does not
    offer. With on_error "raise", the first failed item raises for the whole batch."""
    settings = Settings.from_kwargs(kwargs)
    sources, solutions, truths = list(data_sources), list(solution_strs), list(ground_truths)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(sources)
    if not len(sources) == len(solutions) == len(truths) == len(infos):
        raise ValueError(
            "data_sources, solution_strs, ground_truths and extra_infos differ in length"
        )
    items = [
        settings.sized(build_item(*fields))
        for fields in zip(sources, solutions, truths, infos, strict=True)
    ]
    results = _background.get().run(_score_all(settings, items))
    return reward_infos(results, settings.policy)


async def score_item(settings: Settings, item: dict[str, Any]) -> dict[str, Any]:
    """Score one item through this event loop's batcher; its reward info."""
    item = settings.sized(item)
    result = await loop_scorer(settings).score_one(settings.model, item, settings.options)
    return reward_info(result, settings.policy)


def build_item(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The trajectory: the prompt's turns, then the solution as the assistant turn, the ground
    truth as `reference`. verl gives a reward function no group id (the reward loop's call,
    naive.py:66-73, verl 0.9.1), so the group is the prompt's."""
    return trajectory(prompt_messages(extra_info), solution_str, ground_truth, data_source)


def trajectory(
    prompt: list[Any], response: str, ground_truth: Any, data_source: Any, uid: Any = None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "messages": [*prompt, {"role": "assistant", "content": response}],
        "metadata": {"data_source": plain(data_source)},
    }
    group = group_name(uid, prompt)
    if group is not None:
        item["group"] = group
    if ground_truth is not None:
        item["reference"] = _text(ground_truth)
    return item


def group_name(uid: Any, prompt: list[Any]) -> str | None:
    """The item's GRPO group: verl's `uid`, the id its trainer gives the n rollouts of one prompt
    (ray_trainer.py:1481-1484, verl 0.9.1), else a hash of the prompt. None (no group) when
    neither is known: items of different prompts are never lumped into one group."""
    if uid is not None:
        name = str(plain(uid))
        return name if 0 < len(name) <= MAX_GROUP else group_of(name)
    return group_of(prompt) if prompt else None


def prompt_messages(extra_info: Mapping[str, Any] | None, raw_prompt: Any = None) -> list[Any]:
    """The prompt's chat turns: `raw_prompt` if given, else extra_info's "raw_prompt" (the agent
    loop's chat messages), "prompt" (text or messages) or "question" (verl's data_preprocess
    scripts). Without any, a warning (once): the model then scores the answer alone."""
    if raw_prompt is not None:
        return _messages(raw_prompt, "raw_prompt")
    info = extra_info or {}
    for key in PROMPT_KEYS:
        if info.get(key) is not None:
            return _messages(info[key], key)
    _warn_once(
        "rmserve reward: no prompt in extra_info (looked for %s): the reward model scores the "
        "answer without the question, and the item is in no GRPO group. Put the chat messages "
        "in extra_info['raw_prompt'] or the question in extra_info['prompt']. (Shown once.)",
        ", ".join(PROMPT_KEYS),
    )
    return []


def reward_info(result: ScoreResult, policy: ErrorPolicy) -> dict[str, Any]:
    """The fixed keys verl gets for one item (a failed one raises, or is flagged)."""
    checked = checked_score(result)
    if isinstance(checked, ItemFailed):
        score, ok, error = policy.reward(checked), False, checked.summary
    else:
        score, ok, error = checked, True, ""
    return {
        "score": score,
        "rmserve_ok": ok,
        "rmserve_error": error,
        "critique": result.critique or "",
        "verdict": result.verdict or "",
        "step_scores": json.dumps(result.step_scores) if result.step_scores else "",
    }


def reward_infos(results: list[ScoreResult], policy: ErrorPolicy) -> list[dict[str, Any]]:
    checked = [(n, checked_score(result)) for n, result in enumerate(results)]
    failures = [(n, failure) for n, failure in checked if isinstance(failure, ItemFailed)]
    if failures and policy.raises:
        index, first = failures[0]
        raise ItemFailed(
            first.type,
            f"{first.message} (item {index}; {len(failures)} of {len(results)} items failed)",
        )
    return [reward_info(result, policy) for result in results]


def loop_scorer(settings: Settings) -> ScoreBatcher:
    """The running event loop's batcher for `settings`' service (replaced, the old one closed
    once it has answered, when the URL or key changes)."""
    scorer = _scorers.get()
    if scorer is not None and (scorer.url, scorer.api_key) == (settings.url, settings.api_key):
        return scorer
    if scorer is not None:
        task = asyncio.get_running_loop().create_task(scorer.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    scorer = ScoreBatcher(settings.url, settings.api_key)
    _scorers.set(scorer)
    return scorer


async def aclose() -> None:
    """Close the running event loop's client (the next call makes a new one)."""
    scorer = _scorers.pop()
    if scorer is not None:
        await scorer.aclose()


def reset() -> None:
    """Close the client of the sync functions' thread and show the missing-prompt warning again."""
    thread = _background.pop()
    if thread is not None:
        thread.close(aclose())
    _warned.clear()


def plain(value: Any) -> Any:
    """JSON-ready: mappings (OmegaConf's too) to dicts, sequences and numpy arrays to lists,
    numpy scalars to Python numbers."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return plain(tolist())
    if isinstance(value, Iterable):
        return [plain(item) for item in value]
    return value


async def _score_all(settings: Settings, items: list[dict[str, Any]]) -> list[ScoreResult]:
    return await loop_scorer(settings).score(settings.model, items, settings.options)


def _messages(prompt: Any, key: str) -> list[Any]:
    """A string is one user turn; a message or a list of messages is used as is."""
    prompt = plain(prompt)
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(message, dict) for message in prompt):
        return prompt
    raise TypeError(f"extra_info[{key!r}] must be a string or a list of chat messages")


def _text(value: Any) -> str:
    value = plain(value)
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _warn_once(message: str, *args: object) -> None:
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning(message, *args)


_scorers: LoopLocal[ScoreBatcher] = LoopLocal()
_closing: set[asyncio.Task[None]] = set()
_background: ProcessLocal[LoopThread] = ProcessLocal(lambda: LoopThread("rmserve-verl"))
_warned: set[str] = set()
_warn_lock = threading.Lock()
