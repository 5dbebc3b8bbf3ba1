"""Tiny twins of real discriminative reward models (rmserve.models.tiny.twins: Skywork-Reward-V2
Qwen3 and Llama 3.1, Skywork-Reward Gemma 2), served the way the project serves them.

* The prompt rmserve renders (ChatRenderer, through DiscriminativeModel) is the family's own
  `apply_chat_template(messages, tokenize=True)`, token for token: single-turn, multi-turn, with
  a system message, agent trajectories with tool calls (Llama 3.1 and Qwen3), Qwen3's thinking.
  What a template refuses is an item error, never a silent rewrite (Gemma 2: a system message,
  tool calls).
* Scores through the real vLLM CPU engine (one per family, built by the project's loader from a
  registry spec) equal AutoModelForSequenceClassification in float32 on the same tokens (1e-4).
* Batch invariance: an item scored alone and inside a batch of 64 mixed-length items (1e-5).

The measured maxima are printed (pytest -s) and recorded as test properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmserve.examples import HERE as EXAMPLES
from rmserve.models.base import RequestOptions, RewardModel
from rmserve.models.discriminative import DiscriminativeModel
from rmserve.models.loader import load_model
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import DiscriminativeOptions, DiscriminativeSpec, Registry, load_registry
from rmserve.models.tiny.twins import GEMMA2_RM, LLAMA31_RM, QWEN3_RM, RM_TWINS
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory
from tests.conftest import TwinModels, close_engine_loop

FIDELITY_TOL = 1e-4
BATCH_TOL = 1e-5
MAX_MODEL_LEN = 512
BATCH = 64

Chat = list[dict[str, Any]]

# -- conversations, in the OpenAI form clients send ------------------------------------------

QUESTION = "Jane has 12 apples and gives 4 to Mark. How many are left?"
ANSWER = "12 - 4 = 8.\n\nJane has 8 apples left."

SINGLE: Chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
MULTI: Chat = [
    *SINGLE,
    {"role": "user", "content": "And if she buys 3 more?"},
    {"role": "assistant", "content": "8 + 3 = 11 apples."},
]
SYSTEM: Chat = [{"role": "system", "content": "You are a careful math tutor."}, *SINGLE]
DEVELOPER: Chat = [{"role": "developer", "content": "You are a careful math tutor."}, *SINGLE]


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


AGENT: Chat = [
    {"role": "system", "content": "You are a research assistant with a search tool."},
    {"role": "user", "content": [{"type": "text", "text": "Which city is the capital of France?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call_1", "search", {"query": "capital of France", "top_k": 3})],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Paris is the capital of France."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call_2", "calculator", {"expression": "2 + 2"})],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": "4"},
    {"role": "assistant", "content": "It is Paris.\n\nParis is also its largest city."},
]
# Qwen3 keeps the reasoning of the turns after the last user query, drops the earlier ones, and
# writes an empty think block into a final turn without one (MULTI, SINGLE).
THINKING_MULTI: Chat = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "<think>\nSubtract the gift.\n</think>\n\n" + ANSWER},
    {"role": "user", "content": "And if she buys 3 more?"},
    {"role": "assistant", "content": "<think>\nAdd three.\n</think>\n\n8 + 3 = 11 apples."},
]
THINKING_AGENT: Chat = [
    {"role": "user", "content": "Which city is the capital of France?"},
    {
        "role": "assistant",
        "content": "<think>\nI should search.\n</think>\n\n",
        "tool_calls": [call("call_1", "search", {"query": "capital of France"})],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Paris is the capital of France."},
    {"role": "assistant", "content": "<think>\nThe tool says Paris.\n</think>\n\nIt is Paris."},
]
PARALLEL_CALLS: Chat = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            call("call_1", "weather", {"city": "Paris"}),
            call("call_2", "weather", {"city": "Rome"}),
        ],
    },
]
# An action with a word before it: Gemma 2's template keeps the word and drops the action.
SAY_AND_CALL: Chat = [
    {"role": "user", "content": "Which city is the capital of France?"},
    {
        "role": "assistant",
        "content": "Let me look it up.",
        "tool_calls": [call("call_1", "search", {"query": "capital of France"})],
    },
]
NOT_ALTERNATING: Chat = [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}]

CASES: dict[str, dict[str, Chat]] = {
    QWEN3_RM.name: {
        "single": SINGLE,
        "multi": MULTI,
        "system": SYSTEM,
        "developer": DEVELOPER,
        "agent": AGENT,
        "thinking_multi": THINKING_MULTI,
        "thinking_agent": THINKING_AGENT,
        "parallel_calls": PARALLEL_CALLS,
    },
    LLAMA31_RM.name: {
        "single": SINGLE,
        "multi": MULTI,
        "system": SYSTEM,
        "developer": DEVELOPER,
        "agent": AGENT,
    },
    GEMMA2_RM.name: {"single": SINGLE, "multi": MULTI},
}
# (twin, chat, error code, words of the message)
SYSTEM_ROLE = "System role not supported"
REFUSED = [
    pytest.param(GEMMA2_RM.name, SYSTEM, "template_error", SYSTEM_ROLE, id="gemma2-system"),
    pytest.param(GEMMA2_RM.name, DEVELOPER, "template_error", SYSTEM_ROLE, id="gemma2-developer"),
    pytest.param(
        GEMMA2_RM.name, SAY_AND_CALL, "unsupported_content", "tool calls", id="gemma2-tools"
    ),
    pytest.param(
        GEMMA2_RM.name, NOT_ALTERNATING, "template_error", "must alternate", id="gemma2-roles"
    ),
    pytest.param(
        LLAMA31_RM.name, PARALLEL_CALLS, "template_error", "single tool-calls", id="llama31-calls"
    ),
]


def hf_messages(chat: Chat) -> Chat:
    """The conversation as transformers users pass it to apply_chat_template: text content,
    tool-call arguments as mappings, `developer` as `system`."""
    out = []
    for message in chat:
        entry = dict(message)
        if isinstance(entry.get("content"), list):
            entry["content"] = "".join(part["text"] for part in entry["content"])
        if entry["role"] == "developer":
            entry["role"] = "system"
        if entry.get("tool_calls"):
            entry["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(arguments)}}
                for c in entry["tool_calls"]
                for arguments in [c["function"]["arguments"]]
            ]
        out.append(entry)
    return out


# -- the reference: the family's tokenizer and transformers ------------------------------------


@cache
def tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


@cache
def hf_model(path: Path, overrides: str = "{}") -> Any:
    """transformers' model in float32; `overrides` (JSON) change its configuration. Eager
    attention: transformers' SDPA attention ignores Gemma 2's logit soft-capping."""
    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **json.loads(overrides)
    ).eval()


def reference_ids(path: Path, chat: Chat) -> list[int]:
    ids: list[int] = tokenizer(path).apply_chat_template(hf_messages(chat), tokenize=True)[
        "input_ids"
    ]
    return ids


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """While an engine runs, vLLM's CPU worker holds a core (its OpenMP threads spin): two
    torch threads here would keep waiting for each other (five times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def reference_score(path: Path, ids: list[int], overrides: dict[str, Any] | None = None) -> float:
    model = hf_model(path, json.dumps(overrides or {}, sort_keys=True))
    return float(model(torch.tensor([ids])).logits[0][0])


# -- rendering, through DiscriminativeModel with an engine that records what it gets ----------


class RecordingEngine:
    max_model_len = MAX_MODEL_LEN

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def pool(self, token_ids: list[int], task: str) -> list[list[float]]:
        self.calls.append(list(token_ids))
        return [[0.0]]

    async def supports(self, task: str) -> bool:
        return task == "classify"

    def shutdown(self) -> None:
        pass


def spec(name: str, path: Path) -> DiscriminativeSpec:
    """The twin's registry entry (the real model's options, the twin's weights)."""
    entry = {
        "kind": RM_TWINS[name].kind,
        "weights": str(path),
        "engine": {
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "float32",
            "kv_cache_gib": 0.25,
            "enforce_eager": True,
            "max_num_seqs": BATCH,
        },
        "options": RM_TWINS[name].options,
    }
    model = Registry.model_validate({"models": {name: entry}}).models[name]
    assert isinstance(model, DiscriminativeSpec)
    return model


def rendered_ids(name: str, path: Path, chat: Chat) -> list[int]:
    engine = RecordingEngine()
    renderer = ChatRenderer(tokenizer(path), MAX_MODEL_LEN, "error")
    model = DiscriminativeModel(spec(name, path), renderer, engine)  # type: ignore[arg-type]
    item = Trajectory.model_validate({"messages": chat})
    reward = asyncio.run(model.score(item, RequestOptions()))
    (ids,) = engine.calls
    assert reward.prompt_tokens == len(ids) and reward.truncated_tokens == 0
    return ids


RENDER_CASES = [
    pytest.param(name, case, id=f"{name}-{case}") for name, cases in CASES.items() for case in cases
]


@pytest.mark.parametrize(("name", "case"), RENDER_CASES)
def test_rendered_prompt_is_the_templates_own(
    twin_models: TwinModels, name: str, case: str
) -> None:
    path = twin_models[name]
    chat = CASES[name][case]
    tok = tokenizer(path)
    ids = rendered_ids(name, path, chat)
    assert ids == reference_ids(path, chat)
    # Exactly the BOS the model was trained with, once: what the Skywork README's recipe gives
    # (template text, its BOS string cut, then the tokenizer, which adds the BOS back).
    text = tok.apply_chat_template(hf_messages(chat), tokenize=False)
    if tok.bos_token is not None:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert text.startswith(tok.bos_token)
        text = text[len(tok.bos_token) :]
    assert tok(text)["input_ids"] == ids
    assert tok.pad_token_id not in ids  # transformers pools the last token that is not pad


def test_the_templates_render_what_the_family_does(twin_models: TwinModels) -> None:
    """The distinctive parts of each family's prompt, read back from rmserve's tokens."""
    qwen, llama = twin_models[QWEN3_RM.name], twin_models[LLAMA31_RM.name]

    def text(name: str, path: Path, chat: Chat) -> str:
        decoded: str = tokenizer(path).decode(rendered_ids(name, path, chat))
        return decoded

    single = text(LLAMA31_RM.name, llama, SINGLE)
    assert single.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    )
    assert single.endswith("Jane has 8 apples left.<|eot_id|>")
    agent = text(LLAMA31_RM.name, llama, AGENT)
    assert '{"name": "search", "parameters": {"query": "capital of France", "top_k": 3}}' in agent
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n" in agent

    assert text(QWEN3_RM.name, qwen, SINGLE).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n" + ANSWER + "<|im_end|>\n"
    )
    multi = text(QWEN3_RM.name, qwen, THINKING_MULTI)
    assert "Subtract the gift" not in multi and "<think>\nAdd three.\n</think>" in multi
    thinking_agent = text(QWEN3_RM.name, qwen, THINKING_AGENT)
    assert "I should search." in thinking_agent and "The tool says Paris." in thinking_agent
    assert "<tool_response>\nParis is the capital of France.\n</tool_response>" in thinking_agent
    # <think> and <tool_call> are single tokens, as in Qwen3's vocabulary.
    tok = tokenizer(qwen)
    ids = rendered_ids(QWEN3_RM.name, qwen, THINKING_AGENT)
    for word in ("<think>", "</think>", "<tool_call>", "<tool_response>"):
        assert tok.convert_tokens_to_ids(word) in ids


