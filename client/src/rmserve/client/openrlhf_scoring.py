"""The implementation of `rmserve.client.openrlhf` (see there). It lives apart because OpenRLHF
loads the reward file by path as a fresh module outside sys.modules: the file only re-exports, so
the classes and the process's background loop here are imported, and shared, the ordinary way."""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from rmserve.client.batching import LoopThread, MicroBatcher, ProcessLocal
from rmserve.client.client import (
    API_KEY_ENV,
    DEFAULT_URL,
    AsyncRewardClient,
    RewardServiceError,
)
from rmserve.client.policy import ON_ERROR_ENV, ErrorPolicy, ItemFailed

ERROR_LOG = "rmserve_error"
_SAMPLE = re.compile(r"^(?:labels|query|prompts)\[(\d+)\]")


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    model: str | None
    policy: ErrorPolicy
    # RMSERVE_GROUP_SIZE: n_samples_per_prompt, so that the service assembles each prompt's
    # samples, sent in pieces, before a listwise judge compares them (`?group_size=`).
    group_size: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        size = os.environ.get("RMSERVE_GROUP_SIZE") or None
        if size is not None and not (size.isdigit() and int(size) >= 2):
            raise ValueError(f"RMSERVE_GROUP_SIZE must be an integer of 2 or more, not {size!r}")
        return cls(
            url=os.environ.get("RMSERVE_URL") or DEFAULT_URL,
            api_key=os.environ.get(API_KEY_ENV) or None,
            model=os.environ.get("RMSERVE_MODEL") or None,
            policy=ErrorPolicy.from_env(os.environ.get(ON_ERROR_ENV)),
            group_size=int(size) if size is not None else None,
        )


@dataclass(frozen=True)
class Sample:
    query: str
    prompt: str
    label: Any


@dataclass(frozen=True)
class Answer:
    """The service's answer for one sample: a reward, or why there is none."""

    reward: float | None
    score: float | None
    logs: dict[str, float]
    error: ItemFailed | None = None
    rejected: RewardServiceError | None = None  # the request was refused for this sample


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]) -> Any:
    """OpenRLHF's reward function: `{"rewards", "scores", "extra_logs"}`, plain lists in
    sample order (OpenRLHF turns each into a tensor itself)."""
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError("queries, prompts and labels differ in length")
    settings = Settings.from_env()
    samples = [Sample(*fields) for fields in zip(queries, prompts, labels, strict=True)]
    service = _service.get()
    answers = service.thread.run(service.endpoint(settings).score(samples))
    return rewards(answers, settings.policy)


def rewards(answers: Sequence[Answer], policy: ErrorPolicy) -> dict[str, Any]:
    """The return value for OpenRLHF; a failed sample raises or gets the error score, flagged."""
    values: list[float] = []
    scores: list[float] = []
    logs: dict[str, list[float]] = {ERROR_LOG: []}
    for answer in answers:
        if answer.rejected is not None:
            raise answer.rejected
        if answer.error is not None or answer.reward is None:
            failure = answer.error or ItemFailed("no_score", "the service sent no reward")
            reward = score = policy.reward(failure)
        else:
            reward = answer.reward
            score = answer.score if answer.score is not None else answer.reward
        values.append(reward)
        scores.append(score)
        logs[ERROR_LOG].append(float(answer.error is not None))
        for name, value in answer.logs.items():
            if name != ERROR_LOG:
                logs.setdefault(name, []).append(value)
    return {"rewards": values, "scores": scores, "extra_logs": logs}


