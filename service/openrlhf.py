"""OpenRLHF's remote reward model protocol, so `--reward.remote_url http://rmserve:8000/get_reward`
(`--remote_rm_url` before OpenRLHF 0.10.2) works unchanged.

    POST /get_reward?model=&query_format=&on_error=
         {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...],
          "on_error": "report" (optional: a client that reads `errors`)}
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
fails the request (422 naming `query[i]`, or 503 when the service cannot serve); a number is its
reward, flagged in `extra_logs["rmserve_error"]`; `report` answers null rewards and an `errors`
entry for it, for clients that read `errors` (rmserve.client.openrlhf), so only in the body:
OpenRLHF, which controls only the URL, turns each reward into a tensor and crashes on a null one,
so `?on_error=report` is a 422 saying so. A request that cannot be served at all (unknown model, a
model still loading, overload, a malformed label: service/openrlhf_labels.py) is an HTTP error
whatever `on_error` says.

OpenRLHF logs a failed request's status line only, never its body, so every failure of this route
(the error body: status, type, param, message) and every item answered with `on_error` instead of
a score is logged here at WARNING. Messages name fields and causes, never keys; quoted sample text
is at most a short excerpt, and a line at most MAX_LOGGED_CHARS.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from rmserve.service.auth import Admit, ApiKey, Caller
from rmserve.service.chat_text import ChatTextError, parse_query
from rmserve.service.config import Settings
from rmserve.service.openrlhf_labels import first_error, label_fields
from rmserve.service.protocol import ItemErrorBody, ItemResult, ScoreOptions, ScoreRequest
from rmserve.service.scoring import ScoringService
from rmserve.web.errors import ApiError, Unavailable, UnprocessableEntity, validation_error
from rmserve.wire.errors import ErrorBody, ErrorDetail
from rmserve.wire.trajectory import Trajectory

log = logging.getLogger(__name__)

QueryFormat = Literal["auto", "plain", "raw"]
OnError = Literal["fail", "report"] | float

_SERVER_SIDE = {"timeout", "unavailable", "dead_lettered", "internal_error", "peer_unavailable"}
MAX_LOGGED_CHARS = 500  # of a logged error message
NO_NULL_REWARDS = (
    "on_error=report answers null rewards, which OpenRLHF cannot take (it turns each reward into "
    "a tensor: 'Could not infer dtype of NoneType'); on the URL use fail (the default: the "
    "request fails with the cause) or a number (the reward of a query that cannot be scored, "
    'flagged in extra_logs["rmserve_error"]). A client that reads `errors` asks for report in '
    'the body: {"on_error": "report"}'
)


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
    # Not from OpenRLHF (it sends only the fields above): a client that reads `errors`.
    on_error: Literal["report"] | None = Field(
        default=None,
        description="report: null rewards and an `errors` entry for queries not scored (for "
        "clients that read `errors`; OpenRLHF cannot take a null reward)",
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
    router = APIRouter(route_class=LoggedFailuresRoute)

    @router.post(
        "/get_reward", response_model=RewardResponse, responses=errors, tags=["compatibility"]
    )
    async def get_reward(
        request: RewardRequest,
        key: Caller,
        model: str | None = None,
        query_format: QueryFormat | None = None,
        on_error: str | None = None,
        group_size: int | None = Query(default=None, ge=2, le=4096),
    ) -> RewardResponse:
        """OpenRLHF remote reward model (`--reward.remote_url`, `--remote_rm_url` before
        0.10.2). `query_format`: auto, plain or raw; `on_error`: fail or a number (`report`
        only in the body: OpenRLHF cannot take a null reward); `group_size`: OpenRLHF's
        n_samples_per_prompt, so that a listwise judge sees each prompt's samples together."""
        policy = request_policy(on_error, request.on_error)
        name = model or settings.openrlhf_model
        if not name:
            raise UnprocessableEntity(
                "no model: set RMSERVE_OPENRLHF_MODEL or add ?model=NAME to the URL", param="model"
            )
        if not request.query:  # nothing to score, and no reason to fail the trainer's request
            return respond(_Outcome(results=[], errors=[]), policy)
        how = query_format or settings.openrlhf_query_format
        size = group_size or settings.openrlhf_group_size
        items, parse_errors = request_items(request, how, warned, size)
        if policy == "fail":
            fail_on_errors(parse_errors)  # before any work is done
        outcome = await _score(scoring, admit, key, name, how, items, parse_errors)
        if policy == "fail":
            fail_on_errors(outcome.errors)
        log_unscored(outcome.errors, policy)
        return respond(outcome, policy)

    app.include_router(router)


