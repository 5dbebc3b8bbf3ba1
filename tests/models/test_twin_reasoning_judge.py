"""A reasoning judge in the style of RM-R1 (RM-R1-DeepSeek-Distilled-Qwen-7B), proven on its tiny
twin (rmserve.models.tiny.twins.RM_R1_JUDGE: Qwen2ForCausalLM with DeepSeek-R1-Distill's chat
template, which opens the judge's <think> block itself).

* The prompt rmserve renders (the rm_r1_reasoning judge template, then LocalBackend's chat
  template path) is the twin tokenizer's own apply_chat_template, token for token, and the judge
  template is RM-R1's reasoning prompt byte for byte.
* A copy of the twin fine-tuned (seconds) to answer three items: on the real vLLM engine, greedy,
  rmserve's judgement is transformers' greedy `generate` on the same ids, token for token, and
  the verdict is what RM-R1's own extraction reads in that text.
* What the thinking must never decide: a verdict written only in an unfinished thinking is
  `parse_error` (RM-R1's evaluation script would count it: `"[[A]]" in judgment`); a marker in
  the thinking does not outvote the answer after it.
* structured_output with `thinking: true` lets the judge think, then constrains the answer.
* Batch invariance: judgements alone and inside a batch of 64 are the same text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmserve.examples import HERE as EXAMPLES
from rmserve.models.base import RequestOptions, Reward, RewardModel
from rmserve.models.engine import Completion, Generation, SamplingRequest
from rmserve.models.generative.backends import LocalBackend
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.prompts import JudgePrompt, transcript
from rmserve.models.loader import load_model
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import GenerativeOptions, GenerativeSpec, Registry, load_registry
from rmserve.models.tiny.twins import RM_R1_JUDGE
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory
from tests.conftest import TwinModels, close_engine_loop
from tests.trained_judge import train_answers

MAX_MODEL_LEN = 1024
MAX_TOKENS = 96
BATCH = 64

QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]


def pair(first: str, second: str, **extra: Any) -> dict[str, Any]:
    return {"messages": QUESTION, "candidates": [first, second], **extra}


def candidates(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its candidates in the wire form (a bare string is one assistant turn)."""
    shaped = [{"messages": [{"role": "assistant", "content": c}]} for c in item["candidates"]]
    return {**item, "candidates": shaped}


HONEST_A = pair("12 * 7 = 84.", "12 * 7 = 74.")
HONEST_B = pair("It is 74.", "Seven twelves: 84.")
UNSEEN = pair("Eighty-four.", "84", reference="84")

# What the fine-tuned twin writes for any of these items (greedy): thinking that names [[A]] on
# the way, then the answer [[B]].
ANSWER = "At first [[A]] looked right, but 12 * 7 = 84, not 74.\n</think>\n\n<answer>[[B]]</answer>"
THOUGHT = ANSWER.partition("</think>")[0]


def options(**overrides: Any) -> dict[str, Any]:
    """The catalogue's options for the real model (RM_R1_JUDGE.options), greedy and short."""
    return {
        **RM_R1_JUDGE.options,
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS},
        **overrides,
    }


def judge_spec(path: Path, **overrides: Any) -> GenerativeSpec:
    entry = {
        "kind": "generative",
        "weights": str(path),
        "engine": {
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "float32",
            "kv_cache_gib": 0.25,
            "enforce_eager": True,
            "max_num_seqs": BATCH,
        },
        "options": options(**overrides),
    }
    model = Registry.model_validate({"models": {"rm-r1-twin": entry}}).models["rm-r1-twin"]
    assert isinstance(model, GenerativeSpec)
    return model


def judge_prompt(item: dict[str, Any]) -> str:
    """The judge prompt, as GenerativeModel builds it for the item's candidates in order."""
    trajectory = Trajectory.model_validate(candidates(item))
    assert trajectory.candidates is not None
    return JudgePrompt.load("rm_r1_reasoning").choice(
        transcript(trajectory.messages),
        [transcript(c.messages) for c in trajectory.candidates],
        trajectory.reference,
    )


def chat_text(tokenizer: Any, prompt: str) -> str:
    text: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text


# -- rendering ----------------------------------------------------------------------------------


class RecordingEngine:
    """Records the ids LocalBackend sends and answers with a fixed judgement."""

    max_model_len = MAX_MODEL_LEN
    image_token_id = None

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls: list[list[int]] = []

    async def generate(
        self, token_ids: list[int], sampling: SamplingRequest, images: Any = ()
    ) -> Generation:
        self.calls.append(list(token_ids))
        return Generation([Completion(self.text, 5, "stop")], len(token_ids))

    def shutdown(self) -> None:
        pass