@pytest.mark.parametrize(("name", "chat", "code", "words"), REFUSED)
def test_what_a_template_refuses_is_an_item_error(
    twin_models: TwinModels, name: str, chat: Chat, code: str, words: str
) -> None:
    """Never a silent change: Gemma 2's template has no system role and never reads tool calls;
    Llama 3.1's takes one tool call per turn. The transformers template agrees (or, for tool
    calls, renders the trajectory without them)."""
    path = twin_models[name]
    with pytest.raises(ItemError) as caught:
        rendered_ids(name, path, chat)
    assert caught.value.code == code and words in caught.value.message
    if code == "template_error":
        with pytest.raises(Exception, match=words):
            reference_ids(path, chat)
    else:
        text = tokenizer(path).apply_chat_template(hf_messages(chat), tokenize=False)
        assert "Let me look it up." in text and "search" not in text  # what rmserve refuses


# -- the real engine --------------------------------------------------------------------------


@dataclass
class Served:
    name: str
    path: Path
    model: RewardModel
    loop: asyncio.AbstractEventLoop

    def alone(self, chats: list[Chat]) -> list[float]:
        """Each item on its own: nothing else in the engine meanwhile."""
        return [self.loop.run_until_complete(self._score(chat)) for chat in chats]

    def together(self, chats: list[Chat]) -> list[float]:
        """All items at once, as a request's batch reaches the engine."""

        async def gather() -> list[float]:
            return list(await asyncio.gather(*(self._score(chat) for chat in chats)))

        return self.loop.run_until_complete(gather())

    def forget_prefixes(self) -> None:
        """Empty vLLM's prefix cache, so that the next prompts are computed whole. (The loader
        keeps the engine to itself: the test reaches in.)"""
        llm = self.model._engine._llm  # type: ignore[attr-defined]
        assert self.loop.run_until_complete(llm.reset_prefix_cache())

    async def _score(self, chat: Chat) -> float:
        item = Trajectory.model_validate({"messages": chat})
        reward = await self.model.score(item, RequestOptions())
        assert reward.score is not None
        return reward.score


