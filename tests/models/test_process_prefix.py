"""PRM step scores from per-step prefix requests (`reuse_prefix`) equal the single per-token
request and a transformers reference, and let vLLM's prefix cache compute a group's shared
prompt once (the real vLLM CPU engine, one per module)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rmserve.models.base import RequestOptions
from rmserve.models.engine import VllmPoolingEngine, engine_args, stat_logger_factory
from rmserve.models.process import ProcessModel
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import ProcessSpec
from rmserve.models.tiny import STEP_TAG
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory
from tests.conftest import close_engine_loop
from tests.e2e import reference as ref

pytestmark = pytest.mark.engine

TOL = 1e-4
MAX_MODEL_LEN = 2048
_TEXT = (
    "the answer is step add compute check apples capital France Paris tests loop error "
    "number then so let be of to and in warm sun fox dog cat tool search query"
)
WORDS = _TEXT.split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Counters:
    """What the engine did: prefix-cache queries and hits (vLLM's scheduler statistics, as
    `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` count them), and per request the
    prompt tokens and those served from the cache."""

    queries: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    tasks: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.queries = self.hits = self.prompt_tokens = self.cached_tokens = self.requests = 0
        self.tasks.clear()

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    # rmserve.models.engine.EngineStats: what vLLM's stat logger reports.
    def prefix_cache(self, queries: int, hits: int) -> None:
        self.queries += queries
        self.hits += hits

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        pass

    def iteration(self, batch: int, prompt_tokens: int, generation_tokens: int) -> None:
        pass


class CountingLLM:
    """The AsyncLLM, counting each request's prompt and cached tokens."""

    def __init__(self, llm: Any, counters: Counters) -> None:
        self._llm = llm
        self._counters = counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def encode(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        async for output in self._llm.encode(prompt, params, request_id):
            if output.finished:
                self._counters.requests += 1
                self._counters.tasks.append(params.task)
                self._counters.prompt_tokens += len(output.prompt_token_ids)
                self._counters.cached_tokens += output.num_cached_tokens
            yield output


@dataclass
class Engine:
    engine: VllmPoolingEngine
    llm: Any
    counters: Counters
    loop: asyncio.AbstractEventLoop
    path: Path

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def model(self, max_model_len: int = MAX_MODEL_LEN, **options: Any) -> ProcessModel:
        spec = ProcessSpec.model_validate(
            {
                "name": "tiny-prm",
                "kind": "process",
                "weights": str(self.path),
                "engine": engine_options(),
                "options": {"step_tag": STEP_TAG, **options},
            }
        )
        renderer = ChatRenderer(ref.tokenizer(self.path), max_model_len, spec.options.too_long)
        return ProcessModel(spec, renderer, self.engine)

    async def score_group(
        self, model: ProcessModel, items: list[Trajectory]
    ) -> list[list[float | None]]:
        """Score a group the way the service does (concurrently), from a cold prefix cache,
        counting what the engine did for it."""
        await self.llm.reset_prefix_cache()
        await asyncio.sleep(0.5)
        self.counters.reset()
        rewards = await asyncio.gather(*(model.score(i, RequestOptions()) for i in items))
        await asyncio.sleep(0.5)  # the last step's statistics reach the stat logger
        return [r.step_scores for r in rewards]


def engine_options() -> dict[str, Any]:
    return {
        "max_model_len": MAX_MODEL_LEN,
        "dtype": "float32",
        "kv_cache_gib": 0.25,
        "enforce_eager": True,
    }


def start_engine(path: Path) -> tuple[Engine, Any]:
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    spec = ProcessSpec.model_validate(
        {
            "name": "tiny-prm",
            "kind": "process",
            "weights": str(path),
            "engine": engine_options(),
            "options": {"step_tag": STEP_TAG},
        }
    )
    counters = Counters()
    args = engine_args(path, path, spec.engine)
    args.disable_log_stats = False  # the scheduler's prefix-cache statistics
    llm = AsyncLLM.from_engine_args(
        args,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[stat_logger_factory(counters)],
    )
    engine = VllmPoolingEngine(CountingLLM(llm, counters), llm.model_config.max_model_len)
    return Engine(engine, llm, counters, asyncio.new_event_loop(), path), llm


@pytest.fixture(scope="module")
def tiny_prm(tiny_models: dict[str, Path]) -> Iterator[Engine]:
    engine, llm = start_engine(tiny_models["tiny-prm"])
    try:
        yield engine
    finally:
        llm.shutdown()
        close_engine_loop(engine.loop)


Chat = list[dict[str, Any]]


def separator_group(n: int, prompt_words: int, steps: int, step_words: int) -> list[Chat]:
    """`n` responses to one prompt, each a final answer of `steps` steps."""
    rng = random.Random(0)
    prompt = words(rng, prompt_words)
    return [
        [
            {"role": "system", "content": "Answer step by step."},
            {"role": "user", "content": prompt},
            {
                "role": "assistant",
                "content": "\n\n".join(words(rng, step_words) for _ in range(steps)),
            },
        ]
        for _ in range(n)
    ]


def turns_group(n: int, prompt_words: int, turns: int, turn_words: int) -> list[Chat]:
    """`n` conversations after one prompt, each of `turns` assistant turns."""
    rng = random.Random(1)
    prompt = words(rng, prompt_words)
    chats = []
    for _ in range(n):
        chat: Chat = [{"role": "user", "content": prompt}]
        for turn in range(turns):
            if turn:
                chat.append({"role": "user", "content": words(rng, 5)})
            chat.append({"role": "assistant", "content": words(rng, turn_words)})
        chats.append(chat)
    return chats


def trajectories(chats: list[Chat]) -> list[Trajectory]:
    return [Trajectory.model_validate({"messages": chat}) for chat in chats]


def reference_ids(path: Path, chat: Chat, steps: str) -> list[int]:
    """The tagged conversation tokenized, built with the HF tokenizer's own chat template."""
    chat = [dict(m) for m in chat]
    if steps == "separator":
        pieces = [s.strip() for s in chat[-1]["content"].split("\n\n")]
        chat[-1] = {**chat[-1], "content": "".join(p + STEP_TAG for p in pieces)}
        return ref.token_ids(path, ref.render(path, chat))
    full = ref.render(path, chat)
    cuts = [
        len(ref.render(path, chat[: i + 1])) for i, m in enumerate(chat) if m["role"] == "assistant"
    ]
    text = "".join(full[a:b] + STEP_TAG for a, b in zip([0, *cuts], cuts, strict=False))
    text += full[cuts[-1] :]
    return ref.token_ids(path, text)


def reference_scores(
    path: Path, chat: Chat, steps: str, activation: str, max_model_len: int
) -> list[float | None]:
    """transformers' per-token head on the ids the engine gets (left-truncated to fit)."""
    ids = reference_ids(path, chat, steps)
    tag = ref.tokenizer(path).convert_tokens_to_ids(STEP_TAG)
    n_steps = ids.count(tag)
    ids = ids[max(0, len(ids) - max_model_len) :]
    rows = ref.token_logits(path, ids)
    kept = [rows[p] for p, token in enumerate(ids) if token == tag]
    scores: list[float | None] = [None] * (n_steps - len(kept))
    for row in kept:
        scores.append(ref.sigmoid(row[1]) if activation == "sigmoid" else ref.softmax_label(row, 1))
    return scores


def assert_close(got: list[list[float | None]], want: list[list[float | None]]) -> None:
    assert len(got) == len(want)
    for got_item, want_item in zip(got, want, strict=True):
        assert [s is None for s in got_item] == [s is None for s in want_item]
        for g, w in zip(got_item, want_item, strict=True):
            if w is not None:
                assert g == pytest.approx(w, abs=TOL, rel=0)


CASES = [
    # steps, activation, the renderer's max_model_len (smaller ones truncate the left).
    pytest.param("separator", "softmax", MAX_MODEL_LEN, id="separator"),
    pytest.param("assistant_turns", "sigmoid", MAX_MODEL_LEN, id="assistant_turns"),
    pytest.param("separator", "softmax", 80, id="separator-truncated"),
    pytest.param("assistant_turns", "sigmoid", 80, id="assistant_turns-truncated"),
]


@pytest.mark.parametrize(("steps", "activation", "max_model_len"), CASES)
def test_step_scores_equal_per_token_request_and_transformers(
    tiny_prm: Engine, steps: str, activation: str, max_model_len: int
) -> None:
    if steps == "separator":
        chats = separator_group(n=4, prompt_words=300, steps=4, step_words=25)
    else:
        chats = turns_group(n=4, prompt_words=300, turns=3, turn_words=25)
    items = trajectories(chats)
    options = {"steps": steps, "activation": activation, "too_long": "truncate_left"}
    on = tiny_prm.model(max_model_len, **options, reuse_prefix=True)
    off = tiny_prm.model(max_model_len, **options, reuse_prefix=False)

    with_reuse = tiny_prm.run(tiny_prm.score_group(on, items))
    assert set(tiny_prm.counters.tasks) == {"classify"}
    without = tiny_prm.run(tiny_prm.score_group(off, items))
    assert set(tiny_prm.counters.tasks) == {"token_classify"}
    want = [reference_scores(tiny_prm.path, c, steps, activation, max_model_len) for c in chats]

    n_steps = 4 if steps == "separator" else 3
    assert all(len(s) == n_steps for s in want)
    if max_model_len < MAX_MODEL_LEN:  # some steps truncated away, some kept
        assert all(s[0] is None and s[-1] is not None for s in want)
    else:
        assert all(None not in s for s in want)
    assert_close(with_reuse, want)
    assert_close(without, want)
    assert_close(with_reuse, without)


def test_truncation_usage_unchanged(tiny_prm: Engine) -> None:
    item = trajectories(separator_group(n=1, prompt_words=300, steps=4, step_words=25))[0]
    options = {"too_long": "truncate_left"}
    on = tiny_prm.model(80, **options, reuse_prefix=True)
    off = tiny_prm.model(80, **options, reuse_prefix=False)
    reward_on = tiny_prm.run(on.score(item, RequestOptions()))
    reward_off = tiny_prm.run(off.score(item, RequestOptions()))
    assert reward_on.prompt_tokens == reward_off.prompt_tokens == 80
    assert reward_on.truncated_tokens == reward_off.truncated_tokens > 0
    assert reward_on.score == pytest.approx(reward_off.score, abs=TOL)


def test_group_shares_prompt_through_prefix_cache(tiny_prm: Engine) -> None:
    # A GRPO group: 8 responses of ~190 tokens in 4 steps to one ~950-token prompt.
    chats = separator_group(n=8, prompt_words=770, steps=4, step_words=40)
    items = trajectories(chats)
    on = tiny_prm.model(reuse_prefix=True)
    off = tiny_prm.model(reuse_prefix=False)

    tiny_prm.run(tiny_prm.score_group(off, items))
    off_hits, off_computed = tiny_prm.counters.hits, tiny_prm.counters.computed_tokens
    off_requests = tiny_prm.counters.requests
    tiny_prm.run(tiny_prm.score_group(on, items))
    on_hits, on_computed = tiny_prm.counters.hits, tiny_prm.counters.computed_tokens
    on_queries, on_requests = tiny_prm.counters.queries, tiny_prm.counters.requests

    assert off_requests == 8 and on_requests == 8 * 4
    # Per-token requests never read the prefix cache: every item recomputes the prompt.
    item_tokens = sum(len(reference_ids(tiny_prm.path, c, "separator")) for c in chats)
    assert off_hits == 0
    assert off_computed == item_tokens
    assert on_hits > 0 and on_queries > on_hits
    # With prefix requests the prompt is computed about once per group. Hits are whole KV
    # blocks (128 tokens on CPU), so each step request still recomputes the tail of its
    # last block: about 4,300 tokens computed against 9,100 here.
    assert on_computed < 0.6 * off_computed


class FakeEngine:
    """Head rows that depend on a token's position and id, like a causal model's would."""

    max_model_len = MAX_MODEL_LEN

    def __init__(self, tasks: set[str], fail_at: int | None = None) -> None:
        self.tasks = tasks
        self.fail_at = fail_at
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def row(prefix: list[int]) -> list[float]:
        return [0.0, (len(prefix) % 97) / 50 + prefix[-1] / 5000]

    async def pool(self, token_ids: list[int], task: str) -> list[list[float]]:
        self.calls.append((task, len(token_ids)))
        await asyncio.sleep(0)
        if len(token_ids) == self.fail_at:
            raise ItemError("invalid_input", "the engine refused this prefix")
        if task == "classify":
            return [self.row(token_ids)]
        return [self.row(token_ids[: i + 1]) for i in range(len(token_ids))]

    async def supports(self, task: str) -> bool:
        return task in self.tasks

    def shutdown(self) -> None:
        pass


def fake_model(path: Path, engine: FakeEngine, max_model_len: int, **options: Any) -> ProcessModel:
    spec = ProcessSpec.model_validate(
        {
            "name": "fake-prm",
            "kind": "process",
            "weights": str(path),
            "options": {"step_tag": STEP_TAG, "too_long": "truncate_left", **options},
        }
    )
    renderer = ChatRenderer(ref.tokenizer(path), max_model_len, spec.options.too_long)
    return ProcessModel(spec, renderer, engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_model_len", [MAX_MODEL_LEN, 80])
def test_requests_made_and_fallback(tiny_models: dict[str, Path], max_model_len: int) -> None:
    path = tiny_models["tiny-prm"]
    item = trajectories(separator_group(n=1, prompt_words=300, steps=4, step_words=25))[0]
    both, token_only = FakeEngine({"classify", "token_classify"}), FakeEngine({"token_classify"})
    rewards = {}
    for name, engine, reuse in [
        ("prefix", both, True),
        ("off", FakeEngine({"classify", "token_classify"}), False),
        ("unsupported", token_only, True),
    ]:
        model = fake_model(path, engine, max_model_len, reuse_prefix=reuse)
        rewards[name] = asyncio.run(model.score(item, RequestOptions()))
    kept = [s for s in rewards["off"].step_scores if s is not None]
    assert [task for task, _ in both.calls] == ["classify"] * len(kept)
    assert [task for task, _ in token_only.calls] == ["token_classify"]
    # The prefixes end at the kept tags of the (truncated) ids the engine gets.
    ids = reference_ids(path, separator_group(1, 300, 4, 25)[0], "separator")
    ids = ids[max(0, len(ids) - max_model_len) :]
    tag = ref.tokenizer(path).convert_tokens_to_ids(STEP_TAG)
    assert sorted(n for _, n in both.calls) == [p + 1 for p, t in enumerate(ids) if t == tag]
    for name in ("prefix", "unsupported"):
        assert rewards[name].step_scores == rewards["off"].step_scores
        assert rewards[name].prompt_tokens == rewards["off"].prompt_tokens == len(ids)
        assert rewards[name].truncated_tokens == rewards["off"].truncated_tokens
        assert rewards[name].score == rewards["off"].score


def test_a_failed_step_fails_the_item(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["tiny-prm"]
    item = trajectories(separator_group(n=1, prompt_words=300, steps=4, step_words=25))[0]
    ids = reference_ids(path, separator_group(1, 300, 4, 25)[0], "separator")
    tag = ref.tokenizer(path).convert_tokens_to_ids(STEP_TAG)
    second_tag = [p for p, t in enumerate(ids) if t == tag][1]
    engine = FakeEngine({"classify", "token_classify"}, fail_at=second_tag + 1)
    model = fake_model(path, engine, MAX_MODEL_LEN)
    with pytest.raises(ItemError) as caught:
        asyncio.run(model.score(item, RequestOptions()))
    assert caught.value.code == "invalid_input"
