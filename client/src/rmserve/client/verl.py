"""verl custom reward functions that score with an rmserve reward model.

Config (env): RMSERVE_MODEL (required), RMSERVE_URL (default http://127.0.0.1:8000),
RMSERVE_API_KEY. verl's `reward_kwargs` may pass `model` and `options` (the request's options)
instead. `compute_score` suits the naive/prime reward managers, `compute_score_batch` the batch
one. An item the service could not score gets 0.0 and a warning (verl needs a number for every
item); a request that fails for good (service down, unknown model) raises, so a broken reward
never passes silently as zeros.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from rmserve.client.client import DEFAULT_URL, RewardClient, ScoreResult

log = logging.getLogger(__name__)
ERROR_SCORE = 0.0

_lock = threading.Lock()
_shared: tuple[tuple[int, str, str | None], RewardClient] | None = None


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """The reward of one solution: the model's score, or 0.0 when the item errored."""
    return compute_score_batch(
        [data_source], [solution_str], [ground_truth], [extra_info], **kwargs
    )[0]


def compute_score_batch(
    data_sources: Iterable[str],
    solution_strs: Iterable[str],
    ground_truths: Iterable[Any],
    extra_infos: Iterable[dict[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Rewards of a batch, in order (verl's batch reward manager); sent in batches of 64."""
    sources, solutions, truths = list(data_sources), list(solution_strs), list(ground_truths)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(sources)
    if not len(sources) == len(solutions) == len(truths) == len(infos):
        raise ValueError(
            "data_sources, solution_strs, ground_truths and extra_infos differ in length"
        )
    items = [build_item(*fields) for fields in zip(sources, solutions, truths, infos, strict=True)]
    results = shared_client().score(_model(kwargs), items, options=kwargs.get("options"))
    return _rewards(results)


def build_item(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The trajectory: the prompt's turns (extra_info["prompt"]), then the solution."""
    messages = _prompt_messages((extra_info or {}).get("prompt"))
    messages.append({"role": "assistant", "content": solution_str})
    item: dict[str, Any] = {"messages": messages, "metadata": {"data_source": data_source}}
    if ground_truth is not None:
        item["reference"] = _text(ground_truth)
    return item


def shared_client() -> RewardClient:
    """The process's client (lazy; made again after a fork or when the env changes)."""
    global _shared
    key = (
        os.getpid(),
        os.environ.get("RMSERVE_URL", DEFAULT_URL),
        os.environ.get("RMSERVE_API_KEY"),
    )
    with _lock:
        if _shared is None or _shared[0] != key:
            if _shared is not None and _shared[0][0] == key[0]:
                _shared[1].close()
            _shared = (key, RewardClient(key[1], api_key=key[2]))
        return _shared[1]


def reset_client() -> None:
    """Close the shared client (the next call makes a new one)."""
    global _shared
    with _lock:
        if _shared is not None and _shared[0][0] == os.getpid():
            _shared[1].close()
        _shared = None


def _model(kwargs: Mapping[str, Any]) -> str:
    model = kwargs.get("model") or os.environ.get("RMSERVE_MODEL")
    if not model:
        raise RuntimeError(
            "rmserve reward: set RMSERVE_MODEL to the reward model's name "
            "(GET /v1/models on the service lists them)"
        )
    return str(model)


def _prompt_messages(prompt: object) -> list[dict[str, Any]]:
    """A string is one user turn; a message or a list of messages is used as is."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        return [dict(prompt)]
    if isinstance(prompt, Iterable):  # list, tuple, numpy array of dicts
        messages = list(prompt)
        if all(isinstance(message, Mapping) for message in messages):
            return [dict(message) for message in messages]
    raise TypeError("extra_info['prompt'] must be a string or a list of chat messages")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    tolist = getattr(value, "tolist", None)  # numpy values
    return json.dumps(tolist() if callable(tolist) else value, default=str)


def _rewards(results: list[ScoreResult]) -> list[float]:
    failed = [result for result in results if result.error is not None or result.score is None]
    if failed:
        kinds = Counter(result.error.type if result.error else "no_score" for result in failed)
        first = failed[0]
        log.warning(
            "rmserve: %d of %d items got no score, rewarded %s (%s); first: item %d: %s",
            len(failed),
            len(results),
            ERROR_SCORE,
            ", ".join(f"{kind}: {count}" for kind, count in kinds.most_common()),
            first.index,
            first.error.message if first.error else "the model returned no score",
        )
    return [ERROR_SCORE if r.error or r.score is None else float(r.score) for r in results]
