"""Discriminative reward models: one raw head output (e.g. a Bradley-Terry logit) per item."""

from __future__ import annotations

from rmserve.models.base import Render, RequestOptions, Reward, require_text_only
from rmserve.models.engine import PoolingEngine
from rmserve.models.rendering import ChatRenderer, template_messages
from rmserve.models.spec import DiscriminativeSpec
from rmserve.wire.trajectory import Trajectory, text_of


class DiscriminativeModel:
    kind = "discriminative"

    def __init__(self, spec: DiscriminativeSpec, renderer: ChatRenderer, engine: PoolingEngine):
        self.name = spec.name
        self.max_model_len = renderer.max_model_len
        self._label = spec.options.score_label
        self._renderer = renderer
        self._engine = engine

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        require_text_only(item, self.name)
        text = self._text(item, options.render)
        engine_input = self._renderer.fit(self._renderer.encode(text))
        (logits,) = await self._engine.pool(engine_input.token_ids, "classify")
        return Reward(
            score=logits[self._label],
            scores=[*logits] if len(logits) > 1 else None,
            prompt_tokens=len(engine_input.token_ids),
            truncated_tokens=engine_input.truncated_tokens,
        )

    def _text(self, item: Trajectory, render: Render) -> str:
        if render == "raw":  # already templated by the caller: tokenized as is
            return "".join(text_of(message.content) for message in item.messages)
        return self._renderer.render(template_messages(item.messages))

    def shutdown(self) -> None:
        self._engine.shutdown()
