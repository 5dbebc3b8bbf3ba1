"""Listwise judging: one judgement sees all of a group's candidates and scores each.

Over a scripted backend: scores mapped back to the item's order whatever order each judgement
showed, skipped candidates as None, aggregation per candidate, parse errors, meta filtering.
With a real vLLM engine on the tiny LM (marked `engine`): structured outputs make a listwise
judgement over 8 candidates score all 8, in range; and the cost per item of listwise against
pointwise over the same candidates (printed; run with -s to see it)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from rmserve.models.base import RequestOptions, Reward, RewardModel
from rmserve.models.engine import Completion, SamplingRequest
from rmserve.models.generative.backends import Chat, Judged
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.parsing import candidate_label, listwise_answer_regex
from rmserve.models.generative.prompts import JudgePrompt
from rmserve.models.spec import GenerativeSpec
from rmserve.wire.errors import ItemError
from rmserve.wire.images import JudgeImage
from rmserve.wire.trajectory import Trajectory
from tests.conftest import close_engine_loop

T = TypeVar("T")
QUESTION = "What is 12 * 7?"
RESPONSE = re.compile(r"\[Response ([A-Z])\]\nAssistant: answer-(\d+)")


def group(count: int) -> Trajectory:
    return Trajectory.model_validate(
        {
            "messages": [{"role": "user", "content": QUESTION}],
            "candidates": [f"answer-{i}" for i in range(count)],
        }
    )


def spec(**options: Any) -> GenerativeSpec:
    return GenerativeSpec.model_validate(
        {
            "name": "lw",
            "kind": "generative",
            "weights": "w",
            "options": {"mode": "listwise", **options},
        }
    )


@dataclass
class ListJudge:
    """Scores each candidate `answer-i` with `truth[i]` (or skips it when None), writing the
    block in the order the prompt shows them; `answers` replaces the whole text, in turn."""

    truth: list[float | None]
    answers: list[str] = field(default_factory=list)
    max_model_len: int = 8192
    vision: bool = False
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    shift: float = 0.0  # added to every score, times the judgement's number

    async def chat(
        self,
        chat: Chat,
        sampling: SamplingRequest,
        images: Sequence[JudgeImage] = (),
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Judged:
        prompt = chat[0]["content"]
        number = len(self.seen)
        self.seen.append((prompt, sampling.regex))
        if self.answers:
            text = self.answers.pop(0)
        else:
            entries = []
            for label, index in RESPONSE.findall(prompt):
                value = self.truth[int(index)]
                if value is not None:
                    entries.append(f"{label}={value + self.shift * number:g}")
            text = f"Critique {number}.\nScores: " + ", ".join(entries)
        return Judged([Completion(text, len(text.split()), "stop")], 100)

    def shutdown(self) -> None:
        pass


def judge(backend: ListJudge, peers: Any = None, **options: Any) -> GenerativeModel:
    return GenerativeModel(spec(**options), backend, JudgePrompt.load("listwise"), peers)


async def test_one_judgement_scores_every_candidate_in_the_items_order() -> None:
    backend = ListJudge([2, 8, 5])
    reward = await judge(backend).score(group(3), RequestOptions(return_samples=True))
    assert reward.scores == [2.0, 8.0, 5.0]
    assert (reward.score, reward.verdict, reward.critique) == (8.0, "B", "Critique 0.")
    assert len(backend.seen) == 1 and backend.seen[0][1] is None  # no regex without structure
    prompt = backend.seen[0][0]
    assert prompt.count(QUESTION) == 1 and prompt.index(QUESTION) < prompt.index("[Response A]")
    assert reward.prompt_tokens == 100 and reward.completion_tokens == 6
    assert reward.samples is not None and reward.samples[0].scores == [2.0, 8.0, 5.0]


async def test_a_skipped_candidate_has_no_score_and_the_best_is_among_the_scored() -> None:
    reward = await judge(ListJudge([2, None, 5])).score(group(3), RequestOptions())
    assert reward.scores == [2.0, None, 5.0]
    assert (reward.score, reward.verdict) == (5.0, "C")
    backend = ListJudge([0, 0, 0], answers=["Scores: A=4, B=4, C=40"])  # a tie: the first wins
    reward = await judge(backend).score(group(3), RequestOptions())
    assert reward.scores == [4.0, 4.0, None] and reward.verdict == "A"


async def test_samples_show_random_orders_and_combine_each_candidates_scores() -> None:
    backend = ListJudge([1, 2, 3, 4, 5, 6], shift=1.0)  # judgement j adds j to every score
    options = RequestOptions(samples=4, seed=7, return_samples=True)
    reward = await judge(backend, max_samples=8).score(group(6), options)
    assert reward.samples is not None
    orders = [s.order for s in reward.samples]
    assert orders[0] == list(range(6)) and len({tuple(o or ()) for o in orders}) > 1
    for j, sample in enumerate(reward.samples):
        assert sample.scores == [float(v + j) for v in range(1, 7)]  # in the item's order
        shown = [int(i) for _, i in RESPONSE.findall(backend.seen[j][0])]
        assert shown == sample.order
    assert reward.scores == [v + 1.5 for v in range(1, 7)]  # mean over judgements 0..3
    assert reward.verdict == "F" and reward.score == 7.5
    again = await judge(ListJudge([1, 2, 3, 4, 5, 6])).score(group(6), options)
    assert [s.order for s in again.samples or []] == orders  # seeded as pairwise judging
    summed = await judge(ListJudge([1, None, 3]), aggregate="sum").score(
        group(3), RequestOptions(samples=2)
    )
    assert summed.scores == [2.0, None, 6.0]


async def test_judgements_that_do_not_parse_are_reported_and_left_out() -> None:
    backend = ListJudge([3, 9], answers=["I like both."])
    reward = await judge(backend, max_samples=4).score(
        group(2), RequestOptions(samples=2, return_samples=True)
    )
    assert reward.scores == [3.0, 9.0] and reward.critique == "Critique 1."
    assert reward.samples is not None
    assert reward.samples[0].error is not None and "no `Scores:" in reward.samples[0].error
    assert reward.samples[0].scores is None and reward.samples[1].error is None
    nothing = ListJudge([1, 1], answers=["A is best.", "Scores: A=0, B=99"])
    with pytest.raises(ItemError) as caught:
        await judge(nothing, max_samples=4).score(group(2), RequestOptions(samples=2))
    assert caught.value.code == "parse_error" and "'A is best.'" in caught.value.message


async def test_items_without_two_candidates_are_refused() -> None:
    single = Trajectory.model_validate(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    with pytest.raises(ItemError) as caught:
        await judge(ListJudge([1])).score(single, RequestOptions())
    assert caught.value.code == "missing_candidates"


async def test_structured_output_asks_for_every_score_in_range() -> None:
    backend = ListJudge([1, 2, 3])
    options = {"structured_output": True, "max_critique_chars": 50, "score_range": (0, 4)}
    await judge(backend, **options).score(group(3), RequestOptions())
    assert backend.seen[0][1] == listwise_answer_regex(3, 0, 4, 50)


async def test_an_agentic_listwise_judge_calls_tools_then_scores() -> None:
    from rmserve.sandbox.config import SandboxSettings
    from rmserve.sandbox.tools import LocalToolbox

    toolbox = LocalToolbox(SandboxSettings(tools=["calculator"]))
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
    backend = ListJudge([4, 9], answers=[call])
    model = GenerativeModel(
        spec(tools=["calculator"]), backend, JudgePrompt.load("listwise"), None, toolbox
    )
    reward = await model.score(group(2), RequestOptions())
    assert reward.scores == [4.0, 9.0] and reward.verdict == "B"
    assert [e.arguments for e in reward.evidence or []] == [{"expression": "12*7"}]


@dataclass
class Meta:
    """A meta reward model that rates a judgement by the number in its critique."""

    calls: list[int] = field(default_factory=list)

    async def score(self, model: str, items: Sequence[Trajectory], deadline: float) -> list[float]:
        self.calls.append(len(items))
        texts = [str(item.messages[-1].content) for item in items]
        return [float(re.findall(r"Critique (\d+)", t)[0]) for t in texts]


async def test_the_meta_model_keeps_the_best_rated_judgements() -> None:
    meta = Meta()
    backend = ListJudge([1, 2], shift=1.0)
    model = judge(backend, meta, meta_model="rm", meta_keep=0.5, max_samples=4)
    reward = await model.score(group(2), RequestOptions(samples=4, return_samples=True))
    assert meta.calls == [4]
    assert [s.kept for s in reward.samples or []] == [False, False, True, True]
    assert reward.scores == [1 + 2.5, 2 + 2.5]  # judgements 2 and 3
    assert reward.critique == "Critique 2."
    unfiltered = judge(ListJudge([1, 2], shift=1.0), meta, meta_model="rm", max_samples=4)
    reward = await unfiltered.score(group(2), RequestOptions(samples=4, meta_filter=False))
    assert reward.scores == [2.5, 3.5] and meta.calls == [4]


def test_the_registry_knows_the_mode_and_its_template() -> None:
    options = spec().options
    assert options.mode == "listwise" and options.template_name == "listwise"
    JudgePrompt.load(options.template_name)


# -- with a real engine --------------------------------------------------------------------

ENGINE = {"max_model_len": 2048, "dtype": "float32", "kv_cache_gib": 0.25, "enforce_eager": True}
GROUP = 8


def group_item(n: int) -> Trajectory:
    return Trajectory.model_validate(
        {
            "messages": [{"role": "user", "content": f"Question {n}: what is 12 * {n}?"}],
            "candidates": [f"It is {12 * n + d}." for d in range(GROUP)],
        }
    )


@dataclass
class Served:
    """The engine's model and the one event loop every call runs on (the engine's output
    handler lives on the loop of its first request)."""

    model: RewardModel
    loop: asyncio.AbstractEventLoop

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(call)


@pytest.fixture(scope="module")
def tiny_listwise(tiny_models: dict[str, Path]) -> Iterator[Served]:
    from rmserve.models.loader import load_model

    model = load_model(
        GenerativeSpec.model_validate(
            {
                "name": "tiny-judge-listwise",
                "kind": "generative",
                "weights": str(tiny_models["tiny-lm"]),
                "engine": ENGINE,
                "options": {
                    "mode": "listwise",
                    "structured_output": True,
                    "max_critique_chars": 40,
                    "max_samples": 4,
                    "sampling": {"temperature": 1.0, "max_tokens": 200},
                },
            }
        )
    )
    loop = asyncio.new_event_loop()
    try:
        yield Served(model, loop)
    finally:
        model.shutdown()
        close_engine_loop(loop)


@pytest.mark.engine
def test_a_structured_listwise_judgement_scores_all_8_candidates_in_range(
    tiny_listwise: Served,
) -> None:
    model = tiny_listwise.model
    items = [group_item(n) for n in range(1, 4)]

    async def score_all() -> list[Reward]:
        options = RequestOptions(return_samples=True)
        return await asyncio.gather(*(model.score(item, options) for item in items))

    rewards = tiny_listwise.run(score_all())
    for reward in rewards:
        assert reward.scores is not None and len(reward.scores) == GROUP
        assert all(s is not None and 1 <= s <= 10 and s == int(s) for s in reward.scores)
        assert reward.score == max(s for s in reward.scores if s is not None)
        assert reward.verdict == candidate_label(reward.scores.index(reward.score))
        (sample,) = reward.samples or []
        assert sample.error is None and sample.order == list(range(GROUP))
        block = ", ".join(f"{candidate_label(i)}={s:g}" for i, s in enumerate(reward.scores))
        assert sample.text.endswith(f"Scores: {block}"), sample.text
        assert len(sample.text) <= 40 + len(f"Scores: {block}")
    # samples=3: three orders, each judgement scores every candidate.
    # (No seed: seeded sampling is refused on vLLM's CPU build.)
    reward = tiny_listwise.run(
        model.score(items[0], RequestOptions(samples=3, return_samples=True))
    )
    assert [s.error for s in reward.samples or []] == [None] * 3
    assert all(s.scores is not None and None not in s.scores for s in reward.samples or [])
    assert len({tuple(s.order or ()) for s in reward.samples or []}) == 3
    assert reward.scores is not None and None not in reward.scores


@pytest.mark.engine
def test_cost_per_item_listwise_against_pointwise(tiny_listwise: Served) -> None:
    """Cost of judging a group of 8: one listwise judgement, or 8 pointwise ones (same engine,
    same critique cap, structured outputs both). Prints wall time and tokens per item."""
    listwise = tiny_listwise.model
    assert isinstance(listwise, GenerativeModel)
    pointwise_spec = GenerativeSpec.model_validate(
        {
            "name": "tiny-judge-pointwise",
            "kind": "generative",
            "weights": "unused",
            "options": {
                "mode": "pointwise",
                "structured_output": True,
                "max_critique_chars": 40,
                "sampling": {"temperature": 1.0, "max_tokens": 200},
            },
        }
    )
    pointwise = GenerativeModel(
        pointwise_spec,
        listwise._backend,  # the same engine
        JudgePrompt.load("principles_pointwise"),
    )
    items = [group_item(n) for n in range(10, 18)]

    async def one_at_a_time(model: GenerativeModel) -> list[Reward]:
        return [await model.score(item, RequestOptions()) for item in items]

    async def all_at_once(model: GenerativeModel) -> list[Reward]:
        return await asyncio.gather(*(model.score(item, RequestOptions()) for item in items))

    figures: dict[tuple[str, str], tuple[float, float, float]] = {}
    for run in [one_at_a_time, all_at_once]:
        for name, model in [("listwise", listwise), ("pointwise", pointwise)] * 2:
            started = time.perf_counter()
            rewards = tiny_listwise.run(run(model))
            wall = (time.perf_counter() - started) / len(items)
            prompt = sum(r.prompt_tokens for r in rewards) / len(items)
            completion = sum(r.completion_tokens for r in rewards) / len(items)
            for reward in rewards:
                assert reward.scores is not None and len(reward.scores) == GROUP
                assert None not in reward.scores
            figures[name, run.__name__] = (wall, prompt, completion)  # the warm second round
    for (name, run_name), (wall, prompt, completion) in figures.items():
        print(
            f"\n{name}, {len(items)} groups of {GROUP} {run_name}: {wall * 1000:.0f} ms/group, "
            f"{prompt:.0f} prompt + {completion:.0f} completion tokens/group"
        )
    for how in ["one_at_a_time", "all_at_once"]:  # the conversation is read once, not 8 times
        assert figures["listwise", how][1] < figures["pointwise", how][1]
