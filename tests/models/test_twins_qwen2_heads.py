"""Tiny twins of Qwen2.5-Math-PRM-7B (Qwen2ForProcessRewardModel) and Qwen2.5-Math-RM-72B
(Qwen2ForRewardModel), whose heads transformers does not define, served the way
examples/registry.catalogue.yaml serves the real models (the project's loader, the real vLLM
CPU engine, one per model).

* The prompt rmserve renders is the family's own `apply_chat_template(messages,
  tokenize=True)`, token for token (the PRM's with its steps joined by <extra_0>).
* PRM step scores (softmax of the 2-label head, label 1, at each <extra_0>) equal the model
  card's `make_step_rewards` on the reference below (1e-4), with `reuse_prefix` off (the
  catalogue's) and on: vLLM serves this head per token only, so `reuse_prefix` falls back to
  the same one per-token request per item, and says so.
* The RM's score is the reference's output at the last token (1e-4).
* Batch invariance: an item scored alone and inside a batch of 64 mixed-length items (1e-5).
* Issue #23 (every PRM item `internal_error: ... IndexError`, vLLM's STEP pooling) cannot come
  back: the engine pools every token, and these scores exist at all only because it does.

The reference is the published head written out: transformers' `Qwen2Model` and the remote
code's `score` Sequential, loading the twin's safetensors. The measured maxima are printed
(pytest -s) and recorded as test properties.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen2Model

from rmserve.examples import HERE as EXAMPLES
from rmserve.models import engine as engine_module
from rmserve.models.base import RequestOptions, Reward, RewardModel
from rmserve.models.loader import load_model
from rmserve.models.process import ProcessModel
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import (
    DiscriminativeSpec,
    EngineOptions,
    ModelSpec,
    ProcessSpec,
    load_registry,
)
from rmserve.models.tiny.qwen2_heads import STEP_TAG
from rmserve.wire.trajectory import Trajectory
from tests.conftest import close_engine_loop

pytestmark = pytest.mark.engine

FIDELITY_TOL = 1e-4
BATCH_TOL = 1e-5
MAX_MODEL_LEN = 1024
BATCH = 64
CATALOGUE = EXAMPLES / "registry.catalogue.yaml"
PRM_ENTRY = "qwen2.5-math-prm-7b"
RM_ENTRY = "qwen2.5-math-rm-72b"

Chat = list[dict[str, Any]]


# -- the reference: the published head, written out ---------------------------------------------


class Qwen2HeadReference(torch.nn.Module):
    """Qwen2ForProcessRewardModel and Qwen2ForRewardModel as their repositories define them:
    a Qwen2Model and `score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(),
    nn.Linear(hidden, num_labels))` applied to every token's last hidden state.

    https://huggingface.co/Qwen/Qwen2.5-Math-PRM-7B/blob/main/modeling_qwen2_rm.py (the PRM
    returns these per-token logits; its model card's make_step_rewards reads them at <extra_0>)
    https://huggingface.co/Qwen/Qwen2.5-Math-RM-72B/blob/main/modeling_qwen2_rm.py (the RM
    returns them at the last token that is not pad: for one unpadded sequence, the last token)
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, config.num_labels),
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(input_ids=input_ids).last_hidden_state
        logits: torch.Tensor = self.score(hidden_states)
        return logits


@cache
def tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


@cache
def reference(path: Path) -> Qwen2HeadReference:
    model = Qwen2HeadReference(AutoConfig.from_pretrained(path)).float()
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def tagged(chat: Chat) -> Chat:
    """The model card's PRM input: the final answer's steps (split on the separator, "\\n\\n")
    joined by <extra_0>, one after the last."""
    steps = [s.strip() for s in chat[-1]["content"].split("\n\n") if s.strip()]
    return [*chat[:-1], {**chat[-1], "content": STEP_TAG.join(steps) + STEP_TAG}]


