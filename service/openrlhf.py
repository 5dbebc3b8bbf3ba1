"""OpenRLHF's remote reward model protocol, so `--remote_rm_url http://rmserve:8000/get_reward`
works unchanged.

    POST /get_reward {"query": [prompt + response, ...], "prompts": [prompt, ...],
                      "labels": [reference, ...]}      (prompts and labels optional)
      -> {"rewards": [...], "scores": [...], "extra_logs": {...}}

Each query becomes one item: the prompt as the user turn and the rest of the query (what follows
the prompt) as the assistant's response, the label as `reference`. It is scored by the model
`RMSERVE_OPENRLHF_MODEL` (or `?model=` on the URL). Rewards come back in query order. A training
run must not learn from made-up rewards, so an item that cannot be scored fails the request
(422 naming the item and why, or 503 when the model cannot serve) instead of getting a default.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.service.auth import Admit, Caller
from rmserve.service.config import Settings
from rmserve.service.protocol import ScoreRequest
from rmserve.service.scoring import ScoringService
from rmserve.web.errors import Unavailable, UnprocessableEntity
from rmserve.wire.errors import ErrorBody

_SERVER_SIDE = {"timeout", "unavailable", "dead_lettered", "internal_error", "peer_unavailable"}


class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenRLHF versions add fields over time

    query: list[str] = Field(min_length=1, description="prompt + response, one per sample")
    prompts: list[str] | None = Field(default=None, description="the prompt of each query")
    labels: list[str | None] | None = Field(default=None, description="references")

    @model_validator(mode="after")
    def _aligned(self) -> RewardRequest:
        for field in ("prompts", "labels"):
            values = getattr(self, field)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{field} has {len(values)} entries for {len(self.query)} queries")
        return self


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[Any]]


def add_openrlhf_route(
    app: FastAPI, scoring: ScoringService, settings: Settings, admit: Admit
) -> None:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)
    }

    @app.post(
        "/get_reward", response_model=RewardResponse, responses=errors, tags=["compatibility"]
    )
    async def get_reward(
        request: RewardRequest, key: Caller, model: str | None = None
    ) -> RewardResponse:
        """OpenRLHF remote reward model (`--remote_rm_url`)."""
        name = model or settings.openrlhf_model
        if not name:
            raise UnprocessableEntity(
                "no model: set RMSERVE_OPENRLHF_MODEL or add ?model=NAME to the URL", param="model"
            )
        prompts = request.prompts or [""] * len(request.query)
        labels = request.labels or [None] * len(request.query)
        items = [
            _item(query, prompt, label)
            for query, prompt, label in zip(request.query, prompts, labels, strict=True)
        ]
        async with await admit(key, [name], len(items)):
            scored = await scoring.score(
                ScoreRequest.model_validate({"model": name, "items": items})
            )
        failed = [result for result in scored.results if result.error is not None]
        if failed:
            problems = "; ".join(
                f"query[{r.index}]: {r.error.type}: {r.error.message}" for r in failed if r.error
            )
            if all(r.error and r.error.type in _SERVER_SIDE for r in failed):
                raise Unavailable(f"{len(failed)} queries not scored: {problems}")
            raise UnprocessableEntity(
                f"{len(failed)} queries not scored: {problems}", param="query"
            )
        rewards = [float(result.score or 0.0) for result in scored.results]
        return RewardResponse(
            rewards=rewards,
            scores=rewards,
            extra_logs={"prompt_tokens": [r.usage.prompt_tokens for r in scored.results]},
        )


def _item(query: str, prompt: str, label: str | None) -> dict[str, Any]:
    response = query[len(prompt) :] if prompt and query.startswith(prompt) else query
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, "reference": label}
