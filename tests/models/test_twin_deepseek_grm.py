"""A principle-and-critique judge in the style of DeepSeek-GRM (arXiv:2504.02495), proven on the
tiny twin of DeepSeek-GRM-27B (rmserve.models.tiny.judges: Gemma-2-27B's causal LM scaled down,
Gemma's chat template), served listwise with answer_format boxed_list and the built-in template
deepseek_grm: one judgement scores every candidate, `Scores: \\boxed{s1, s2}` in order.

* The prompt rmserve renders (GenerativeModel -> LocalBackend -> ChatRenderer) is the twin
  tokenizer's own `apply_chat_template` of the judge prompt as the single user turn (Gemma has
  no system role), token for token.
* On the real vLLM CPU engine, greedy: a copy of the twin fine-tuned for seconds to write
  principles, analysis and `Scores: \\boxed{9, 2}` for known items writes, through rmserve,
  exactly the text transformers' greedy `generate` writes on the same ids, with and without
  structured output; the scores rmserve returns per candidate are what the public extraction
  function (below) reads from transformers' text.
* A judgement without a box, or with a box of the wrong length, is `parse_error` with the raw
  text, never a default score (the public extraction function reads [7.0] from the latter: a
  list one short, which it leaves to its caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmserve.models.base import RequestOptions, Reward
from rmserve.models.engine import Completion, Generation, SamplingRequest, VllmGenerateEngine
from rmserve.models.generative.backends import LocalBackend
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.prompts import JudgePrompt, transcript
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import GenerativeSpec, Registry
from rmserve.models.tiny.judges import GRM_JUDGE_NAME, GRM_JUDGE_TEMPLATE, make_grm_judge_twin
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory
from tests.conftest import close_engine_loop
from tests.trained_judge import train_answers

MAX_MODEL_LEN = 1024
MAX_TOKENS = 256
# With structured output the critique is cut here, so that the box always fits in MAX_TOKENS.
MAX_CRITIQUE_CHARS = 160

Item = dict[str, Any]


def item(question: str, *answers: str) -> Item:
    return {"messages": [{"role": "user", "content": question}], "candidates": list(answers)}


# What the fine-tuned twin writes for these items (greedy): principles, analysis, scores.
ANSWER = (
    "Specific Criteria: correctness (70%), clarity (30%).\n"
    "Analysis: Response 1 subtracts the gift and says 8; Response 2 adds instead.\n"
    "Scores: \\boxed{9, 2}"
)
SCORED = [
    item(
        "Jane has 12 apples and gives 4 to Mark. How many are left?",
        "12 - 4 = 8.\n\nJane has 8 apples left.",
        "She has 16 apples.",
    ),
    item("Which city is the capital of France?", "Lyon, I think.", "It is Paris."),
]
# Three candidates: the twin's box of two scores is one short.
THREE = item("What is 2 + 2?", "4", "5", "22")


def extract_last_floats(text: str) -> list[float]:
    """The reference extraction: DeepSeek-GRM's "official extraction function" as the public
    DeepSeek-GRM-16B reproduction documents it (https://huggingface.co/BBQGOD/DeepSeek-GRM-16B,
    quoted as `extract_last_floats` in public verl reward code: "Extract floats from the last
    \\boxed{} or [] in the text ... \\boxed{7, 8, 9} (for multiple responses, returns list)"):
    the content of the last `\\boxed{...}` (or `[...]`), split at commas, each part that reads
    as a float."""
    pattern = re.compile(r"(?:\\{1,2}boxed\{|\[)\s*([^\]\}]+?)\s*(?:\}|\])")
    matches = list(pattern.finditer(text))
    if not matches:
        return []
    floats = []
    for part in re.split(r"\s*,\s*", matches[-1].group(1).strip()):
        with contextlib.suppress(ValueError):  # a part that is not a float is skipped
            floats.append(float(part))
    return floats


def spec(path: Path, structured: bool = False) -> GenerativeSpec:
    """The registry entry of a DeepSeek-GRM judge (the catalogue's options), the twin's weights."""
    entry = {
        "kind": "generative",
        "weights": str(path),
        "engine": {
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "float32",
            "kv_cache_gib": 0.25,
            "enforce_eager": True,
        },
        "options": {
            "mode": "listwise",
            "answer_format": "boxed_list",
            "score_range": [1, 10],
            "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS},
            "structured_output": structured,
            "max_critique_chars": MAX_CRITIQUE_CHARS,
        },
    }
    model = Registry.model_validate({"models": {GRM_JUDGE_NAME: entry}}).models[GRM_JUDGE_NAME]
    assert isinstance(model, GenerativeSpec)
    assert model.options.template_name == GRM_JUDGE_TEMPLATE
    return model


def judge_prompt(entry: Item) -> str:
    """The judge prompt of an item in its own candidate order (the first judgement's)."""
    trajectory = Trajectory.model_validate(entry)
    candidates = [transcript(c.messages) for c in trajectory.candidates or []]
    return JudgePrompt.load(GRM_JUDGE_TEMPLATE).listwise(
        transcript(trajectory.messages), candidates, trajectory.reference, 1, 10
    )


def reference_ids(tokenizer: Any, entry: Item) -> list[int]:
    """The family's own rendering: Gemma's template, the judge prompt as the one user turn."""
    chat = [{"role": "user", "content": judge_prompt(entry)}]
    ids: list[int] = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    return ids


# -- the twin, built once; a copy fine-tuned on the judge prompts ------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_grm_judge_twin(tmp_path_factory.mktemp(GRM_JUDGE_NAME))


@pytest.fixture(scope="module")
def trained(twin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(twin)
    texts = [
        (tokenizer.decode(reference_ids(tokenizer, entry)), ANSWER) for entry in (*SCORED, THREE)
    ]
    assert all(text.startswith("<bos><start_of_turn>user\n") for text, _ in texts)
    return train_answers(twin, tmp_path_factory.mktemp("grm-trained"), texts, lr=5e-3, margin=2.0)


@pytest.fixture(scope="module")
def cut(trained: Path) -> int:
    """max_tokens that cut the judgement before its box: the tokens of the text before it."""
    tokenizer = AutoTokenizer.from_pretrained(trained)
    return len(tokenizer(ANSWER.partition("Scores:")[0], add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def reference_texts(trained: Path, cut: int) -> list[str]:
    """transformers' greedy judgements, in float32 (eager attention: SDPA ignores Gemma 2's
    logit soft-capping), computed before the engine starts: each SCORED item, THREE, then
    SCORED[0] cut before its box (`cut` tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(
        trained, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    texts = []
    for entry, budget in [(e, MAX_TOKENS) for e in (*SCORED, THREE)] + [(SCORED[0], cut)]:
        ids = torch.tensor([reference_ids(tokenizer, entry)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=budget, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


# -- (a) the rendered prompt -------------------------------------------------------------------


class RecordingEngine:
    """A generate engine that records the token ids it is sent and answers one judgement."""

    max_model_len = MAX_MODEL_LEN
    image_token_id = None

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def generate(
        self, token_ids: list[int], sampling: SamplingRequest, images: Sequence[Any] = ()
    ) -> Generation:
        self.calls.append(list(token_ids))
        return Generation([Completion("Scores: \\boxed{5, 5}", 8, "stop")], len(token_ids))

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize(
    "entry",
    [*SCORED, {**SCORED[0], "reference": "8"}],
    ids=["apples", "capital", "reference"],
)
def test_rendered_prompt_is_gemmas_own_template(twin: Path, entry: Item) -> None:
    tokenizer = AutoTokenizer.from_pretrained(twin)
    engine = RecordingEngine()
    backend = LocalBackend(ChatRenderer(tokenizer, MAX_MODEL_LEN, "error"), engine)
    model = GenerativeModel(spec(twin), backend, JudgePrompt.load(GRM_JUDGE_TEMPLATE))
    reward = asyncio.run(model.score(Trajectory.model_validate(entry), RequestOptions()))
    (ids,) = engine.calls
    assert ids == reference_ids(tokenizer, entry)
    assert reward.scores == [5.0, 5.0] and reward.prompt_tokens == len(ids)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\nYou are a skilled expert at scoring")
    assert text.endswith("responses>.<end_of_turn>\n<start_of_turn>model\n")
    assert len(ids) > 64  # past Gemma 2's sliding window (64 tokens in the twin)


# -- (b), (c) the real engine --------------------------------------------------------------------


@dataclass
class Served:
    plain: GenerativeModel
    structured: GenerativeModel
    loop: asyncio.AbstractEventLoop

    def score(self, model: GenerativeModel, entry: Item, max_tokens: int | None = None) -> Reward:
        options = RequestOptions(return_samples=True, max_tokens=max_tokens)
        return self.loop.run_until_complete(model.score(Trajectory.model_validate(entry), options))


@pytest.fixture(scope="module")
def served(trained: Path, reference_texts: list[str]) -> Iterator[Served]:
    """One engine on the fine-tuned twin, built as the loader builds a local judge (engine,
    chat renderer, LocalBackend); the plain and the structured judge share it."""
    plain, structured = spec(trained), spec(trained, structured=True)
    loop = asyncio.new_event_loop()
    engine = VllmGenerateEngine.start(trained, trained, plain.engine)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(trained), engine.max_model_len, "error")
    backend = LocalBackend(renderer, engine)
    prompt = JudgePrompt.load(plain.options.template_name)
    try:
        yield Served(
            GenerativeModel(plain, backend, prompt),
            GenerativeModel(structured, backend, prompt),
            loop,
        )
    finally:
        backend.shutdown()
        close_engine_loop(loop)


@pytest.mark.engine
@pytest.mark.parametrize("structured", [False, True], ids=["free", "structured"])
def test_judgements_and_scores_equal_transformers_and_the_reference_extraction(
    served: Served, reference_texts: list[str], structured: bool
) -> None:
    model = served.structured if structured else served.plain
    for entry, expected in zip(SCORED, reference_texts, strict=False):
        assert expected == ANSWER  # the fine-tuned twin writes what it was taught
        reward = served.score(model, entry)
        assert reward.samples is not None
        (sample,) = reward.samples
        assert sample.text == expected and sample.error is None
        reference = extract_last_floats(expected)
        assert reward.scores is not None and len(reference) == len(reward.scores) == 2
        for score, ref in zip(reward.scores, reference, strict=True):
            assert score is not None and abs(score - ref) <= 1e-4
        best = max(range(2), key=lambda i: (reference[i], -i))
        assert reward.verdict == "AB"[best] and reward.score == reference[best]
        assert reward.critique == expected[: expected.rindex("\\boxed")].strip()


@pytest.mark.engine
def test_a_judgement_without_a_usable_box_is_a_parse_error_never_a_default(
    served: Served, reference_texts: list[str], cut: int
) -> None:
    three, truncated = reference_texts[len(SCORED) :]
    assert three == ANSWER and truncated == ANSWER.partition("Scores:")[0]
    # The public extraction reads two scores for three responses, and none from the cut text.
    assert extract_last_floats(three) == [9.0, 2.0] and extract_last_floats(truncated) == []
    for entry, text, budget, reason in [
        (THREE, three, None, "has 2 scores for 3 candidates"),
        (SCORED[0], truncated, cut, "no \\boxed{s1, s2, ...}"),
    ]:
        with pytest.raises(ItemError) as caught:
            served.score(served.plain, entry, budget)
        assert caught.value.code == "parse_error"
        assert reason in caught.value.message and repr(text) in caught.value.message
    # Structured output makes the same judge write a box of three scores in range.
    reward = served.score(served.structured, THREE)
    assert reward.scores is not None and len(reward.scores) == 3
    assert all(s is not None and 1 <= s <= 10 and s == int(s) for s in reward.scores)