def template_ids(path: Path, chat: Chat) -> list[int]:
    encoded = tokenizer(path).apply_chat_template(chat, tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return list(ids)


@torch.no_grad()
def reference_step_scores(path: Path, chat: Chat) -> list[float]:
    """The Qwen2.5-Math-PRM-7B model card's recipe: the chat template's text, the tokenizer,
    softmax over the labels masked to the <extra_0> positions, the positive label."""
    tok = tokenizer(path)
    text = tok.apply_chat_template(tagged(chat), tokenize=False, add_generation_prompt=False)
    input_ids = tok.encode(text, return_tensors="pt")
    logits = reference(path)(input_ids)
    token_masks = input_ids == tok.encode(STEP_TAG)[0]
    probabilities = torch.softmax(logits, dim=-1) * token_masks.unsqueeze(-1)
    sample = probabilities[0]
    positive_probs = sample[sample != 0].view(-1, 2)[:, 1]
    return [float(p) for p in positive_probs]


@torch.no_grad()
def reference_score(path: Path, chat: Chat) -> float:
    """The Qwen2.5-Math-RM-72B model card's recipe: template text, tokens without added special
    tokens, the head's output at the last one."""
    tok = tokenizer(path)
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    input_ids = tok.encode(text, return_tensors="pt", add_special_tokens=False)
    return float(reference(path)(input_ids)[0, -1, 0])


# -- conversations -----------------------------------------------------------------------------

_TEXT = (
    "let x be the number of apples then 3x + 5 = 20 so x = 5 first compute 12 * 7 = 84 add 16 "
    "to get 100 the answer is \\boxed{100} area rectangle 4 \\times 8 = 32 square feet each "
    "piece probability \\frac{1}{6} events disjoint substitute y = 2 into the equation"
)
_WORDS = _TEXT.split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def solution(rng: random.Random, steps: int, step_words: int) -> str:
    return "\n\n".join(words(rng, step_words) for _ in range(steps))


def conversation(
    rng: random.Random, steps: int, step_words: int, system: bool = False, turns: int = 1
) -> Chat:
    chat: Chat = []
    if system:
        chat.append({"role": "system", "content": "You are a careful math tutor."})
    for _ in range(turns - 1):
        chat.append({"role": "user", "content": words(rng, 8)})
        chat.append({"role": "assistant", "content": words(rng, 10)})
    chat.append({"role": "user", "content": words(rng, 15)})
    chat.append({"role": "assistant", "content": solution(rng, steps, step_words)})
    return chat


def cases() -> dict[str, Chat]:
    rng = random.Random(23)
    return {
        "one-step": conversation(rng, 1, 12),
        "three-steps": conversation(rng, 3, 15),
        "system": conversation(rng, 4, 10, system=True),
        "multi-turn": conversation(rng, 2, 20, turns=3),
        "long": conversation(rng, 6, 40),
    }


def mixed_batch(probe: Chat) -> tuple[list[Chat], int]:
    """64 conversations of mixed lengths (1 to 7 steps of 3 to 60 words) with `probe` among
    them; its index."""
    rng = random.Random(64)
    chats = [
        conversation(rng, rng.randint(1, 7), rng.randint(3, 60), system=rng.random() < 0.3)
        for _ in range(BATCH - 1)
    ]
    where = BATCH // 2
    return [*chats[:where], probe, *chats[where:]], where


def trajectory(chat: Chat) -> Trajectory:
    return Trajectory.model_validate({"messages": chat})


# -- serving: the catalogue's entries with the twins' weights ----------------------------------


class RecordingLLM:
    """The AsyncLLM, recording each request's task and prompt ids."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.requests: list[tuple[str, list[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def encode(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.requests.append((params.task, list(prompt["prompt_token_ids"])))
        async for output in self._llm.encode(prompt, params, request_id):
            yield output


@dataclass
class Served:
    path: Path
    spec: ModelSpec
    model: RewardModel
    llm: RecordingLLM
    loop: asyncio.AbstractEventLoop
    measured: dict[str, float] = field(default_factory=dict)

    def score(self, chats: list[Chat], model: RewardModel | None = None) -> list[Reward]:
        """Score concurrently, as the service does; the requests it made are in llm.requests."""
        scorer = model or self.model
        self.llm.requests.clear()

        async def run() -> list[Reward]:
            items = [trajectory(chat) for chat in chats]
            return list(
                await asyncio.gather(*(scorer.score(item, RequestOptions()) for item in items))
            )

        return self.loop.run_until_complete(run())


def catalogue_spec(entry: str, path: Path) -> ModelSpec:
    """The catalogue's entry for the real model, with the twin's weights and a CPU engine."""
    spec = load_registry(CATALOGUE).models[entry]
    engine = EngineOptions(
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        kv_cache_gib=0.25,
        enforce_eager=True,
        max_num_seqs=BATCH,
        trust_remote_code=spec.engine.trust_remote_code,
    )
    return spec.model_copy(update={"weights": str(path), "engine": engine})


def serve(entry: str, path: Path) -> Served:
    spec = catalogue_spec(entry, path)
    recorded: list[RecordingLLM] = []
    start: Callable[..., Any] = engine_module._start_async_llm

    def recording_start(*args: Any, **kwargs: Any) -> Any:
        recorded.append(RecordingLLM(start(*args, **kwargs)))
        return recorded[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "_start_async_llm", recording_start)
        model = load_model(spec)  # the project's loader, as `rmserve serve` loads it
    return Served(path, spec, model, recorded[0], asyncio.new_event_loop())


@pytest.fixture(scope="module")
def prm(qwen2_head_twins: dict[str, Path]) -> Iterator[Served]:
    served = serve(PRM_ENTRY, qwen2_head_twins["prm"])
    try:
        yield served
    finally:
        served.model.shutdown()
        close_engine_loop(served.loop)


@pytest.fixture(scope="module")
def rm(qwen2_head_twins: dict[str, Path]) -> Iterator[Served]:
    served = serve(RM_ENTRY, qwen2_head_twins["rm"])
    try:
        yield served
    finally:
        served.model.shutdown()
        close_engine_loop(served.loop)


def with_reuse_prefix(served: Served, reuse_prefix: bool) -> ProcessModel:
    """Another ProcessModel of the same engine, `reuse_prefix` set."""
    assert isinstance(served.spec, ProcessSpec) and isinstance(served.model, ProcessModel)
    options = served.spec.options.model_copy(update={"reuse_prefix": reuse_prefix})
    spec = served.spec.model_copy(update={"options": options})
    renderer = ChatRenderer(tokenizer(served.path), MAX_MODEL_LEN, options.too_long)
    return ProcessModel(spec, renderer, served.model._engine)


def report(record_property: Callable[[str, object], None], name: str, value: float) -> None:
    print(f"\n{name}: {value:.3g}")
    record_property(name, value)


# -- tests -------------------------------------------------------------------------------------


def test_the_engine_pools_every_token(prm: Served, rm: Served) -> None:
    """Issue #23's cause, gone: vLLM's default for Qwen2ForProcessRewardModel is STEP pooling
    at token 151651; rmserve's engine asks for ALL, and gets one row per token."""
    for served in (prm, rm):
        pooler = served.llm.model_config.pooler_config
        assert pooler.tok_pooling_type == "ALL"
        engine = served.model._engine  # type: ignore[attr-defined]
        assert engine.token_rows_problem() is None
        ids = template_ids(served.path, tagged(cases()["three-steps"]))
        rows = served.loop.run_until_complete(engine.pool(ids, "token_classify"))
        assert len(rows) == len(ids)
        assert len(rows[0]) == (2 if served is prm else 1)
        # Per token only: no last-token classify, so no prefix-cache reuse for these heads.
        tasks = served.loop.run_until_complete(served.llm.get_supported_tasks())
        assert set(tasks) == {"token_classify"}
        assert not served.loop.run_until_complete(engine.supports("classify"))


@pytest.mark.parametrize("case", list(cases()))
def test_rendered_prompt_is_the_templates_own(prm: Served, rm: Served, case: str) -> None:
    chat = cases()[case]
    (reward,) = prm.score([chat])
    ((task, ids),) = prm.llm.requests
    assert task == "token_classify"
    assert ids == template_ids(prm.path, tagged(chat))
    assert reward.prompt_tokens == len(ids)
    (reward,) = rm.score([chat])
    ((task, ids),) = rm.llm.requests
    assert task == "token_classify"
    assert ids == template_ids(rm.path, chat)
    # The card's recipe: the template's text, then the tokenizer (no special tokens added).
    tok = tokenizer(rm.path)
    assert ids == tok.encode(tok.apply_chat_template(chat, tokenize=False))
    # Qwen2.5-Math's default system prompt when the conversation has none.
    text = tok.decode(ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n"
        if chat[0]["role"] == "system"
        else "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n"
    )
    assert text.endswith("<|im_end|>\n")


def test_prm_step_scores_equal_the_reference(
    prm: Served, record_property: Callable[[str, object], None]
) -> None:
    chats = list(cases().values())
    want = [reference_step_scores(prm.path, chat) for chat in chats]
    assert [len(w) for w in want] == [1, 3, 4, 2, 6]
    worst = 0.0
    got: dict[bool, list[list[float | None]]] = {}
    for reuse_prefix in (False, True):
        rewards = prm.score(chats, with_reuse_prefix(prm, reuse_prefix))
        # One per-token request per item, reuse_prefix or not (no last-token classify).
        assert [task for task, _ in prm.llm.requests] == ["token_classify"] * len(chats)
        got[reuse_prefix] = [r.step_scores or [] for r in rewards]
        for reward, expected in zip(rewards, want, strict=True):
            assert reward.step_scores == pytest.approx(expected, abs=FIDELITY_TOL, rel=0)
            steps = [s for s in reward.step_scores or [] if s is not None]
            assert reward.score == min(steps)  # aggregate: min
            assert all(0 < s < 1 for s in steps)
            worst = max(worst, *(abs(g - w) for g, w in zip(steps, expected, strict=True)))
    assert got[True] == got[False]
    report(record_property, "prm_max_abs_diff_vs_reference", worst)


def test_rm_score_equals_the_reference_last_token(
    rm: Served, record_property: Callable[[str, object], None]
) -> None:
    assert isinstance(rm.spec, DiscriminativeSpec)
    chats = list(cases().values())
    rewards = rm.score(chats)
    assert [task for task, _ in rm.llm.requests] == ["token_classify"] * len(chats)
    worst = 0.0
    for reward, chat in zip(rewards, chats, strict=True):
        want = reference_score(rm.path, chat)
        assert reward.score == pytest.approx(want, abs=FIDELITY_TOL, rel=0)
        assert reward.scores is None  # one output
        worst = max(worst, abs(reward.score - want))
    assert len({round(r.score, 3) for r in rewards}) == len(chats)  # scores that differ
    report(record_property, "rm_max_abs_diff_vs_reference", worst)


@pytest.mark.parametrize("which", ["prm", "rm"])
def test_batch_invariance(
    request: pytest.FixtureRequest, which: str, record_property: Callable[[str, object], None]
) -> None:
    served: Served = request.getfixturevalue(which)
    probes = [cases()["three-steps"], cases()["long"]]
    worst = 0.0
    for probe in probes:
        (alone,) = served.score([probe])
        batch, where = mixed_batch(probe)
        in_batch = served.score(batch)
        assert len(served.llm.requests) == BATCH
        lengths = {len(ids) for _, ids in served.llm.requests}
        assert len(lengths) > BATCH // 2  # mixed lengths
        if which == "prm":
            steps = in_batch[where].step_scores or []
            pairs = list(zip(alone.step_scores or [], steps, strict=True))
        else:
            pairs = [(alone.score, in_batch[where].score)]
        for a, b in pairs:
            assert a is not None and b is not None
            assert abs(a - b) <= BATCH_TOL
            worst = max(worst, abs(a - b))
    report(record_property, f"{which}_batch_max_abs_diff", worst)