def recorded(path: Path, item: dict[str, Any], text: str) -> tuple[list[int], Reward]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = RecordingEngine(text)
    backend = LocalBackend(ChatRenderer(tokenizer, MAX_MODEL_LEN, "error"), engine)
    spec = judge_spec(path)
    model = GenerativeModel(spec, backend, JudgePrompt.load(spec.options.template_name))
    trajectory = Trajectory.model_validate(candidates(item))
    reward = asyncio.run(model.score(trajectory, RequestOptions(return_samples=True)))
    (ids,) = engine.calls
    return ids, reward


def test_the_judge_prompt_is_rm_r1s_and_the_template_opens_the_thinking(
    twin_models: TwinModels,
) -> None:
    path = twin_models[RM_R1_JUDGE.name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = judge_prompt(HONEST_A)
    # RM_R1_SINGLE_TURN_REASONING_USER_PROMPT (RM-R1, eval/reward-bench/rewardbench/
    # generative.py), formatted with the conversation's transcript and the two responses.
    assert prompt == (
        "Please act as an impartial judge and evaluate the quality of the responses provided by "
        "two AI Chatbots to the Client question displayed below. \n\n"
        "[Client Question]\nUser: What is 12 * 7?\n\n"
        "[The Start of Chatbot A's Response]\nAssistant: 12 * 7 = 84.\n"
        "[The End of Chatbot A's Response]\n\n"
        "[The Start of Chatbot B's Response]\nAssistant: 12 * 7 = 74.\n"
        "[The End of Chatbot B's Response]\n\n"
        "Output your final verdict at last by strictly following this format: "
        "'<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' if "
        "Chatbot B is better."
    )
    ids, _ = recorded(path, HONEST_A, "ok\n</think>\n\n<answer>[[A]]</answer>")
    reference = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    assert ids == reference
    text = tokenizer.decode(ids)
    assert text.startswith(RM_R1_JUDGE.bos_token or "") and text.endswith("<think>\n")


def test_the_opened_thinking_belongs_to_the_judgement(twin_models: TwinModels) -> None:
    """DeepSeek-R1 distills start every judgement inside <think>: the judgement's text starts
    with the opening the template wrote, so a judgement that never closes it is truncated
    thinking, whatever it wrote there."""
    path = twin_models[RM_R1_JUDGE.name]
    _, reward = recorded(path, HONEST_A, "Fine.\n</think>\n\n<answer>[[B]]</answer>")
    assert reward.verdict == "B" and reward.samples is not None
    assert reward.samples[0].text == "<think>\nFine.\n</think>\n\n<answer>[[B]]</answer>"
    with pytest.raises(ItemError) as raised:
        recorded(path, HONEST_A, "I would say <answer>[[A]]</answer> but")
    assert raised.value.code == "parse_error" and "unclosed <think>" in raised.value.message


# -- the real engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(twin_models: TwinModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = twin_models[RM_R1_JUDGE.name]
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [(chat_text(tokenizer, judge_prompt(item)), ANSWER) for item in (HONEST_A, HONEST_B)]
    return train_answers(
        base, tmp_path_factory.mktemp("rm-r1-trained"), prompts, lr=5e-3, margin=2.0
    )


@dataclass
class Served:
    model: RewardModel
    loop: asyncio.AbstractEventLoop

    def score(self, item: dict[str, Any], **options: Any) -> Reward:
        return self.loop.run_until_complete(self._score(item, options))

    def judgement(self, item: dict[str, Any]) -> str:
        """The judgement's text, whether it parsed or not (the raw text is in the error)."""
        return self.loop.run_until_complete(self._judgement(item))

    def judgements(self, items: list[dict[str, Any]]) -> list[str]:
        async def gather() -> list[str]:
            return list(await asyncio.gather(*(self._judgement(i) for i in items)))

        return self.loop.run_until_complete(gather())

    async def _judgement(self, item: dict[str, Any]) -> str:
        try:
            reward = await self._score(item, {})
        except ItemError as error:
            assert error.code == "parse_error", error
            return error.message.partition("raw text of the first: ")[2]
        assert reward.samples is not None
        return repr(reward.samples[0].text)

    async def _score(self, item: dict[str, Any], options: dict[str, Any]) -> Reward:
        trajectory = Trajectory.model_validate(candidates(item))
        return await self.model.score(trajectory, RequestOptions(return_samples=True, **options))


def serve(spec: GenerativeSpec) -> Iterator[Served]:
    model = load_model(spec)
    loop = asyncio.new_event_loop()
    try:
        yield Served(model, loop)
    finally:
        model.shutdown()
        close_engine_loop(loop)


@pytest.fixture(scope="module")
def served(trained: Path) -> Iterator[Served]:
    yield from serve(judge_spec(trained))


@pytest.fixture(scope="module")
def reference(trained: Path) -> Any:
    """transformers' greedy judgement of an item: the text after the prompt, special tokens
    (the EOS) skipped, as vLLM detokenizes."""
    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()

    def judge(item: dict[str, Any], max_tokens: int = MAX_TOKENS) -> str:
        ids = tokenizer(chat_text(tokenizer, judge_prompt(item)), add_special_tokens=False)
        prompt = torch.tensor([ids["input_ids"]])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False)
        text: str = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        return text

    return judge


