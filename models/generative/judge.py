"""Generative reward models: an LLM judge writes critiques and verdicts, which are parsed.

Pointwise: the response (the turns after the last user message, or each of the item's
`candidates`) gets a score in the model's `score_range`. Pairwise / listwise: the judge names the
best of the item's `candidates`; each candidate's score is its share of the verdicts.

Inference-time scaling: `samples=k` judgements per item. Pointwise draws them in one engine
request (n=k); pairwise draws each with its own random candidate order (cancelling position
bias). Parsed judgements are combined by `mean`, `sum` or `vote` (the most frequent verdict);
judgements that do not parse are reported, never counted as a default. An item none of whose
judgements parse gets the error `parse_error` with the raw text. With `structured_output`,
vLLM constrains the final answer so that every judgement parses.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

from models.base import RequestOptions, Reward, Sample
from models.engine import SamplingRequest
from models.errors import ItemError
from models.generative.backends import JudgeBackend
from models.generative.parsing import (
    JudgementParseError,
    candidate_label,
    choice_answer_regex,
    parse_choice,
    parse_pointwise,
    pointwise_answer_regex,
)
from models.generative.prompts import JudgePrompt, split_response, transcript
from models.spec import GenerativeSpec
from models.trajectory import Message, Trajectory, has_images


class GenerativeModel:
    kind = "generative"

    def __init__(self, spec: GenerativeSpec, backend: JudgeBackend, prompt: JudgePrompt) -> None:
        self.name = spec.name
        self.max_model_len = backend.max_model_len
        self._options = spec.options
        self._backend = backend
        self._prompt = prompt

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        if has_images(item):
            raise ItemError(
                "unsupported_content", f"judge {self.name!r} reads text only; the item has images"
            )
        if self._options.mode == "pairwise":
            return await self._choose(item, options)
        if item.candidates:
            return await self._score_candidates(item, options)
        context, response = split_response(item.messages)
        return await self._pointwise(context, response, item.reference, options)

    # -- pointwise -------------------------------------------------------------------------

    async def _pointwise(
        self,
        context: Sequence[Message],
        response: Sequence[Message],
        reference: str | None,
        options: RequestOptions,
    ) -> Reward:
        low, high = self._options.score_range
        text = self._prompt.pointwise(
            transcript(context), transcript(response), reference, low, high
        )
        regex = (
            pointwise_answer_regex(low, high, self._options.max_critique_chars)
            if self._options.structured_output
            else None
        )
        judged = await self._backend.judge(
            text, self._sampling(options, self._samples(options), regex)
        )
        samples, verdicts = [], []
        for completion in judged.completions:
            try:
                verdict = parse_pointwise(completion.text, low, high)
            except JudgementParseError as exc:
                samples.append(Sample(completion.text, completion.tokens, error=exc.reason))
            else:
                verdicts.append(verdict)
                samples.append(Sample(completion.text, completion.tokens, score=verdict.score))
        if not verdicts:
            _unparsed(samples)
        return Reward(
            score=_combine([v.score for v in verdicts], self._options.aggregate),
            critique=verdicts[0].critique,
            prompt_tokens=judged.prompt_tokens,
            completion_tokens=sum(s.completion_tokens for s in samples),
            samples=samples if options.return_samples else None,
        )

    async def _score_candidates(self, item: Trajectory, options: RequestOptions) -> Reward:
        """Pointwise judging of each candidate; the verdict names the best scored one."""
        assert item.candidates is not None
        rewards = await asyncio.gather(
            *(
                self._pointwise(item.messages, candidate.messages, item.reference, options)
                for candidate in item.candidates
            )
        )
        scores = [reward.score for reward in rewards]
        best = max(range(len(scores)), key=scores.__getitem__)
        samples = [s for reward in rewards for s in reward.samples or []]
        return Reward(
            score=scores[best],
            scores=scores,
            verdict=candidate_label(best),
            critique=rewards[best].critique,
            prompt_tokens=sum(reward.prompt_tokens for reward in rewards),
            completion_tokens=sum(reward.completion_tokens for reward in rewards),
            samples=samples if options.return_samples else None,
        )

    # -- pairwise / listwise ---------------------------------------------------------------

    async def _choose(self, item: Trajectory, options: RequestOptions) -> Reward:
        candidates = item.candidates or []
        if len(candidates) < 2:
            raise ItemError(
                "missing_candidates",
                f"judge {self.name!r} compares responses: give the item `candidates` (2 or more)",
            )
        count, k = len(candidates), self._samples(options)
        texts = [transcript(candidate.messages) for candidate in candidates]
        context = transcript(item.messages)
        rng = random.Random(
            options.seed if options.seed is not None else self._options.sampling.seed
        )
        orders = [list(range(count))] + [rng.sample(range(count), count) for _ in range(k - 1)]
        regex = (
            choice_answer_regex(count, self._options.max_critique_chars)
            if self._options.structured_output
            else None
        )
        sampling = self._sampling(options, 1, regex)
        results = await asyncio.gather(
            *(
                self._backend.judge(
                    self._prompt.choice(context, [texts[i] for i in order], item.reference),
                    sampling,
                )
                for order in orders
            )
        )
        samples: list[Sample] = []
        critiques: dict[int, str] = {}  # the first critique choosing each candidate
        for order, judged in zip(orders, results, strict=True):
            completion = judged.completions[0]
            try:
                verdict = parse_choice(completion.text, count)
            except JudgementParseError as exc:
                samples.append(
                    Sample(completion.text, completion.tokens, order=order, error=exc.reason)
                )
            else:
                critiques.setdefault(order[verdict.choice], verdict.critique)
                samples.append(
                    Sample(
                        completion.text,
                        completion.tokens,
                        choice=order[verdict.choice],
                        order=order,
                    )
                )
        parsed = [s for s in samples if s.choice is not None]
        if not parsed:
            _unparsed(samples)
        votes = Counter(s.choice for s in parsed)
        scores = [float(votes[i]) for i in range(count)]
        if self._options.aggregate == "mean":
            scores = [v / len(parsed) for v in scores]
        best = max(range(count), key=lambda i: (votes[i], -i))
        return Reward(
            score=scores[best],
            scores=scores,
            verdict=candidate_label(best),
            critique=critiques[best],
            prompt_tokens=sum(judged.prompt_tokens for judged in results),
            completion_tokens=sum(s.completion_tokens for s in samples),
            samples=samples if options.return_samples else None,
        )

    # -- shared ----------------------------------------------------------------------------

    def _samples(self, options: RequestOptions) -> int:
        return options.samples or self._options.samples

    def _sampling(self, options: RequestOptions, n: int, regex: str | None) -> SamplingRequest:
        base = self._options.sampling
        return SamplingRequest(
            temperature=base.temperature if options.temperature is None else options.temperature,
            top_p=base.top_p if options.top_p is None else options.top_p,
            max_tokens=options.max_tokens or base.max_tokens,
            seed=base.seed if options.seed is None else options.seed,
            n=n,
            regex=regex,
        )

    def shutdown(self) -> None:
        self._backend.shutdown()


def _combine(scores: list[float], how: str) -> float:
    if how == "sum":
        return float(sum(scores))
    if how == "vote":  # the most frequent score; ties go to the lower one (conservative)
        counts = Counter(scores)
        return min(counts, key=lambda s: (-counts[s], s))
    return sum(scores) / len(scores)


def _unparsed(samples: list[Sample]) -> None:
    first = samples[0]
    raise ItemError(
        "parse_error",
        f"no judgement could be parsed ({len(samples)} drawn): {first.error}; raw text of the "
        f"first: {first.text!r}",
    )