class Endpoint:
    """POST /get_reward of one service and model, samples coalesced; `"on_error": "report"` in
    the body (the service answers a null reward and the error of a sample it cannot score)."""

    def __init__(self, settings: Settings) -> None:
        params = {"model": settings.model, "group_size": settings.group_size}
        query = urlencode({k: v for k, v in params.items() if v is not None})
        self.path = f"/get_reward?{query}" if query else "/get_reward"
        self.client = AsyncRewardClient(settings.url, api_key=settings.api_key)
        self._batcher: MicroBatcher[None, Sample, Answer] = MicroBatcher(
            lambda _, samples: self.post(samples), max_batch=self.client.settings.batch_size
        )

    async def score(self, samples: list[Sample]) -> list[Answer]:
        return list(await asyncio.gather(*(self._batcher.submit(None, s) for s in samples)))

    async def post(self, samples: list[Sample]) -> list[Answer]:
        """One request for `samples`; a sample the service refuses is answered with the
        refusal and the others are sent again."""
        answers: list[Answer | None] = [None] * len(samples)
        remaining = list(range(len(samples)))
        while remaining:
            try:
                got = await self._post([samples[i] for i in remaining])
            except RewardServiceError as exc:
                refused = _refused_sample(exc, len(remaining))
                if refused is None:
                    raise
                answers[remaining.pop(refused)] = Answer(None, None, {}, rejected=exc)
                continue
            for index, answer in zip(remaining, got, strict=True):
                answers[index] = answer
            remaining = []
        return [answer for answer in answers if answer is not None]

    async def aclose(self) -> None:
        try:
            await self._batcher.drain()
        finally:
            await self.client.aclose()

    async def _post(self, samples: list[Sample]) -> list[Answer]:
        body = {
            "query": [s.query for s in samples],
            "prompts": [s.prompt for s in samples],
            "labels": [s.label for s in samples],
            "on_error": "report",
        }
        response = await self.client.post(self.path, body)
        try:
            payload = response.json()
        except ValueError:
            raise _protocol_error(f"answer is not JSON: {response.text[:200]!r}") from None
        return _answers(payload, len(samples))


class _Service:
    """The process's background loop and its endpoints (one per settings)."""

    def __init__(self) -> None:
        self.thread = LoopThread("rmserve-openrlhf")
        self._endpoints: dict[tuple[str, str | None, str | None], Endpoint] = {}
        self._lock = threading.Lock()

    def endpoint(self, settings: Settings) -> Endpoint:
        key = (settings.url, settings.api_key, settings.model)
        with self._lock:
            if key not in self._endpoints:
                self._endpoints[key] = Endpoint(settings)
            return self._endpoints[key]

    async def aclose(self) -> None:
        with self._lock:
            endpoints, self._endpoints = list(self._endpoints.values()), {}
        for endpoint in endpoints:
            await endpoint.aclose()


def reset() -> None:
    """Close the process's connections and background loop (the next call makes new ones)."""
    service = _service.pop()
    if service is not None:
        service.thread.close(service.aclose())


def _answers(payload: Any, count: int) -> list[Answer]:
    if not isinstance(payload, dict) or not isinstance(payload.get("rewards"), list):
        raise _protocol_error("answer has no `rewards` list")
    rewards_, scores = payload["rewards"], payload.get("scores") or payload["rewards"]
    errors = payload.get("errors") or [None] * count
    logs = payload.get("extra_logs") or {}
    if not len(rewards_) == len(scores) == len(errors) == count:
        raise _protocol_error(f"answer does not have {count} rewards, scores and errors")
    return [
        Answer(
            reward=_number(rewards_[i]),
            score=_number(scores[i]),
            logs={name: float(values[i]) for name, values in logs.items() if len(values) == count},
            error=_failure(errors[i]),
        )
        for i in range(count)
    ]


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _protocol_error(f"a reward is not a finite number: {value!r}")
    return float(value)


def _failure(error: Any) -> ItemFailed | None:
    if error is None:
        return None
    if not isinstance(error, dict):
        raise _protocol_error(f"malformed error entry: {error!r}")
    return ItemFailed(str(error.get("type") or "error"), str(error.get("message") or ""))


def _refused_sample(error: RewardServiceError, count: int) -> int | None:
    """The sample a 422 blames (`labels[i]`, `query[i]`), when it blames exactly one."""
    match = _SAMPLE.match(error.param or "") if error.status == 422 else None
    index = int(match.group(1)) if match else None
    return index if index is not None and index < count else None


def _protocol_error(message: str) -> RewardServiceError:
    return RewardServiceError(200, "protocol_error", message)


_service: ProcessLocal[_Service] = ProcessLocal(_Service)
