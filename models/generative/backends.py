"""Where a judge's generations come from: a local vLLM engine, or (remote backend) any
OpenAI-compatible chat endpoint. Both take the judge prompt as the user message's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from models.engine import Completion, GenerateEngine, SamplingRequest
from models.errors import ItemError
from models.rendering import ChatRenderer


@dataclass(frozen=True)
class Judged:
    completions: list[Completion]
    prompt_tokens: int


class JudgeBackend(Protocol):
    max_model_len: int

    async def judge(self, prompt: str, sampling: SamplingRequest) -> Judged:
        """`sampling.n` completions of the judge's chat turn whose user message is `prompt`;
        ItemError when the prompt cannot be judged (too long)."""
        ...

    def shutdown(self) -> None: ...


class LocalBackend:
    """The judge model's chat template and tokenizer, then a long-lived vLLM engine."""

    def __init__(self, renderer: ChatRenderer, engine: GenerateEngine) -> None:
        self._renderer, self._engine = renderer, engine
        self.max_model_len = engine.max_model_len

    async def judge(self, prompt: str, sampling: SamplingRequest) -> Judged:
        chat = [{"role": "user", "content": prompt}]
        ids = self._renderer.encode(self._renderer.render(chat, generation_prompt=True))
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise ItemError(
                "too_long",
                f"the judge prompt has {len(ids)} tokens; with max_tokens {sampling.max_tokens} "
                f"it exceeds the model's max_model_len of {self.max_model_len}",
            )
        return Judged(await self._engine.generate(ids, sampling), len(ids))

    def shutdown(self) -> None:
        self._engine.shutdown()
