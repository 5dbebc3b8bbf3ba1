"""rmserve.client.trl as TRL's `reward_funcs`: the real GRPOTrainer (trl 1.16.0) trains a tiny
random policy for a step or two against a real `rmserve serve` on loopback whose models are
weight-free verifiers (similarity, math, code tests in bubblewrap); the trainer's call shape is
also replayed directly.

Independent checks: each reward TRL used is recomputed here from the completion TRL logged and
the dataset's reference with the verifier's own function, and the server's job counter says it
scored every completion.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.client import RewardServiceError
from rmserve.client.client import group_of
from rmserve.client.trl import AsyncRMServeReward, RMServeReward, UnscoredItemsError, build_item
from rmserve.models.verifiers.similarity import similarity
from rmserve.service.launcher import ServerProcess, free_port
from tests.conftest import start_server

REGISTRY = """\
models:
  rouge:
    kind: similarity
    options: {metric: rougeL}
  fuzzy:
    kind: similarity
    options: {metric: fuzzy}
  math:
    kind: math
  unit-tests:
    kind: code_tests
    options: {timeout_s: 2}
"""
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "red", "blue", "say", "hello",
         "world", "yes", "no"]  # fmt: skip
PROMPTS = ["the cat sat", "say hello", "the dog is", "a mat is"]
# Chat template of the tiny policy (conversational prompts): the turns' text.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("trl-service")
    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    server = start_server(registry, workdir, {})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer Llama with a word-level tokenizer (generates words of WORDS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("policy")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class Call:
    """One call TRL made: what it passed, what was sent to rmserve, what it got back."""

    prompts: list[Any]
    completions: list[Any]
    completion_ids: Any
    kwargs: dict[str, Any]
    items: list[dict[str, Any]]
    rewards: list[float | None]
    thread: threading.Thread


class Recorded(RMServeReward):
    """The adapter, recording its calls (the scoring is the adapter's own)."""

    def __init__(self, model: str, url: str | None = None, **settings: Any) -> None:
        super().__init__(model, url, **settings)
        self.calls: list[Call] = []
        self._sent: list[dict[str, Any]] = []

    def _items(self, *args: Any) -> list[dict[str, Any]]:
        self._sent = super()._items(*args)
        return self._sent

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        rewards = super().__call__(prompts, completions, completion_ids, **kwargs)
        call = Call(list(prompts), list(completions), completion_ids, kwargs, self._sent, rewards,
                    threading.current_thread())  # fmt: skip
        self.calls.append(call)
        return rewards


class RecordedAsync(AsyncRMServeReward):
    """The async adapter, recording its calls and when each started and ended in `events`."""

    def __init__(self, model: str, url: str, events: list[str], **settings: Any) -> None:
        super().__init__(model, url, **settings)
        self.calls: list[Call] = []
        self.clients: list[object] = []
        self.events = events

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        self.events.append(f"start {self.model}")
        rewards = await super().__call__(prompts, completions, completion_ids, **kwargs)
        self.events.append(f"end {self.model}")
        self.clients.append(self.client())
        items = self._items(prompts, completions, kwargs)
        call = Call(list(prompts), list(completions), completion_ids, kwargs, items, rewards,
                    threading.current_thread())  # fmt: skip
        self.calls.append(call)
        return rewards


def train(
    policy: Path, funcs: list[Any], rows: dict[str, list[Any]], out: Path, **config: Any
) -> Any:
    """GRPOTrainer on CPU: 4 prompts x 2 generations per step, so each step is one call of 8
    completions per reward function (settings from a run of trl 1.16.0 on this machine)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    settings: dict[str, Any] = {"max_steps": 2, **config}
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, per_device_train_batch_size=8,
        num_generations=2, max_completion_length=8, **settings,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(policy),
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    trainer.train()
    return trainer


def counter(server: ServerProcess, name: str, **labels: str) -> float:
    """The server's counter `name` (`_total`), summed over the series matching `labels`."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total" and labels.items() <= sample.labels.items()
    )


def jobs_done(server: ServerProcess, model: str) -> float:
    """Items `model` scored (rmserve_jobs_total, every outcome)."""
    return counter(server, "rmserve_jobs", model=model)


def steps(trainer: Any) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def approx(values: Sequence[float | None]) -> Any:
    """TRL keeps rewards as float32 tensors; None is NaN there."""
    return pytest.approx([math.nan if v is None else v for v in values], abs=1e-6, nan_ok=True)