@pytest.fixture(scope="module", params=list(RM_TWINS))
def served(request: pytest.FixtureRequest, twin_models: TwinModels) -> Iterator[Served]:
    name = request.param
    path = twin_models[name]
    model = load_model(spec(name, path))
    loop = asyncio.new_event_loop()
    try:
        yield Served(name, path, model, loop)
    finally:
        model.shutdown()
        close_engine_loop(loop)


_TEXT = (
    "the answer is step add compute check apples capital France Paris tests loop error number "
    "then so let be of to and in warm sun fox dog cat tool search query Jane Mark gives buys"
)
WORDS = _TEXT.split()


def mixed_batch(name: str, n: int = BATCH) -> list[Chat]:
    """`n` conversations of 30 to 480 tokens: single and multi-turn, and for the families whose
    template renders tools, agent trajectories."""
    rng = random.Random(7)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    tools = name != GEMMA2_RM.name
    chats: list[Chat] = []
    for i in range(n):
        chat: Chat = [{"role": "user", "content": words(3, 45)}]
        if tools and i % 4 == 3:
            chat += [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call(f"call_{i}", "search", {"query": words(1, 6)})],
                },
                {"role": "tool", "tool_call_id": f"call_{i}", "content": words(5, 45)},
            ]
        for turn in range(rng.randint(1, 3)):
            if turn:
                chat.append({"role": "user", "content": words(2, 15)})
            chat.append({"role": "assistant", "content": words(3, 55)})
        chats.append(chat)
    return chats


