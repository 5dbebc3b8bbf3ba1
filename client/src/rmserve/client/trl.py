"""TRL reward functions that score with an rmserve reward model (`reward_funcs` of GRPOTrainer
and RLOOTrainer; OnlineDPOTrainer takes the sync one).

TRL calls each reward function once per generation batch of the process, with keywords:
`prompts`, `completions`, `completion_ids`, every other dataset column as a list (one entry per
completion) and `trainer_state`, `log_extra`, `log_metric` (and `environments`). The whole call
goes to the service as one `/v1/score` request; each completion becomes one trajectory: the
prompt (a string is a user turn, a list of chat messages is used as given), then the completion
(a string is an assistant turn, a list of messages is appended), with the `reference` (and
optionally the `tests`) from the dataset columns named by `reference_column` / `tests_column`.

Reward integrity: an item the service could not score (timeout, judge parse failure, sandbox
error, missing reference, ...) returns None with `on_error="none"`, never a made-up 0.0. TRL
(1.16) turns None into NaN: the function's metrics leave it out (nanmean), a completion that no
reward function could score is left out of its group's mean and std and gets advantage 0. With
several reward functions, a completion that only some could score keeps the others' rewards: under
TRL's default `multi_objective_aggregation="sum_then_normalize"` the weighted sum skips the NaN
(nansum), so the failed function adds 0 to that completion's reward; `"normalize_then_sum"`
normalizes each function within the group first, so there it adds the group's mean (neutral).
`on_error="raise"` raises UnscoredItemsError instead. A request that fails for good (service down,
unknown model, a malformed item) always raises RewardServiceError, after the client's retries
(429/5xx/timeouts, `Retry-After` honoured).

Nothing here imports TRL or torch: the module works wherever the client is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rmserve.client.client import (
    DEFAULT_URL,
    AsyncRewardClient,
    RewardClient,
    ScoreResult,
    group_of,
)

log = logging.getLogger(__name__)

URL_ENV = "RMSERVE_URL"
OnError = Literal["none", "raise"]
# Batch size meaning "the whole call in one request".
_ONE_REQUEST = 1 << 40
# Attributes not pickled: a process makes its own connection.
_CONNECTION = ("_lock", "_client")


class UnscoredItemsError(RuntimeError):
    """With on_error="raise": items of a call got no score. `results` are all of the call's
    results (in completion order), `failed` the indexes of those without a score."""

    def __init__(self, name: str, results: list[ScoreResult], failed: list[int]) -> None:
        super().__init__(f"{name}: {_failure_summary(results, failed)}")
        self.name, self.results, self.failed = name, results, failed

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its constructor's arguments (a trainer's workers hand it on), not by str().
        return type(self), (self.name, self.results, self.failed), self.__dict__


class _RMServeRewardBase:
    """The configuration and the conversions shared by the sync and the async reward."""

    __name__: str

    def __init__(
        self,
        model: str,
        url: str | None = None,
        *,
        api_key: str | None = None,
        reference_column: str | None = "reference",
        tests_column: str | None = None,
        options: Mapping[str, Any] | None = None,
        on_error: OnError = "none",
        name: str | None = None,
        timeout_s: float = 600,
        max_retries: int = 5,
        max_items_per_request: int | None = None,
        group_size: int | None = None,
    ) -> None:
        if on_error not in ("none", "raise"):
            raise ValueError(f"on_error must be 'none' or 'raise', not {on_error!r}")
        if max_items_per_request is not None and max_items_per_request < 1:
            raise ValueError("max_items_per_request must be at least 1")
        if group_size is not None and group_size < 2:
            raise ValueError("group_size is GRPOConfig.num_generations: 2 or more")
        self.group_size = group_size
        self.model = model
        self.url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.api_key = api_key  # None: the client reads RMSERVE_API_KEY
        self.reference_column, self.tests_column = reference_column, tests_column
        self.options = dict(options) if options is not None else None
        self.on_error: OnError = on_error
        # TRL names the function's metrics after it: rewards/<name>/mean.
        self.__name__ = name or f"rmserve_{model}"
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.max_items_per_request = max_items_per_request
        self._reset()

    def _reset(self) -> None:
        """Forget the connection (a new object, or one just unpickled)."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in _CONNECTION}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, url={self.url!r})"

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "api_key": self.api_key,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "batch_size": self.max_items_per_request or _ONE_REQUEST,
        }

    def _items(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        references = self._column(columns, self.reference_column, len(prompts))
        tests = self._column(columns, self.tests_column, len(prompts))
        items = [
            build_item(prompt, completion, reference=ref, tests=test)
            for prompt, completion, ref, test in zip(
                prompts, completions, references, tests, strict=True
            )
        ]
        return sized(items, self.group_size) if self.group_size else items

    @staticmethod
    def _column(columns: Mapping[str, Any], name: str | None, count: int) -> list[Any]:
        """The dataset column's values, or Nones when no column is named or it is absent."""
        if name is None or columns.get(name) is None:
            return [None] * count
        values = list(columns[name])
        if len(values) != count:
            raise ValueError(f"column {name!r} has {len(values)} values for {count} completions")
        return values

    def _rewards(self, results: list[ScoreResult], kwargs: Mapping[str, Any]) -> list[float | None]:
        rewards = [
            float(r.score) if r.error is None and r.score is not None else None for r in results
        ]
        failed = [index for index, reward in enumerate(rewards) if reward is None]
        _report(self.__name__, results, failed, kwargs)
        if failed:
            if self.on_error == "raise":
                raise UnscoredItemsError(self.__name__, results, failed)
            log.warning(
                "%s: %s; they get None (NaN in TRL: no reward from this function)",
                self.__name__,
                _failure_summary(results, failed),
            )
        return rewards


class RMServeReward(_RMServeRewardBase):
    """A synchronous TRL reward function scored by the rmserve model `model`.

    `reward(prompts=..., completions=..., completion_ids=..., **columns)` returns one reward per
    completion, in order: the model's score, or None for an item the service could not score
    (`on_error="none"`, the default), never a made-up 0.0. TRL excludes None (NaN) from the
    function's statistics and gives a completion no reward function could score advantage 0; see
    the module's doc for a None among several reward functions. `on_error="raise"` raises
    UnscoredItemsError instead. A request that fails for good (service unreachable, unknown
    model) raises RewardServiceError.

    `url` defaults to $RMSERVE_URL, then http://127.0.0.1:8000; `api_key` to $RMSERVE_API_KEY.
    `reference_column` / `tests_column` name the dataset columns sent as the item's `reference`
    and `tests` (None, "" or NaN: none; numbers become text; tests may be JSON text). `options`
    are the request's options. `name` (default `rmserve_<model>`) is the function's `__name__`,
    after which TRL names its metrics (`rewards/<name>/mean`); the number of items without a
    score goes to `rewards/<name>/errors` and each item's error type to the completions table
    column `<name>/error`. Each call is one request unless `max_items_per_request` splits it.

    Thread-safe, picklable (the connection is made again where it is unpickled) and fork-safe.
    """

    _client: tuple[int, RewardClient] | None

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._client = None

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        if not items:
            return []
        results = self.client().score(self.model, items, options=self.options)
        return self._rewards(results, kwargs)

    def client(self) -> RewardClient:
        """This process's client (made on first use, and again after a fork)."""
        with self._lock:
            if self._client is None or self._client[0] != os.getpid():
                self._client = (os.getpid(), RewardClient(self.url, **self._client_kwargs()))
            return self._client[1]

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._client[0] == os.getpid():
                self._client[1].close()
            self._client = None

    def __enter__(self) -> RMServeReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRMServeReward(_RMServeRewardBase):
    """RMServeReward with `async def __call__`, for TRL versions that await async callable
    instances (1.16 does; releases that test only `inspect.iscoroutinefunction(func)`, such as
    1.10, do not: use RMServeReward there). TRL gathers all async reward functions on one event
    loop thread, so several rmserve models score a batch concurrently. Same arguments and
    results as RMServeReward; one client per event loop."""

    _client: tuple[asyncio.AbstractEventLoop, AsyncRewardClient] | None

    def _reset(self) -> None:
        self._client = None

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        if not items:
            return []
        results = await self.client().score(self.model, items, options=self.options)
        return self._rewards(results, kwargs)

    def client(self) -> AsyncRewardClient:
        """The running event loop's client (a new loop gets a new one, the old one is closed
        on its own loop if that still runs)."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client[0] is loop:
            return self._client[1]
        self._drop_client()
        client = AsyncRewardClient(self.url, **self._client_kwargs())
        self._client = (loop, client)
        return client

    async def aclose(self) -> None:
        if self._client is not None and self._client[0] is asyncio.get_running_loop():
            client, self._client = self._client[1], None
            await client.aclose()
        else:
            self._drop_client()

    def _drop_client(self) -> None:
        if self._client is None:
            return
        old_loop, old_client = self._client
        self._client = None
        if old_loop.is_running() and not old_loop.is_closed():
            asyncio.run_coroutine_threadsafe(old_client.aclose(), old_loop)


def sized(items: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Items that say their group's size (num_generations) and carry an id (so that the service
    recognises a resent item): with several processes, each scores its part of a group and the
    service assembles the group for a listwise judge. A prompt met more than `size` times in one
    call (the same prompt sampled twice) is split into groups of `size`, in order."""
    seen: Counter[str] = Counter()
    out = []
    for item in items:
        group = item["group"]
        count = seen[group]
        seen[group] += 1
        name = group if count < size else f"{group}:{count // size}"
        out.append({"id": uuid.uuid4().hex, **item, "group": name, "group_size": size})
    return out


def build_item(
    prompt: Any, completion: Any, *, reference: Any = None, tests: Any = None
) -> dict[str, Any]:
    """The trajectory of one completion, in TRL's standard (strings) or conversational (chat
    messages) format."""
    turns = _messages(prompt, "user", "prompt") + _messages(completion, "assistant", "completion")
    # TRL's num_generations completions of one prompt form one group.
    item: dict[str, Any] = {"messages": _link_tool_calls(turns), "group": group_of(prompt)}
    if (text := _reference_text(reference)) is not None:
        item["reference"] = text
    if (cases := _tests(tests)) is not None:
        item["tests"] = cases
    return item


def _messages(value: Any, role: str, what: str) -> list[dict[str, Any]]:
    """A string is one turn of `role`; a message or a list of messages is copied."""
    value = _plain(value)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        return [dict(message) for message in value]
    raise TypeError(f"a {what} must be a string or a list of chat messages, not {value!r:.200}")


def _link_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's tool loop writes tool calls without `id` and tool results without
    `tool_call_id` (each result answers the next call, in order); the service needs both."""
    pending: list[str] = []
    count = 0
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and isinstance(calls, list):
            linked = []
            for call in calls:
                call = dict(call)
                count += 1
                call.setdefault("id", f"call_{count}")
                pending.append(str(call["id"]))
                linked.append(call)
            message["tool_calls"] = linked
        elif message.get("role") == "tool":
            if "tool_call_id" in message:
                if message["tool_call_id"] in pending:
                    pending.remove(message["tool_call_id"])
            elif pending:
                message["tool_call_id"] = pending.pop(0)
    return messages


def _reference_text(value: Any) -> str | None:
    """None, "" and NaN (a missing value in pandas or Arrow): no reference."""
    value = _plain(value)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, default=str)


def _tests(value: Any) -> list[dict[str, Any]] | None:
    """The code tests: a list of test objects, or its JSON text. Arrow fills a struct's missing
    fields with None; those are dropped."""
    value = _plain(value)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(t, Mapping) for t in value):
        raise TypeError(f"tests must be a list of test objects or its JSON, not {value!r:.200}")
    return [{key: field for key, field in test.items() if field is not None} for test in value]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _failure_summary(results: list[ScoreResult], failed: list[int]) -> str:
    kinds = Counter(_error_type(results[index]) for index in failed)
    first = results[failed[0]]
    detail = first.error.message if first.error else "the model returned no score"
    return (
        f"{len(failed)} of {len(results)} items got no score "
        f"({', '.join(f'{kind}: {count}' for kind, count in kinds.most_common())}); "
        f"first: item {failed[0]}: {detail}"
    )


def _error_type(result: ScoreResult) -> str:
    return result.error.type if result.error is not None else "no_score"


def _report(
    name: str, results: list[ScoreResult], failed: list[int], kwargs: Mapping[str, Any]
) -> None:
    """Through TRL's hooks, when it passes them: the error count as a metric (on every call,
    so that TRL's average is per call) and each item's error type as a completions column."""
    log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
    log_extra: Callable[[str, list[Any]], None] | None = kwargs.get("log_extra")
    if callable(log_metric):
        log_metric(f"rewards/{name}/errors", float(len(failed)))
    if callable(log_extra):
        errors = set(failed)
        log_extra(
            f"{name}/error",
            [_error_type(r) if i in errors else None for i, r in enumerate(results)],
        )
