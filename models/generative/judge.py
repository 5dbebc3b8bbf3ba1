"""Generative reward models: an LLM judge writes critiques and verdicts, which are parsed.

Pointwise: the response (the turns after the last user message, or each of the item's
`candidates`) gets a score in the model's `score_range`. Pairwise: the judge names the best of
the item's `candidates`; each candidate's score is its share of the verdicts. Listwise: one
judgement sees all the `candidates` (the conversation once) and scores each in `score_range`
(`Scores: A=7, B=3`, or with answer_format boxed_list DeepSeek-GRM's `\\boxed{7, 3}`);
a candidate the judge gave no usable score has the score None, never a default.

Inference-time scaling: `samples=k` judgements per item. Pointwise draws them in one engine
request (n=k); pairwise and listwise draw each with its own random candidate order (cancelling
position bias). Parsed judgements are combined by `mean`, `sum` or `vote` (the most frequent
verdict; listwise, per candidate over the judgements that scored it); judgements that do not
parse are reported, never counted as a default. An item none of whose
judgements parse gets the error `parse_error` with the raw text. With `structured_output`,
vLLM constrains the final answer so that every judgement parses.

Meta reward model (DeepSeek-GRM): with `meta_model`, a discriminative model of the registry rates
each parsed judgement (its judge prompt as the user turn, the judgement as the assistant turn),
served by that model's own workers; only the best-rated `meta_keep` fraction (at least one) is
aggregated. It applies from two parsed judgements on; a request can turn it off.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from rmserve.models.base import Evidence, PeerScorer, RequestOptions, Reward, Sample
from rmserve.models.engine import Completion, SamplingRequest
from rmserve.models.generative.agentic import ToolLoop
from rmserve.models.generative.backends import JudgeBackend, Judged, first_turn
from rmserve.models.generative.parsing import (
    ChoiceVerdict,
    JudgementParseError,
    ListwiseVerdict,
    PointwiseVerdict,
    boxed_list_answer_regex,
    candidate_label,
    choice_answer_regex,
    listwise_answer_regex,
    parse_boxed_list,
    parse_choice,
    parse_listwise,
    parse_pointwise,
    pointwise_answer_regex,
    thinking_regex,
)
from rmserve.models.generative.prompts import JudgePrompt, split_response, transcript
from rmserve.models.spec import GenerativeSpec
from rmserve.wire.errors import ItemError
from rmserve.wire.images import JudgeImage, check_count, decode_images, image_urls
from rmserve.wire.tools import Toolbox, ToolSpec
from rmserve.wire.trajectory import (
    AssistantMessage,
    Candidate,
    Document,
    Message,
    Trajectory,
    UserMessage,
)

# How long a meta reward model may take when the request gives no deadline.
META_TIMEOUT_S = 300.0


class GenerativeModel:
    kind = "generative"

    def __init__(
        self,
        spec: GenerativeSpec,
        backend: JudgeBackend,
        prompt: JudgePrompt,
        peers: PeerScorer | None = None,
        toolbox: Toolbox | None = None,
    ) -> None:
        if spec.options.meta_model is not None and peers is None:
            raise ValueError(f"judge {spec.name!r} has a meta_model but no way to reach it")
        self.name = spec.name
        self.max_model_len = backend.max_model_len
        self._options = spec.options
        self._backend = backend
        self._prompt = prompt
        self._peers = peers
        self._toolbox = toolbox
        self._specs: list[ToolSpec] | None = None

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        images = await self._images(item)
        if self._options.mode == "pairwise":
            return await self._choose(item, options, images)
        if self._options.mode == "listwise":
            return await self._rank(item, options, images)
        if item.candidates:
            return await self._score_candidates(item, options, images)
        context, response = split_response(item.messages)
        return await self._pointwise(
            context, response, item.reference, options, images, item.documents or ()
        )

    async def _images(self, item: Trajectory) -> list[JudgeImage]:
        urls = image_urls(item.messages, item.candidates or ())
        if urls and not self._backend.vision:
            raise ItemError(
                "unsupported_content", f"judge {self.name!r} reads text only; the item has images"
            )
        check_count(urls, self._options.max_images)
        return await decode_images(urls, self._options.max_image_pixels)

    # -- pointwise -------------------------------------------------------------------------

    async def _pointwise(
        self,
        context: Sequence[Message],
        response: Sequence[Message],
        reference: str | None,
        options: RequestOptions,
        images: Sequence[JudgeImage],
        documents: Sequence[Document],
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
        judged, evidence = await self._generate(
            text, images, documents, self._sampling(options, self._samples(options), regex), options
        )
        samples: list[Sample] = []
        verdicts: dict[int, PointwiseVerdict] = {}
        for i, completion in enumerate(judged.completions):
            try:
                verdicts[i] = parse_pointwise(completion.text, low, high)
            except JudgementParseError as exc:
                samples.append(Sample(completion.text, completion.tokens, error=exc.reason))
            else:
                samples.append(Sample(completion.text, completion.tokens, score=verdicts[i].score))
        if not verdicts:
            _unparsed(samples)
        samples = await self._rate([text] * len(samples), samples, options)
        kept = [verdicts[i] for i in verdicts if samples[i].kept is not False]
        return Reward(
            score=_combine([v.score for v in kept], self._options.aggregate),
            critique=kept[0].critique,
            prompt_tokens=judged.prompt_tokens,
            completion_tokens=sum(s.completion_tokens for s in samples),
            samples=samples if options.return_samples else None,
            evidence=evidence,
        )

    async def _score_candidates(
        self, item: Trajectory, options: RequestOptions, images: Sequence[JudgeImage]
    ) -> Reward:
        """Pointwise judging of each candidate; the verdict names the best scored one."""
        assert item.candidates is not None
        rewards = await asyncio.gather(
            *(
                self._pointwise(
                    item.messages,
                    candidate.messages,
                    item.reference,
                    options,
                    images,
                    item.documents or (),
                )
                for candidate in item.candidates
            )
        )
        scores = [reward.score for reward in rewards]
        best = max(range(len(scores)), key=scores.__getitem__)
        samples = [s for reward in rewards for s in reward.samples or []]
        return Reward(
            score=scores[best],
            scores=[*scores],
            verdict=candidate_label(best),
            critique=rewards[best].critique,
            prompt_tokens=sum(reward.prompt_tokens for reward in rewards),
            completion_tokens=sum(reward.completion_tokens for reward in rewards),
            samples=samples if options.return_samples else None,
            evidence=[e for reward in rewards for e in reward.evidence or ()] or None,
        )

    # -- pairwise --------------------------------------------------------------------------

    async def _choose(
        self, item: Trajectory, options: RequestOptions, images: Sequence[JudgeImage]
    ) -> Reward:
        candidates = self._candidates(item)
        count = len(candidates)
        texts = [transcript(candidate.messages) for candidate in candidates]
        context = transcript(item.messages)
        orders = self._orders(count, options)
        regex = (
            choice_answer_regex(count, self._options.max_critique_chars)
            if self._options.structured_output
            else None
        )
        sampling = self._sampling(options, 1, regex)
        prompts = [
            self._prompt.choice(context, [texts[i] for i in order], item.reference)
            for order in orders
        ]
        results, evidence = await self._generate_each(prompts, item, images, sampling, options)
        samples: list[Sample] = []
        verdicts: dict[int, ChoiceVerdict] = {}
        for i, (order, judged) in enumerate(zip(orders, results, strict=True)):
            completion = judged.completions[0]
            try:
                verdicts[i] = parse_choice(completion.text, count)
            except JudgementParseError as exc:
                samples.append(
                    Sample(completion.text, completion.tokens, order=order, error=exc.reason)
                )
            else:
                samples.append(
                    Sample(
                        completion.text,
                        completion.tokens,
                        choice=order[verdicts[i].choice],
                        order=order,
                    )
                )
        if not verdicts:
            _unparsed(samples)
        samples = await self._rate(prompts, samples, options)
        critiques: dict[int, str] = {}  # the first critique choosing each candidate
        votes: Counter[int] = Counter()
        for i, verdict in verdicts.items():
            choice = samples[i].choice
            if samples[i].kept is not False and choice is not None:
                critiques.setdefault(choice, verdict.critique)
                votes[choice] += 1
        scores = [float(votes[i]) for i in range(count)]
        if self._options.aggregate == "mean":
            scores = [v / votes.total() for v in scores]
        best = max(range(count), key=lambda i: (votes[i], -i))
        return Reward(
            score=scores[best],
            scores=[*scores],
            verdict=candidate_label(best),
            critique=critiques[best],
            prompt_tokens=sum(judged.prompt_tokens for judged in results),
            completion_tokens=sum(s.completion_tokens for s in samples),
            samples=samples if options.return_samples else None,
            evidence=evidence,
        )

    # -- listwise --------------------------------------------------------------------------

    async def _rank(
        self, item: Trajectory, options: RequestOptions, images: Sequence[JudgeImage]
    ) -> Reward:
        """One judgement (per sample) scores every candidate; each judgement shows them in its
        own order, and a candidate's score combines the scores it got (None if it got none)."""
        candidates = self._candidates(item)
        count = len(candidates)
        low, high = self._options.score_range
        texts = [transcript(candidate.messages) for candidate in candidates]
        context = transcript(item.messages)
        orders = self._orders(count, options)
        boxed = self._options.answer_format == "boxed_list"
        answer_regex = boxed_list_answer_regex if boxed else listwise_answer_regex
        parse = parse_boxed_list if boxed else parse_listwise
        regex = (
            answer_regex(count, low, high, self._options.max_critique_chars)
            if self._options.structured_output
            else None
        )
        sampling = self._sampling(options, 1, regex)
        prompts = [
            self._prompt.listwise(context, [texts[i] for i in order], item.reference, low, high)
            for order in orders
        ]
        results, evidence = await self._generate_each(prompts, item, images, sampling, options)
        samples: list[Sample] = []
        verdicts: dict[int, ListwiseVerdict] = {}
        for i, (order, judged) in enumerate(zip(orders, results, strict=True)):
            completion = judged.completions[0]
            try:
                verdicts[i] = parse(completion.text, count, low, high)
            except JudgementParseError as exc:
                samples.append(
                    Sample(completion.text, completion.tokens, order=order, error=exc.reason)
                )
            else:
                shown = verdicts[i].scores  # position in this judgement's order -> score
                scored: list[float | None] = [None] * count
                for position, index in enumerate(order):
                    scored[index] = shown[position]
                samples.append(
                    Sample(completion.text, completion.tokens, scores=scored, order=order)
                )
        if not verdicts:
            _unparsed(samples)
        samples = await self._rate(prompts, samples, options)
        kept = [i for i in verdicts if samples[i].kept is not False]
        given: list[list[float]] = [[] for _ in range(count)]
        for i in kept:
            for index, value in enumerate(samples[i].scores or ()):
                if value is not None:
                    given[index].append(value)
        # Every parsed judgement scores a candidate, and at least one of them is kept.
        combined = {
            i: _combine(values, self._options.aggregate) for i, values in enumerate(given) if values
        }
        best = max(combined, key=lambda i: (combined[i], -i))
        return Reward(
            score=combined[best],
            scores=[combined.get(i) for i in range(count)],
            verdict=candidate_label(best),
            critique=verdicts[kept[0]].critique,
            prompt_tokens=sum(judged.prompt_tokens for judged in results),
            completion_tokens=sum(s.completion_tokens for s in samples),
            samples=samples if options.return_samples else None,
            evidence=evidence,
        )

    # -- generation, with or without tools ---------------------------------------------------

    async def _generate_each(
        self,
        prompts: Sequence[str],
        item: Trajectory,
        images: Sequence[JudgeImage],
        sampling: SamplingRequest,
        options: RequestOptions,
    ) -> tuple[list[Judged], list[Evidence] | None]:
        """One judgement of each prompt (each its own candidate order), concurrently; their
        tool calls in order."""
        generated = await asyncio.gather(
            *(
                self._generate(prompt, images, item.documents or (), sampling, options, i)
                for i, prompt in enumerate(prompts)
            )
        )
        evidence = [e for _, calls in generated for e in calls or ()]
        return [judged for judged, _ in generated], evidence or None

    async def _generate(
        self,
        prompt: str,
        images: Sequence[JudgeImage],
        documents: Sequence[Document],
        sampling: SamplingRequest,
        options: RequestOptions,
        first_sample: int = 0,
    ) -> tuple[Judged, list[Evidence] | None]:
        """`sampling.n` judgements of the prompt: one engine request, or with tools one
        agentic loop each."""
        loop = await self._tool_loop(options, vision=bool(images))
        if loop is None:
            if sampling.regex is not None and self._options.thinking:
                sampling = replace(sampling, regex=thinking_regex(sampling.regex))
            chat = first_turn(prompt, len(images))
            return await self._backend.chat(chat, sampling, images), None
        runs = await asyncio.gather(
            *(
                loop.run(prompt, images, documents, sampling, sampling.regex, first_sample + i)
                for i in range(sampling.n)
            )
        )
        completions = [Completion(run.text, run.completion_tokens, None) for run in runs]
        evidence = [e for run in runs for e in run.evidence]
        return Judged(completions, sum(run.prompt_tokens for run in runs)), evidence

    async def _tool_loop(self, options: RequestOptions, vision: bool) -> ToolLoop | None:
        names = options.tools if options.tools is not None else self._options.tools
        if not names:
            return None
        if self._toolbox is None:
            raise ItemError("tools_unavailable", f"judge {self.name!r} has no sandbox to call")
        wanted = set(names) - ({"crop"} if not self._backend.vision else set())
        specs = [spec for spec in await self._tool_specs() if spec.name in wanted]
        turns = options.max_tool_turns
        return ToolLoop(
            backend=self._backend,
            toolbox=self._toolbox,
            specs=specs,
            max_turns=self._options.max_tool_turns if turns is None else turns,
            required=self._options.tool_choice == "required",
            max_observation_chars=self._options.max_observation_chars,
            max_image_pixels=self._options.max_image_pixels,
            thinking=self._options.thinking,
        )

    async def _tool_specs(self) -> list[ToolSpec]:
        if self._specs is None:
            assert self._toolbox is not None
            self._specs = await self._toolbox.specs()
        return self._specs

    # -- meta reward model -----------------------------------------------------------------

    async def _rate(
        self, prompts: Sequence[str], samples: list[Sample], options: RequestOptions
    ) -> list[Sample]:
        """Rate the parsed judgements with the meta reward model and mark the best-rated
        `meta_keep` fraction kept; unchanged without a meta model or with fewer than two."""
        meta, parsed = self._options.meta_model, [i for i, s in enumerate(samples) if not s.error]
        if meta is None or not options.meta_filter or len(parsed) < 2:
            return samples
        assert self._peers is not None
        judgements = [
            Trajectory(
                messages=[
                    UserMessage(role="user", content=prompts[i]),
                    AssistantMessage(role="assistant", content=samples[i].text),
                ]
            )
            for i in parsed
        ]
        deadline = options.deadline or time.time() + META_TIMEOUT_S
        ratings = await self._peers.score(meta, judgements, deadline)
        keep = max(1, math.ceil(len(parsed) * self._options.meta_keep))
        best = set(sorted(range(len(parsed)), key=lambda j: -ratings[j])[:keep])
        rated = list(samples)
        for j, i in enumerate(parsed):
            rated[i] = replace(samples[i], meta_score=ratings[j], kept=j in best)
        return rated

    # -- shared ----------------------------------------------------------------------------

    def _candidates(self, item: Trajectory) -> list[Candidate]:
        candidates = item.candidates or []
        if len(candidates) < 2:
            raise ItemError(
                "missing_candidates",
                f"judge {self.name!r} compares responses: give the item `candidates` (2 or more)",
            )
        return list(candidates)

    def _orders(self, count: int, options: RequestOptions) -> list[list[int]]:
        """The candidate order of each judgement: the item's, then random ones (seeded)."""
        rng = random.Random(
            options.seed if options.seed is not None else self._options.sampling.seed
        )
        k = self._samples(options)
        return [list(range(count))] + [rng.sample(range(count), count) for _ in range(k - 1)]

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
