"""Wire models of the HTTP API (request and response bodies)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rmserve.models.base import Render
from rmserve.models.spec import Aggregate
from rmserve.wire.tools import ToolErrorBody, ToolOutput
from rmserve.wire.trajectory import Trajectory


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeOptions(_Request):
    """Per-request overrides for generative judges, within the model's limits."""

    samples: int | None = Field(
        default=None, ge=1, description="judgements per item, combined by the model's aggregate"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    return_samples: bool = Field(default=False, description="include every judgement")
    tools: list[str] | None = Field(
        default=None,
        description="agentic judges: the tools this request allows, a subset of the model's "
        "(default: all of the model's; [] judges without tools)",
    )
    max_tool_turns: int | None = Field(
        default=None, ge=0, description="agentic judges: at most the model's max_tool_turns"
    )
    meta_filter: bool | None = Field(
        default=None,
        description="judges with a meta reward model: false aggregates every judgement; "
        "true requires the model to have one (default: filter when it has one)",
    )


# Priority classes of shared deployments, highest first (service.scheduling).
Priority = Literal["interactive", "training", "batch"]
DEFAULT_PRIORITY: Priority = "training"


class ScoreOptions(_Request):
    stream: bool = Field(
        default=False,
        description="answer with NDJSON: one result per line as each item finishes "
        "(in finishing order; `index` says which item)",
    )
    aggregate: Aggregate | None = Field(
        default=None,
        description="process models: how step scores combine (min, last, prod, mean); "
        "overrides the registry's choice",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="give up on items not scored by then (per-item error)"
    )
    judge: JudgeOptions | None = Field(
        default=None, description="generative judges: sampling and inference-time scaling"
    )
    group_wait_s: float | None = Field(
        default=None,
        gt=0,
        description="listwise judges, groups sent in pieces (`group_size` larger than the "
        "group's items in this request): how long a group waits for its other items, from "
        "its first item's arrival (default: the server's group_wait_s)",
    )
    tenant: str | None = Field(
        default=None,
        description="shared deployments: the tenant the items count for, one the API key may "
        "act for (default: the key's first tenant)",
    )
    priority: Priority | None = Field(
        default=None,
        description="shared deployments: the priority class, interactive > training > batch, "
        "one the tenant may use (default: the tenant's class)",
    )
    render: Render = Field(
        default="chat_template",
        description="discriminative models: `chat_template` renders the messages with the "
        "model's chat template; `raw` scores the text of the messages, concatenated, tokenized "
        "as is (no template, no special tokens added), for text a trainer already templated",
    )


class ScoreRequest(_Request):
    model: str = Field(min_length=1, description="a model name from GET /v1/models")
    items: list[Trajectory] = Field(min_length=1)
    options: ScoreOptions = ScoreOptions()


class ItemErrorBody(BaseModel):
    type: str
    message: str


class Usage(BaseModel):
    prompt_tokens: int = 0
    truncated_tokens: int = 0
    completion_tokens: int = 0


class SampleResult(BaseModel):
    """One judgement of a generative judge."""

    text: str
    completion_tokens: int
    score: float | None = None
    # Listwise: this judgement's score of each candidate, in the item's order (None: not given).
    scores: list[float | None] | None = None
    # Pairwise: the label of the chosen candidate (in the item's order) and the order shown.
    verdict: str | None = None
    order: list[str] | None = None
    error: str | None = None
    # Meta reward model filtering: the judgement's rating and whether it was aggregated.
    meta_score: float | None = None
    kept: bool | None = None


class EvidenceResult(BaseModel):
    """One tool call of an agentic judge: the judgement (`sample`) and turn it came from, the
    arguments as the judge wrote them, the tool's output or error, and its time."""

    sample: int
    turn: int
    tool: str
    arguments: dict[str, Any] | str
    output: ToolOutput | None = None
    error: ToolErrorBody | None = None
    elapsed_s: float


class Timing(BaseModel):
    queue_s: float = 0.0
    compute_s: float = 0.0


class ItemResult(BaseModel):
    id: str | None = None
    index: int
    score: float | None = None
    # Several head outputs, or one score per candidate (None: a listwise judge gave none).
    scores: list[float | None] | None = None
    step_scores: list[float | None] | None = None
    # Generative judges: the best candidate's label (pairwise, or pointwise over candidates),
    # the critique, and every judgement when options.judge.return_samples.
    verdict: str | None = None
    critique: str | None = None
    samples: list[SampleResult] | None = None
    # Agentic judges: every tool call, in order (images as data: URLs).
    evidence: list[EvidenceResult] | None = None
    # Listwise judging of a group that did not complete within its wait, judged as it was
    # (the server's partial_groups: judge): how many of the announced responses it had.
    partial_group: int | None = None
    # Composite rewards: each input's reward, by formula variable.
    components: dict[str, float] | None = None
    error: ItemErrorBody | None = None
    # True when the result came from the result cache (an earlier request scored this item).
    cached: bool = False
    usage: Usage = Usage()
    timing: Timing = Timing()


class ScoreResponse(BaseModel):
    model: str
    results: list[ItemResult]


class BatchStatus(BaseModel):
    id: str
    model: str
    status: Literal["running", "done"]
    total: int
    finished: int
    results: list[ItemResult] | None = None


ModelStatus = Literal["loading", "ready", "unavailable"]


class ModelInfo(BaseModel):
    name: str
    kind: str
    status: ModelStatus
    reason: str | None = None
    # Local weights (hub id or path); None for a remote judge.
    weights: str | None
    revision: str | None = None
    max_model_len: int
    # Distributed mode: how many live workers serve the model.
    workers: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
