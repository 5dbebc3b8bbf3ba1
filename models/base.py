"""What every reward model kind offers the worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rmserve.models.spec import Aggregate
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory, has_images

# How a discriminative model turns an item into tokens: its chat template (the default), or the
# text of the item's messages, concatenated and tokenized as is (no template, no special tokens
# added), the way OpenRLHF's serve_rm scores its queries.
Render = Literal["chat_template", "raw"]


@dataclass(frozen=True)
class RequestOptions:
    """Per-request choices that override the model's registry options (checked against the
    model's limits by the gateway)."""

    aggregate: Aggregate | None = None
    # Generative judges.
    samples: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    return_samples: bool = False
    # False: aggregate every judgement even though the model has a meta reward model.
    meta_filter: bool = True
    # When the client stops waiting (time.time()); bounds calls to other models.
    deadline: float | None = None
    # Agentic judges: the tools this request allows (None: the model's), and turns.
    tools: tuple[str, ...] | None = None
    max_tool_turns: int | None = None
    # Discriminative models: chat template or raw text (the gateway refuses raw for others).
    render: Render = "chat_template"


@dataclass(frozen=True)
class Sample:
    """One judgement of a generative judge (returned when the request asks for samples)."""

    text: str
    completion_tokens: int
    score: float | None = None
    # Pairwise: the chosen candidate's index (in the item's order) and the order shown.
    choice: int | None = None
    order: list[int] | None = None
    # Listwise: each candidate's score in the item's order (None: this judgement gave none).
    scores: list[float | None] | None = None
    # Why the judgement did not parse (parse_error), when it did not.
    error: str | None = None
    # Meta reward model filtering: the judgement's rating, and whether it was aggregated.
    meta_score: float | None = None
    kept: bool | None = None


@dataclass(frozen=True)
class Evidence:
    """One tool call of an agentic judge: which judgement and turn, the arguments as the judge
    wrote them (a string when they were not a JSON object), and the sandbox's result."""

    sample: int
    turn: int
    arguments: dict[str, Any] | str
    result: Any  # rmserve.wire.tools.ToolResult


@dataclass(frozen=True)
class Reward:
    score: float
    # All head outputs when the head has several labels (multi-aspect reward models), or one
    # score per candidate (None: a listwise judge gave that candidate no score).
    scores: list[float | None] | None = None
    # Process reward models: one score per step; None for a step cut off by truncation.
    step_scores: list[float | None] | None = None
    prompt_tokens: int = 0
    truncated_tokens: int = 0
    # Generative judges: the verdict ("A", "B", ... pairwise), the critique, tokens generated,
    # and each judgement when asked for.
    verdict: str | None = None
    critique: str | None = None
    completion_tokens: int = 0
    samples: list[Sample] | None = None
    # Agentic judges: every tool call, in order.
    evidence: list[Evidence] | None = None
    # Composite rewards: each input model's reward.
    components: dict[str, float] | None = None


class PeerScorer(Protocol):
    """Scores items with another model of the registry, served by its own workers (a judge's
    meta reward model; composite rewards)."""

    async def score(self, model: str, items: Sequence[Trajectory], deadline: float) -> list[float]:
        """One score per item, in order; raise ItemError when any item cannot be scored or the
        model cannot serve (naming the model and the reason)."""
        ...


class RewardModel(Protocol):
    name: str
    kind: str
    max_model_len: int

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        """Score one item; raise ItemError when this item cannot be scored."""
        ...

    def shutdown(self) -> None: ...


def require_text_only(item: Trajectory, model_name: str) -> None:
    """Checks of the discriminative and process kinds: one response, text only."""
    if item.candidates:
        raise ItemError(
            "unsupported_content",
            f"model {model_name!r} scores one response per item; `candidates` needs a "
            "generative judge in pairwise or listwise mode",
        )
    if has_images(item):
        raise ItemError(
            "unsupported_content",
            f"model {model_name!r} scores text only, but the item has image_url parts",
        )