def nanmean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan


def text_of(completion: Any) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def test_grpo_trains_on_two_rmserve_models_with_weights(
    service: ServerProcess, policy: Path, tmp_path: Path
) -> None:
    rows = {"prompt": PROMPTS, "reference": ["on the mat", "world", "red", "blue"],
            "echo": PROMPTS, "level": [1, 2, 3, 4]}  # fmt: skip
    rouge = Recorded("rouge", service.base_url)
    fuzzy = Recorded("fuzzy", service.base_url, reference_column="echo")
    before = {"rouge": jobs_done(service, "rouge"), "fuzzy": jobs_done(service, "fuzzy")}
    trainer = train(policy, [rouge, fuzzy], rows, tmp_path, reward_weights=[1.0, 0.5])

    assert len(rouge.calls) == len(fuzzy.calls) == 2  # one call per step, 8 completions each
    for call in rouge.calls + fuzzy.calls:
        assert len(call.prompts) == len(call.completions) == len(call.rewards) == 8
        assert set(call.prompts) <= set(PROMPTS)
        assert all(isinstance(completion, str) for completion in call.completions)
        assert len(call.completion_ids) == 8
        # grpo_trainer.py:1584-1595 (trl 1.16.0): every other column, and the trainer's hooks.
        assert {"reference", "echo", "level", "trainer_state", "log_extra", "log_metric"} <= set(
            call.kwargs
        )
        assert call.thread is threading.main_thread()  # sync functions run in the training thread
    # Each reward is what the verifier gives TRL's completion against this function's column.
    for func, metric, column in ((rouge, "rougeL", "reference"), (fuzzy, "fuzzy", "echo")):
        for call in func.calls:
            for prompt, completion, reward, item in zip(
                call.prompts, call.completions, call.rewards, call.items, strict=True
            ):
                reference = rows[column][PROMPTS.index(prompt)]
                assert item == {"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": completion}],
                                "group": group_of(prompt),
                                "reference": reference}  # fmt: skip
                assert reward == pytest.approx(similarity(completion, reference, metric))
            # TRL's num_generations (2) completions of each prompt are one group of the request.
            groups = [item["group"] for item in call.items]
            assert sorted(Counter(groups).values()) == [2] * 4
    assert any(reward for call in rouge.calls for reward in call.rewards)  # not all zero
    assert jobs_done(service, "rouge") - before["rouge"] == 16
    assert jobs_done(service, "fuzzy") - before["fuzzy"] == 16

    # What TRL used: its completions table holds the last step's completions and rewards.
    assert list(trainer._logs["completion"]) == rouge.calls[-1].completions
    assert list(trainer._logs["prompt"]) == rouge.calls[-1].prompts
    assert list(trainer._logs["rewards"]["rmserve_rouge"]) == approx(rouge.calls[-1].rewards)
    assert list(trainer._logs["rewards"]["rmserve_fuzzy"]) == approx(fuzzy.calls[-1].rewards)
    assert list(trainer._logs["extra"]["rmserve_rouge/error"]) == [None] * 8
    for logged, r_call, f_call in zip(steps(trainer), rouge.calls, fuzzy.calls, strict=True):
        assert logged["rewards/rmserve_rouge/mean"] == pytest.approx(nanmean(r_call.rewards))
        assert logged["rewards/rmserve_fuzzy/mean"] == pytest.approx(nanmean(f_call.rewards))
        pairs = zip(r_call.rewards, f_call.rewards, strict=True)
        weighted = [1.0 * r + 0.5 * f for r, f in pairs if r is not None and f is not None]
        assert logged["reward"] == pytest.approx(nanmean(weighted), abs=1e-6)
        assert logged["rewards/rmserve_rouge/errors"] == logged["rewards/rmserve_fuzzy/errors"] == 0


# Per prompt: math's `answer` ("" and None: missing) and fuzzy's `reference`. "a mat is" has
# neither, so no function can score it.
FAILING_ROWS = {
    "prompt": PROMPTS,
    "answer": ["1", "", None, ""],
    "reference": ["on", "world", "red", ""],
}