@pytest.mark.engine
def test_scores_equal_transformers_and_do_not_depend_on_the_batch(
    served: Served, record_property: Any
) -> None:
    cases = list(CASES[served.name].values())
    batch = mixed_batch(served.name)
    lengths = [len(reference_ids(served.path, chat)) for chat in batch]
    assert min(lengths) < 64 < max(lengths) <= MAX_MODEL_LEN  # past Gemma 2's sliding window

    alone = served.alone(cases + batch)
    # In a batch, from an empty prefix cache (prompts chunked across engine steps beside others)
    # and again from the cache the first pass filled (only each prompt's last block computed).
    served.forget_prefixes()
    cold = served.together(batch)
    warm = served.together(batch)
    with one_torch_thread():
        reference = [
            reference_score(served.path, reference_ids(served.path, c)) for c in cases + batch
        ]

    fidelity = max(abs(a - r) for a, r in zip(alone, reference, strict=True))
    invariance = {
        run: max(abs(a - t) for a, t in zip(alone[len(cases) :], scores, strict=True))
        for run, scores in (("cold", cold), ("warm", warm))
    }
    spread = max(reference) - min(reference)
    print(
        f"\n{served.name}: {len(alone)} items, max |vLLM - transformers| {fidelity:.2e}; "
        f"max |alone - in a batch of {BATCH}| {invariance['cold']:.2e} (cold prefix cache), "
        f"{invariance['warm']:.2e} (warm); score spread {spread:.2f}"
    )
    record_property(f"{served.name}.fidelity_max", fidelity)
    for run, value in invariance.items():
        record_property(f"{served.name}.batch_invariance_max.{run}", value)
    assert fidelity <= FIDELITY_TOL
    assert max(invariance.values()) <= BATCH_TOL
    assert spread > 1.0  # different conversations, different scores: the checks are not vacuous


def test_each_twin_verifies_an_entry_of_the_catalogue() -> None:
    """examples/registry.catalogue.yaml serves each real model as its twin is served here."""
    path = EXAMPLES / "registry.catalogue.yaml"
    entries = {spec.weights: spec for spec in load_registry(path).models.values()}
    for twin in RM_TWINS.values():
        entry = entries[twin.real_weights]
        assert isinstance(entry, DiscriminativeSpec) and entry.kind == twin.kind
        assert entry.options == DiscriminativeOptions.model_validate(twin.options)
        assert f"twin {twin.name} " in path.read_text()  # the entry's comment names its twin
        assert twin.config["architectures"] == [twin.architecture]


# -- the twins exercise what makes their family different --------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        pytest.param(GEMMA2_RM.name, {"attn_logit_softcapping": None}, id="gemma2-softcapping"),
        pytest.param(GEMMA2_RM.name, {"sliding_window": 4096}, id="gemma2-sliding-window"),
        pytest.param(GEMMA2_RM.name, {"query_pre_attn_scalar": 64}, id="gemma2-query-scalar"),
        pytest.param(
            LLAMA31_RM.name,
            {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
            id="llama31-rope-scaling",
        ),
    ],
)
def test_the_distinctive_features_change_the_score(
    twin_models: TwinModels, name: str, overrides: dict[str, Any]
) -> None:
    """Without the feature the twin scores a long conversation differently, so the engine test
    above would catch an engine that ignored it."""
    path = twin_models[name]
    chat = max(mixed_batch(name), key=lambda c: len(reference_ids(path, c)))
    ids = reference_ids(path, chat)
    assert len(ids) > 300
    assert abs(reference_score(path, ids, overrides) - reference_score(path, ids)) > 1e-3
