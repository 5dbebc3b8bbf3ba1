"""OpenRLHF's remote reward model protocol, so `--reward.remote_url http://rmserve:8000/get_reward`
(`--remote_rm_url` before OpenRLHF 0.10.2) works unchanged.

    POST /get_reward?model=&query_format=&on_error=
         {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}
      -> {"rewards": [...], "scores": [...], "extra_logs": {name: [...]}, "errors": [...]}

OpenRLHF sends one sample per request; rewards come back in query order. A query is the actor's
tokens decoded with their special tokens, so it carries the actor's chat template. How it
becomes an item (`query_format`, default RMSERVE_OPENRLHF_QUERY_FORMAT):

  auto   the turns of a known chat template (service/chat_text.py) as messages, which the reward
         model renders with its own template; plain text without one
  plain  the prompt as the user turn, what follows it in the query as the response
  raw    the query scored verbatim, tokenized as is (discriminative models), as OpenRLHF's own
         serve_rm does

A label is any JSON value: "" or null (no reference), a string or number (the reference), a list
(the code tests), an object (item fields). A training run must not learn from made-up rewards,
so an item that cannot be scored never becomes a number silently (`on_error`): `fail` (default)
fails the request (422 naming `query[i]`, or 503 when the service cannot serve); `report`
answers null rewards and an `errors` entry for it; a number is its reward, flagged in
`extra_logs["rmserve_error"]`. A request that cannot be served at all (unknown model, a model
still loading, overload, a malformed label: service/openrlhf_labels.py) is an HTTP error
whatever `on_error` says.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from rmserve.service.auth import Admit, ApiKey, Caller
from rmserve.service.chat_text import ChatTextError, parse_query
from rmserve.service.config import Settings
from rmserve.service.openrlhf_labels import first_error, label_fields
from rmserve.service.protocol import ItemErrorBody, ItemResult, ScoreOptions, ScoreRequest
from rmserve.service.scoring import ScoringService
from rmserve.web.errors import Unavailable, UnprocessableEntity
from rmserve.wire.errors import ErrorBody
from rmserve.wire.trajectory import Trajectory

log = logging.getLogger(__name__)

QueryFormat = Literal["auto", "plain", "raw"]
OnError = Literal["fail", "report"] | float

_SERVER_SIDE = {"timeout", "unavailable", "dead_lettered", "internal_error", "peer_unavailable"}


class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenRLHF versions add fields over time

    # Empty: OpenRLHF 0.11 splits each one-sample request over all the URLs it is given, so
    # every server but the first gets empty lists (openrlhf/utils/agent.py:329-336).
    query: list[str] = Field(description="prompt + response, one per sample")
    prompts: list[str] | None = Field(default=None, description="the prompt of each query")
    labels: list[JsonValue] | None = Field(
        default=None,
        description='per query: "" or null (no reference), a string or number (the '
        "reference), a list (code tests), an object (reference, tests, documents, metadata)",
    )

    @model_validator(mode="after")
    def _aligned(self) -> RewardRequest:
        for field in ("prompts", "labels"):
            values = getattr(self, field)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{field} has {len(values)} entries for {len(self.query)} queries")
        return self


class RewardResponse(BaseModel):
    rewards: list[float | None]
    scores: list[float | None]
    # One number per query for each name (OpenRLHF logs the first of each list per sample).
    extra_logs: dict[str, list[float]]
    # Per query: null, or why it was not scored (its reward is then null or `on_error`).
    errors: list[ItemErrorBody | None]


@dataclass
class _Outcome:
    """Per query: its result, or why it could not be scored."""

    results: list[ItemResult | None]
    errors: list[ItemErrorBody | None]


def add_openrlhf_route(
    app: FastAPI, scoring: ScoringService, settings: Settings, admit: Admit
) -> None:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)
    }
    warned: set[str] = set()

    @app.post(
        "/get_reward", response_model=RewardResponse, responses=errors, tags=["compatibility"]
    )
    async def get_reward(
        request: RewardRequest,
        key: Caller,
        model: str | None = None,
        query_format: QueryFormat | None = None,
        on_error: str = "fail",
    ) -> RewardResponse:
        """OpenRLHF remote reward model (`--reward.remote_url`, `--remote_rm_url` before
        0.10.2). `query_format`: auto, plain or raw; `on_error`: fail, report or a number."""
        name = model or settings.openrlhf_model
        if not name:
            raise UnprocessableEntity(
                "no model: set RMSERVE_OPENRLHF_MODEL or add ?model=NAME to the URL", param="model"
            )
        policy = parse_on_error(on_error)
        if not request.query:  # nothing to score, and no reason to fail the trainer's request
            return respond(_Outcome(results=[], errors=[]), policy)
        how = query_format or settings.openrlhf_query_format
        items, parse_errors = request_items(request, how, warned)
        if policy == "fail":
            fail_on_errors(parse_errors)  # before any work is done
        outcome = await _score(scoring, admit, key, name, how, items, parse_errors)
        if policy == "fail":
            fail_on_errors(outcome.errors)
        return respond(outcome, policy)


def parse_on_error(value: str) -> OnError:
    if value in ("fail", "report"):
        return "fail" if value == "fail" else "report"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UnprocessableEntity(
            f"on_error must be fail, report or a finite number (the reward of a query that "
            f"cannot be scored), not {value!r}",
            param="on_error",
        )
    return number


def request_items(
    request: RewardRequest, how: QueryFormat, warned: set[str]
) -> tuple[list[Trajectory | None], list[ItemErrorBody | None]]:
    """Per query: its item, or why it cannot become one (a malformed label: 422 at once)."""
    n = len(request.query)
    prompts = request.prompts or [""] * n
    fields = [label_fields(label, i) for i, label in enumerate(request.labels or [None] * n)]
    built = [
        query_item(query, prompt, item_fields, how, warned)
        for query, prompt, item_fields in zip(request.query, prompts, fields, strict=True)
    ]
    return [item for item, _ in built], [error for _, error in built]


def query_item(
    query: str, prompt: str, fields: dict[str, Any], how: QueryFormat, warned: set[str]
) -> tuple[Trajectory | None, ItemErrorBody | None]:
    """The item a query becomes, or why it cannot become one."""
    if prompt and "group" not in fields:  # the samples of one prompt form a group
        fields = {**fields, "group": hashlib.sha256(prompt.encode()).hexdigest()[:32]}
    if how == "raw":
        messages = [{"role": "user", "content": query}]
    else:
        try:
            parsed = parse_query(query, prompt, templates=how == "auto")
        except ChatTextError as exc:
            hint = "; send it as ?query_format=raw or plain to score it as text"
            return None, ItemErrorBody(type="invalid_query", message=f"{exc}{hint}")
        if parsed.unmatched_prompt and "prompt" not in warned:
            warned.add("prompt")  # once: every sample of a run would say the same
            log.warning(
                "a query neither starts with its prompt nor with the prompt's end; the whole "
                "query is scored as the response to the prompt (are `prompts` the text the "
                "actor saw?)"
            )
        messages = [message.as_dict() for message in parsed.messages]
    try:
        return Trajectory.model_validate({"messages": messages, **fields}), None
    except ValidationError as exc:
        return None, ItemErrorBody(type="invalid_query", message=first_error(exc))


async def _score(
    scoring: ScoringService,
    admit: Admit,
    key: ApiKey,
    name: str,
    how: QueryFormat,
    items: Sequence[Trajectory | None],
    errors: list[ItemErrorBody | None],
) -> _Outcome:
    """Score the items that parsed; the others keep their error."""
    indices = [i for i, item in enumerate(items) if item is not None]
    results: list[ItemResult | None] = [None] * len(items)
    if not indices:
        return _Outcome(results, errors)
    request = ScoreRequest(
        model=name,
        items=[item for item in items if item is not None],
        options=ScoreOptions(render="raw" if how == "raw" else "chat_template"),
    )
    async with await admit(key, [name], len(indices)):
        try:
            scored = await scoring.score(request)
        except UnprocessableEntity as exc:
            if exc.param != "options.render":
                raise
            raise UnprocessableEntity(
                f"query_format=raw: {exc.message}", param="query_format"
            ) from None
    errors = list(errors)
    for result in scored.results:
        index = indices[result.index]
        results[index] = result
        errors[index] = result.error or _no_score(result)
    return _Outcome(results, errors)


def _no_score(result: ItemResult) -> ItemErrorBody | None:
    if result.score is not None:
        return None
    return ItemErrorBody(
        type="no_score",
        message="the model gave no score (a pairwise judge gives a verdict); /get_reward needs "
        "a model that scores one response",
    )


def fail_on_errors(errors: Sequence[ItemErrorBody | None]) -> None:
    """policy `fail`: a query not scored fails the request (503 when only the service is to
    blame, so that a retry may succeed; 422 otherwise)."""
    failed = [(i, error) for i, error in enumerate(errors) if error is not None]
    if not failed:
        return
    problems = "; ".join(f"query[{i}]: {e.type}: {e.message}" for i, e in failed)
    message = f"{len(failed)} queries not scored: {problems}"
    if all(error.type in _SERVER_SIDE for _, error in failed):
        raise Unavailable(message)
    raise UnprocessableEntity(message, param="query")


def respond(outcome: _Outcome, policy: OnError) -> RewardResponse:
    fallback = None if isinstance(policy, str) else policy
    rewards = [
        result.score if result is not None and error is None else fallback
        for result, error in zip(outcome.results, outcome.errors, strict=True)
    ]
    usage = [result.usage if result is not None else None for result in outcome.results]
    return RewardResponse(
        rewards=rewards,
        scores=rewards,
        extra_logs={
            "rmserve_error": [float(error is not None) for error in outcome.errors],
            "prompt_tokens": [float(u.prompt_tokens) if u else 0.0 for u in usage],
            "truncated_tokens": [float(u.truncated_tokens) if u else 0.0 for u in usage],
        },
        errors=outcome.errors,
    )