def test_items_without_a_score_reach_trl_as_nan_not_zero(
    service: ServerProcess, policy: Path, tmp_path: Path
) -> None:
    maths = Recorded("math", service.base_url, reference_column="answer")
    fuzzy = Recorded("fuzzy", service.base_url)
    trainer = train(policy, [maths, fuzzy], FAILING_ROWS, tmp_path, max_steps=1)

    (math_call,), (fuzzy_call,) = maths.calls, fuzzy.calls
    for prompt, m, f in zip(math_call.prompts, math_call.rewards, fuzzy_call.rewards, strict=True):
        assert (m is None) == (prompt != "the cat sat") and (f is None) == (prompt == "a mat is")
    assert {r for r in math_call.rewards if r is not None} == {0.0}  # scored: no \boxed answer
    assert list(trainer._logs["rewards"]["rmserve_math"]) == approx(math_call.rewards)
    assert list(trainer._logs["rewards"]["rmserve_fuzzy"]) == approx(fuzzy_call.rewards)
    errors = list(trainer._logs["extra"]["rmserve_math/error"])
    assert errors == [None if m is not None else "missing_reference" for m in math_call.rewards]
    # The completions no function could score carry no learning signal.
    for prompt, advantage in zip(trainer._logs["prompt"], trainer._logs["advantages"], strict=True):
        if prompt == "a mat is":
            assert advantage == 0.0
    (logged,) = steps(trainer)
    assert logged["rewards/rmserve_math/mean"] == 0.0  # the mean of the scored ones, not of 8
    assert logged["rewards/rmserve_fuzzy/mean"] == pytest.approx(nanmean(fuzzy_call.rewards))
    assert logged["rewards/rmserve_math/errors"] == 6
    assert logged["rewards/rmserve_fuzzy/errors"] == 2


def test_on_error_raise_stops_training(
    service: ServerProcess, policy: Path, tmp_path: Path
) -> None:
    maths = RMServeReward("math", service.base_url, reference_column="answer", on_error="raise")
    with pytest.raises(UnscoredItemsError, match="6 of 8 items got no score") as raised:
        train(policy, [maths], FAILING_ROWS, tmp_path, max_steps=1)
    assert len(raised.value.failed) == 6
    failed = [raised.value.results[index] for index in raised.value.failed]
    assert {result.error.type for result in failed if result.error} == {"missing_reference"}
    assert all(result.score is None for result in failed)


def test_a_request_that_fails_stops_training(
    service: ServerProcess, policy: Path, tmp_path: Path
) -> None:
    unknown = RMServeReward("no-such-model", service.base_url)
    with pytest.raises(RewardServiceError) as raised:
        train(policy, [unknown], FAILING_ROWS, tmp_path, max_steps=1)
    assert raised.value.status == 404
    down = RMServeReward("fuzzy", f"http://127.0.0.1:{free_port()}", max_retries=0)
    with pytest.raises(RewardServiceError) as raised:
        down(prompts=["hi"], completions=["hello"], reference=["hello"])
    assert raised.value.status is None and raised.value.type == "connection_error"


def test_grpo_conversational_prompts(service: ServerProcess, policy: Path, tmp_path: Path) -> None:
    chats = [[{"role": "system", "content": "say yes"}, {"role": "user", "content": p}]
             for p in PROMPTS]  # fmt: skip
    rows = {"prompt": chats, "reference": ["on", "world", "red", "blue"]}
    fuzzy = Recorded("fuzzy", service.base_url)
    trainer = train(policy, [fuzzy], rows, tmp_path, max_steps=1)

    (call,) = fuzzy.calls
    for prompt, completion, item, reward in zip(
        call.prompts, call.completions, call.items, call.rewards, strict=True
    ):
        assert prompt in chats
        # grpo_trainer.py:2245 (trl 1.16.0): each completion is one assistant message.
        assert completion == [{"role": "assistant", "content": completion[0]["content"]}]
        assert item["messages"] == [*prompt, *completion]
        reference = rows["reference"][chats.index(prompt)]
        assert item["reference"] == reference
        assert reward == pytest.approx(similarity(text_of(completion), reference, "fuzzy"))
    assert list(trainer._logs["rewards"]["rmserve_fuzzy"]) == approx(call.rewards)