class LoggedFailuresRoute(APIRoute):
    """A route whose failures (its typed errors, its requests that fail validation or
    authentication) are logged at WARNING with the error body the client gets."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def logged(request: Request) -> Response:
            try:
                return await handle(request)
            except ApiError as exc:
                log_failure(
                    exc.status, ErrorDetail(type=exc.type, message=exc.message, param=exc.param)
                )
                raise
            except RequestValidationError as exc:
                log_failure(*validation_error(exc.errors()))
                raise

        return logged


def log_failure(status: int, error: ErrorDetail) -> None:
    param = f" (param {error.param})" if error.param else ""
    log.warning(
        "/get_reward answered %d %s%s: %s",
        status,
        error.type,
        param,
        excerpt(error.message),
        extra={"status": status, "error_type": error.type, "param": error.param},
    )


def log_unscored(errors: Sequence[ItemErrorBody | None], policy: OnError) -> None:
    """Each query answered with `policy` instead of a score, at WARNING."""
    reward = "null" if policy == "report" else str(policy)
    for index, error in enumerate(errors):
        if error is not None:
            log.warning(
                "/get_reward query[%d] not scored, answered with reward %s (on_error): %s: %s",
                index,
                reward,
                error.type,
                excerpt(error.message),
                extra={"status": 200, "error_type": error.type, "param": f"query[{index}]"},
            )


def excerpt(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def request_policy(url: str | None, body: Literal["report"] | None) -> OnError:
    """`on_error` from the URL (OpenRLHF's: fail or a number) or the body (report)."""
    if body is None:
        return parse_on_error(url or "fail")
    if url is not None:
        raise UnprocessableEntity(
            "on_error is given both in the URL and in the body; give it once", param="on_error"
        )
    return body


def parse_on_error(value: str) -> OnError:
    """The URL's `on_error`: fail or a finite number; report is refused (NO_NULL_REWARDS)."""
    if value == "fail":
        return "fail"
    if value == "report":
        raise UnprocessableEntity(NO_NULL_REWARDS, param="on_error")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UnprocessableEntity(
            f"on_error must be fail or a finite number (the reward of a query that cannot be "
            f"scored), not {excerpt(value, 40)!r}",
            param="on_error",
        )
    return number


def request_items(
    request: RewardRequest, how: QueryFormat, warned: set[str], group_size: int | None = None
) -> tuple[list[Trajectory | None], list[ItemErrorBody | None]]:
    """Per query: its item, or why it cannot become one (a malformed label: 422 at once)."""
    n = len(request.query)
    prompts = request.prompts or [""] * n
    fields = [label_fields(label, i) for i, label in enumerate(request.labels or [None] * n)]
    built = [
        query_item(query, prompt, item_fields, how, warned, group_size)
        for query, prompt, item_fields in zip(request.query, prompts, fields, strict=True)
    ]
    return [item for item, _ in built], [error for _, error in built]


def query_item(
    query: str,
    prompt: str,
    fields: dict[str, Any],
    how: QueryFormat,
    warned: set[str],
    group_size: int | None = None,
) -> tuple[Trajectory | None, ItemErrorBody | None]:
    """The item a query becomes, or why it cannot become one. The samples of one prompt form
    a group, of `group_size` (n_samples_per_prompt) when given."""
    if prompt and "group" not in fields:
        fields = {**fields, "group": hashlib.sha256(prompt.encode()).hexdigest()[:32]}
        if group_size is not None and "group_size" not in fields:
            fields["group_size"] = group_size
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
            scored = await scoring.score(request, scope=key.name)
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