def rm_r1_verdict(judgment: str) -> str:
    """RM-R1's extraction (process_judgement in eval/reward-bench/rewardbench/generative.py):
    the first of [[A]], [[B]] found in the text."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    return "error"


def rm_r1_answer(judgment: str) -> str:
    """The verdict RM-R1 means: its extraction applied to what follows the thinking."""
    return rm_r1_verdict(judgment.rpartition("</think>")[2])


@pytest.mark.engine
@pytest.mark.parametrize(
    "item", [HONEST_A, HONEST_B, UNSEEN], ids=["trained-1", "trained-2", "unseen"]
)
def test_judgements_equal_transformers_greedy_decoding(
    served: Served, reference: Any, item: dict[str, Any]
) -> None:
    expected = reference(item)
    if item is not UNSEEN:  # the fine-tuned twin answers as trained: the check is not vacuous
        assert expected == ANSWER
    assert served.judgement(item) == repr("<think>\n" + expected)
    if rm_r1_answer(expected) != "error":
        reward = served.score(item)
        assert reward.verdict == rm_r1_answer(expected)
        assert reward.critique == ""  # nothing but the answer follows the thinking


@pytest.mark.engine
def test_a_marker_in_the_thinking_does_not_outvote_the_answer(served: Served) -> None:
    reward = served.score(HONEST_A)
    assert reward.verdict == "B" and reward.scores == [0.0, 1.0]
    # RM-R1's own evaluation script reads the first marker anywhere, thinking included.
    assert rm_r1_verdict(ANSWER) == "A"


@pytest.mark.engine
def test_a_verdict_only_in_unfinished_thinking_is_no_verdict(
    served: Served, reference: Any, trained: Path
) -> None:
    """Cut while thinking, right after the thinking wrote [[A]]: no verdict, never A."""
    tokenizer = AutoTokenizer.from_pretrained(trained)
    cut = len(tokenizer(ANSWER.partition("]]")[0] + "]]", add_special_tokens=False)["input_ids"])
    truncated = reference(HONEST_A, max_tokens=cut)
    assert truncated.endswith("[[A]]") and rm_r1_verdict(truncated) == "A"
    with pytest.raises(ItemError) as raised:
        served.score(HONEST_A, max_tokens=cut)
    assert raised.value.code == "parse_error"
    assert "unclosed <think>" in raised.value.message


@pytest.mark.engine
def test_batch_invariance(served: Served) -> None:
    """The judgements of 64 items scored together equal each scored alone (greedy)."""
    words = ["twelve", "seven", "eighty", "four", "product", "sum", "answer", "is", "the", "of"]
    items = [
        pair(" ".join(words[(i + k) % len(words)] for k in range(3 + i % 9)), f"It is {80 + i}.")
        for i in range(BATCH)
    ]
    together = served.judgements(items)
    alone = [served.judgement(item) for item in items[:8]]
    assert len(together) == BATCH and together[:8] == alone
    print(
        f"\n{RM_R1_JUDGE.name}: 8 of 8 judgements alone equal their batch-of-{BATCH} text "
        f"({len(set(together))} distinct judgements in the batch)"
    )


@pytest.fixture(scope="module")
def served_structured(trained: Path) -> Iterator[Served]:
    yield from serve(judge_spec(trained, structured_output=True, max_critique_chars=200))


@pytest.mark.engine
@pytest.mark.parametrize("item", [HONEST_A, HONEST_B], ids=["trained-1", "trained-2"])
def test_structured_output_lets_the_judge_think_then_constrains_the_answer(
    served_structured: Served, item: dict[str, Any]
) -> None:
    reward = served_structured.score(item)
    assert reward.samples is not None
    # The thinking is the model's own; the answer ends at its marker (nothing may follow it).
    assert reward.samples[0].text.startswith("<think>\n" + THOUGHT + "</think>")
    assert reward.verdict == "B"


def test_the_catalogue_serves_rm_r1_as_its_twin_is_served() -> None:
    path = EXAMPLES / "registry.catalogue.yaml"
    entries = {spec.weights: spec for spec in load_registry(path).models.values()}
    entry = entries[RM_R1_JUDGE.real_weights]
    assert isinstance(entry, GenerativeSpec)
    expected = GenerativeOptions.model_validate(RM_R1_JUDGE.options)
    assert entry.options.mode == expected.mode and entry.options.thinking
    assert entry.options.template_name == expected.template_name
    assert f"twin {RM_R1_JUDGE.name} " in path.read_text()