def test_grpo_awaits_async_rewards_concurrently(
    service: ServerProcess, policy: Path, tmp_path: Path
) -> None:
    rows = {"prompt": PROMPTS, "reference": ["on the mat", "world", "red", "blue"]}
    events: list[str] = []
    rouge = RecordedAsync("rouge", service.base_url, events)
    fuzzy = RecordedAsync("fuzzy", service.base_url, events, name="closeness")
    trainer = train(policy, [rouge, fuzzy], rows, tmp_path)

    # trl 1.16.0 grpo_trainer.py:1621 and 1639-1660: async callables are gathered on the
    # trainer's event-loop thread, so both requests are in flight at once.
    assert len(events) == 8
    for step in range(2):
        assert events[4 * step : 4 * step + 2] == ["start rouge", "start fuzzy"]
        assert set(events[4 * step + 2 : 4 * step + 4]) == {"end rouge", "end fuzzy"}
    for func, metric in ((rouge, "rougeL"), (fuzzy, "fuzzy")):
        assert len(func.calls) == 2
        assert func.clients[0] is func.clients[1]  # one client for the loop
        for call in func.calls:
            assert call.thread is not threading.main_thread()
            for prompt, completion, reward in zip(
                call.prompts, call.completions, call.rewards, strict=True
            ):
                reference = rows["reference"][PROMPTS.index(prompt)]
                assert reward == pytest.approx(similarity(completion, reference, metric))
    assert list(trainer._logs["rewards"]["rmserve_rouge"]) == approx(rouge.calls[-1].rewards)
    assert list(trainer._logs["rewards"]["closeness"]) == approx(fuzzy.calls[-1].rewards)
    assert [s["rewards/closeness/mean"] for s in steps(trainer)] == pytest.approx(
        [nanmean(call.rewards) for call in fuzzy.calls]
    )


def test_the_trainers_call_shape(service: ServerProcess) -> None:
    """The call of trl 1.16.0 grpo_trainer.py:1579-1637 (`_calculate_rewards`; rloo_trainer.py:1148
    is the same), made here with its keywords and hooks."""
    from transformers import TrainerState

    # The inputs of one generation batch: dataset rows, each repeated num_generations times.
    inputs = [
        {"prompt": "2+2?", "reference": 4, "tests": None, "difficulty": "easy"},
        {"prompt": "2+2?", "reference": 4, "tests": None, "difficulty": "easy"},
        {"prompt": "half of 1?", "reference": None, "tests": "[]", "difficulty": "hard"},
    ]
    prompts = [row["prompt"] for row in inputs]
    completions = ["so \\boxed{4}", "maybe \\boxed{5}", "\\boxed{0.5}"]
    completion_ids_list = [[5, 6], [5, 7], [8]]
    extra: list[tuple[str, list[Any]]] = []
    metrics: list[tuple[str, float]] = []
    # grpo_trainer.py:1584-1595
    keys = [key for key in inputs[0] if key not in ["prompt", "completion", "completion_ids"]]
    reward_kwargs: dict[str, Any] = {key: [example[key] for example in inputs] for key in keys}
    reward_kwargs["trainer_state"] = TrainerState()
    reward_kwargs["log_extra"] = lambda column, values: extra.append((column, values))
    reward_kwargs["log_metric"] = lambda name, value: metrics.append((name, value))
    reward_func = RMServeReward("math", service.base_url)
    # grpo_trainer.py:1627-1629
    output_reward_func = reward_func(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids_list,
        **reward_kwargs,
    )
    assert output_reward_func == [1.0, 0.0, None]  # the number 4 is sent as "4"
    assert metrics == [("rewards/rmserve_math/errors", 1.0)]
    assert extra == [("rmserve_math/error", [None, None, "missing_reference"])]

    code = "```python\ndef add(a, b):\n    return a + b\n```"
    arrow_test = {"name": None, "code": "assert add(2, 3) == 5", "stdin": None,
                  "expected_stdout": None}  # fmt: skip
    unit_tests = RMServeReward("unit-tests", service.base_url, tests_column="tests")
    rewards = unit_tests(
        prompts=["write add", "write add", "write add"],
        completions=[code, code.replace("+", "-"), code],
        completion_ids=completion_ids_list,
        # tests as Arrow gives a list of structs (missing fields None), as JSON text, or none.
        tests=[[arrow_test], '[{"code": "assert add(1, 1) == 2"}]', None],
        trainer_state=TrainerState(),
    )
    assert rewards == [1.0, 0.0, None]


