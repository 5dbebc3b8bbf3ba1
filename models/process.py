"""Process reward models: a score per step and an aggregate over the steps.

Steps are marked with the model's step tag token, and the PRM's token-classification head is
read at each tag position:

- `steps: separator` splits the final assistant message on `separator` and ends each segment
  with the tag (the Qwen2.5-Math-PRM convention: "step1<tag>step2<tag>");
- `steps: assistant_turns` treats each assistant message (an agent action, tool calls included)
  as a step and places the tag right after that turn as the chat template renders it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from rmserve.models.base import RequestOptions, Reward, require_text_only
from rmserve.models.engine import PoolingEngine
from rmserve.models.errors import ModelLoadError
from rmserve.models.rendering import ChatRenderer, template_messages
from rmserve.models.spec import Aggregate, ProcessOptions, ProcessSpec
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory

log = logging.getLogger(__name__)

AGGREGATES: dict[Aggregate, Callable[[Sequence[float]], float]] = {
    "min": min,
    "last": lambda scores: scores[-1],
    "prod": math.prod,
    "mean": lambda scores: math.fsum(scores) / len(scores),
}


def step_score(row: Sequence[float], options: ProcessOptions) -> float:
    """Turn one tag position's head outputs into the step's score."""
    logit = row[options.positive_label]
    if options.activation == "none":
        return logit
    if options.activation == "sigmoid":
        return 1.0 / (1.0 + math.exp(-logit))
    top = max(row)
    return math.exp(logit - top) / math.fsum(math.exp(x - top) for x in row)


def step_tag_id(tokenizer: Any, step_tag: str) -> int:
    ids = tokenizer.encode(step_tag, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelLoadError(
            f"step_tag {step_tag!r} is {len(ids)} tokens for this tokenizer; it must be one token"
        )
    return int(ids[0])


class ProcessModel:
    kind = "process"

    def __init__(self, spec: ProcessSpec, renderer: ChatRenderer, engine: PoolingEngine):
        self.name = spec.name
        self.max_model_len = renderer.max_model_len
        self._options = spec.options
        self._tag_id = step_tag_id(renderer.tokenizer, spec.options.step_tag)
        self._renderer = renderer
        self._engine = engine
        self._fallback_logged = False

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        require_text_only(item, self.name)
        text, n_steps = self._tagged_text(item)
        token_ids = self._renderer.encode(text)
        positions = [i for i, token in enumerate(token_ids) if token == self._tag_id]
        if len(positions) != n_steps:
            raise ItemError(
                "step_tag_in_content",
                f"the step tag {self._options.step_tag!r} also occurs in the trajectory text; "
                f"expected {n_steps} tags, found {len(positions)}",
            )
        engine_input = self._renderer.fit(token_ids)
        kept = [p - engine_input.truncated_tokens for p in positions]
        if all(p < 0 for p in kept):
            raise ItemError("too_long", "truncation to max_model_len removed every step")
        rows = await self._tag_rows(engine_input.token_ids, kept)
        step_scores = [step_score(row, self._options) if row is not None else None for row in rows]
        scored = [s for s in step_scores if s is not None]
        return Reward(
            score=AGGREGATES[options.aggregate or self._options.aggregate](scored),
            step_scores=step_scores,
            prompt_tokens=len(engine_input.token_ids),
            truncated_tokens=engine_input.truncated_tokens,
        )

    async def _tag_rows(
        self, token_ids: list[int], positions: list[int]
    ) -> list[list[float] | None]:
        """The head's raw output at each tag position (None for a tag truncated away).

        With `reuse_prefix`, one `classify` request per tag on the ids up to and including
        it: attention is causal, so the last-token output of `token_ids[: p + 1]` is the
        per-token output at p. vLLM serves last-token pooling from its prefix cache (it
        never does for per-token pooling), so the prompt a group of items shares and each
        item's earlier steps are computed once rather than once per item and per step.

        A model whose head the engine serves only per token (vLLM's Qwen2ForProcessRewardModel:
        `token_classify` alone) has no such request: `reuse_prefix` then falls back to the
        one per-token request per item (logged once), with the same scores.
        """
        if self._options.reuse_prefix and await self._engine.supports("classify"):
            kept = [p for p in positions if p >= 0]
            tasks = [
                asyncio.ensure_future(self._engine.pool(token_ids[: p + 1], "classify"))
                for p in kept
            ]
            try:
                outputs = await asyncio.gather(*tasks)
            finally:
                # A failed step fails the item: stop computing its other steps.
                for task in tasks:
                    task.cancel()
            if any(len(rows) != 1 for rows in outputs):
                raise ItemError(
                    "unsupported_model",
                    "the engine returned other than one head row for a last-token request",
                )
            by_position = {p: rows[0] for p, rows in zip(kept, outputs, strict=True)}
            return [by_position.get(p) for p in positions]
        if self._options.reuse_prefix and not self._fallback_logged:
            self._fallback_logged = True
            log.warning(
                "%s: reuse_prefix is on, but the engine serves this model's head only per "
                "token (no last-token classify), so each item is scored in one per-token "
                "request, without the prefix cache (reuse_prefix: false says so, unlogged)",
                self.name,
            )
        rows = await self._engine.pool(token_ids, "token_classify")
        if len(rows) != len(token_ids):
            # E.g. vLLM's STEP pooling: rows only at the engine's own step tag id.
            raise ItemError(
                "unsupported_model",
                f"the engine returned {len(rows)} head rows for {len(token_ids)} tokens; a "
                "process model reads one row per token at its step tags",
            )
        return [rows[p] if p >= 0 else None for p in positions]

    def _tagged_text(self, item: Trajectory) -> tuple[str, int]:
        chat = template_messages(item.messages)
        if self._options.steps == "separator":
            return self._tag_final_answer(chat)
        return self._tag_assistant_turns(chat)

    def _tag_final_answer(self, chat: list[dict[str, Any]]) -> tuple[str, int]:
        tag, separator = self._options.step_tag, self._options.separator
        last = _last_assistant(chat)
        steps = [s.strip() for s in chat[last]["content"].split(separator) if s.strip()]
        if not steps:
            raise ItemError(
                "no_steps", "the final assistant message has no text to split into steps"
            )
        chat[last] = {**chat[last], "content": tag.join(steps) + tag}
        return self._renderer.render(chat), len(steps)

    def _tag_assistant_turns(self, chat: list[dict[str, Any]]) -> tuple[str, int]:
        full = self._renderer.render(chat)
        cuts = []
        for index, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            prefix = self._renderer.render(chat[: index + 1])
            if not full.startswith(prefix):
                raise ItemError(
                    "template_error",
                    "the chat template renders conversation prefixes differently from the whole "
                    "conversation, so assistant turns cannot be tagged; use steps: separator",
                )
            cuts.append(len(prefix))
        if not cuts:
            raise ItemError("no_steps", "the trajectory has no assistant message to score")
        pieces = [
            full[start:end] for start, end in zip([0, *cuts], [*cuts, len(full)], strict=True)
        ]
        return self._options.step_tag.join(pieces), len(cuts)

    def shutdown(self) -> None:
        self._engine.shutdown()


def _last_assistant(chat: list[dict[str, Any]]) -> int:
    for index in range(len(chat) - 1, -1, -1):
        if chat[index]["role"] == "assistant":
            return index
    raise ItemError("no_steps", "the trajectory has no assistant message to score")