def test_trl_shaped_tool_calls_are_linked() -> None:
    """trl 1.16.0 writes tool calls without `id` (chat_template_utils.py:1338, parse_response)
    and tool results as {"role": "tool", "name", "content"} (grpo_trainer.py:2019)."""
    completion = [
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}},
                        {"type": "function", "function": {"name": "mul", "arguments": {"a": 2}}}]},
        {"role": "tool", "name": "add", "content": "1"},
        {"role": "tool", "name": "mul", "content": "2"},
        {"role": "assistant", "content": "\\boxed{3}"},
    ]  # fmt: skip
    item = build_item([{"role": "user", "content": "go"}], completion, reference=3.5)
    calls = item["messages"][1]["tool_calls"]
    assert [call["id"] for call in calls] == ["call_1", "call_2"]
    assert [m.get("tool_call_id") for m in item["messages"][2:4]] == ["call_1", "call_2"]
    assert item["reference"] == "3.5" and "id" not in completion[0]["tool_calls"][0]  # copied
    assert build_item("q", "a", reference=math.nan) == build_item("q", "a", reference="")
    assert "reference" not in build_item("q", "a", reference=None)
    with pytest.raises(TypeError, match="completion must be a string or a list"):
        build_item("q", 3)


def test_tool_call_trajectories_score_and_the_reward_pickles(service: ServerProcess) -> None:
    completion = [
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "name": "add", "content": "4"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]  # fmt: skip
    reward = RMServeReward("math", service.base_url)
    assert reward(prompts=[[{"role": "user", "content": "2+2?"}]], completions=[completion],
                  reference=["4"]) == [1.0]  # fmt: skip
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.__name__ == "rmserve_math" and copy.client() is not reward.client()
    assert copy(prompts=["2+2?"], completions=["\\boxed{4}"], reference=["4"]) == [1.0]
    reward.close()
    copy.close()
    with pytest.raises(ValueError, match="on_error"):
        RMServeReward("math", on_error="zero")  # type: ignore[arg-type]


def test_a_rate_limited_call_waits_for_retry_after(tmp_path: Path) -> None:
    """A real 429 of a key's rate quota (1 request/s, Retry-After: 1): one retry, after the
    wait the server asked for, scores the call; a retry on the backoff alone (at most 0.5 s)
    would be refused again."""
    key = "rms_" + secrets.token_urlsafe(32)
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(key.encode()).hexdigest()
    keys.write_text(
        f"keys:\n  - {{name: trainer, sha256: {digest}, requests_per_s: 1, burst: 1}}\n"
    )
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY)
    env = {"RMSERVE_API_KEYS_FILE": str(keys)}
    server = ServerProcess(registry, tmp_path / "server.log", env=env)
    try:
        server.wait_ready(120)  # /v1/models needs the key: wait for /readyz
        reward = RMServeReward("fuzzy", server.base_url, api_key=key, max_retries=1)
        call = {"prompts": ["hi"], "completions": ["hello"], "reference": ["hello"]}
        assert reward(**call) == [1.0]
        started = time.monotonic()
        assert reward(**call) == [1.0]
        assert time.monotonic() - started >= 0.9
        assert counter(server, "rmserve_quota_rejections", limit="rate") == 1
        with pytest.raises(RewardServiceError) as raised:
            RMServeReward("fuzzy", server.base_url, api_key="rms_wrong")(**call)
        assert raised.value.status == 401
        reward.close()
    finally:
        server.stop()


def test_a_server_killed_mid_training_stops_training_loudly(policy: Path, tmp_path: Path) -> None:
    """trl 1.16.0: the service is killed (SIGKILL) after the first step's rewards; the second
    step's call fails after the client's retries and GRPOTrainer.train raises, instead of
    training on rewards nobody computed."""
    import trl

    assert trl.__version__ == "1.16.0"
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY)
    server = start_server(registry, tmp_path, {})

    class KilledAfterFirstCall(Recorded):
        def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
            rewards = super().__call__(*args, **kwargs)
            if len(self.calls) == 1:
                server.process.kill()
                server.process.wait(timeout=30)
            return rewards

    fuzzy = KilledAfterFirstCall("fuzzy", server.base_url, max_retries=1)
    try:
        with pytest.raises(RewardServiceError) as raised:
            train(policy, [fuzzy], FAILING_ROWS, tmp_path / "out", max_steps=3)
    finally:
        server.stop()
    assert raised.value.status is None and raised.value.type == "connection_error"
    (first,) = fuzzy.calls
    assert len(first.rewards) == 8 and sum(r is not None for r in first.rewards) == 6
