"""rmserve.client.openrlhf, OpenRLHF's custom reward function, against a real `rmserve serve` with
the math verifier, loaded and called exactly as OpenRLHF v0.11.0 (3c3be62) does."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
from collections.abc import Iterator
from typing import Any

import pytest

from rmserve.client import RewardServiceError
from rmserve.client import openrlhf as openrlhf_module
from rmserve.client.policy import ItemFailed
from rmserve.service.launcher import ServerProcess
from tests.client.conftest import RecordingProxy, requests_served

# The actor's chat template (Qwen2.5's ChatML); OpenRLHF decodes prompt + action tokens with
# skip_special_tokens=False (openrlhf/utils/agent.py:283), so the query ends with <|im_end|>.
PROMPT = "<|im_start|>user\nWhat is {n} + 1?<|im_end|>\n<|im_start|>assistant\n"


def load_reward_func() -> Any:
    # openrlhf/utils/agent.py:193-200 (v0.11.0): the file named by --reward.remote_url.
    spec = importlib.util.spec_from_file_location("reward_func", openrlhf_module.__file__)
    assert spec is not None and spec.loader is not None
    reward_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_module)
    return reward_module


async def fetch_rewards_via_func(
    reward_func: Any, queries_list: list[str], prompts_list: list[str], labels_list: list[Any]
) -> list[Any]:
    # openrlhf/utils/agent.py:303-320 (v0.11.0), verbatim but for the names.
    batch_size = 1
    num_chunks = (len(queries_list) + batch_size - 1) // batch_size
    tasks = []
    for i in range(num_chunks):
        start_idx = i * batch_size
        end_idx = min((i + 1) * batch_size, len(queries_list))
        tasks.append(
            asyncio.to_thread(
                reward_func,
                queries_list[start_idx:end_idx],
                prompts_list[start_idx:end_idx],
                labels_list[start_idx:end_idx],
            )
        )
    return await asyncio.gather(*tasks)


async def execute(reward_func: Any, n: int, answer: str, label: Any) -> Any:
    """One SingleTurnAgentExecutor.execute's reward step (agent.py:283-288, v0.11.0): one sample
    per call, `[query], [prompt], [label]`; its first answer."""
    prompt = PROMPT.format(n=n)
    query = f"{prompt}The answer is \\boxed{{{answer}}}.<|im_end|>"
    (info,) = await fetch_rewards_via_func(reward_func, [query], [prompt], [label])
    return info


async def many(reward_func: Any, calls: list[tuple[int, str, Any]]) -> list[Any]:
    """Samples of one engine at once (each execute is its own task in OpenRLHF)."""
    tasks = [execute(reward_func, n, answer, label) for n, answer, label in calls]
    return list(await asyncio.gather(*tasks, return_exceptions=True))


@pytest.fixture
def module(
    verifiers: ServerProcess, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    monkeypatch.setenv("RMSERVE_URL", proxy.url)
    monkeypatch.setenv("RMSERVE_API_KEY", "secret")
    monkeypatch.delenv("RMSERVE_MODEL", raising=False)  # the service's RMSERVE_OPENRLHF_MODEL
    monkeypatch.delenv("RMSERVE_ON_ERROR", raising=False)
    loaded = load_reward_func()
    yield loaded
    loaded.reset()


async def test_64_threads_get_their_rewards_in_few_requests(
    module: Any, verifiers: ServerProcess, proxy: RecordingProxy
) -> None:
    before = requests_served(verifiers, "/get_reward")
    calls = [(n, str(n + 1 if n % 2 else n), str(n + 1)) for n in range(64)]
    infos = await many(module.reward_func, calls)
    assert [info["rewards"] for info in infos] == [[float(n % 2)] for n in range(64)]
    assert all(info["scores"] == info["rewards"] for info in infos)
    assert all(info["extra_logs"]["rmserve_error"] == [0.0] for info in infos)
    assert all(isinstance(info["rewards"][0], float) for info in infos)
    # asyncio.to_thread runs on the loop's default pool: at most this many calls at once.
    workers = min(32, (os.cpu_count() or 1) + 4)
    served = requests_served(verifiers, "/get_reward") - before
    assert served <= 2 * math.ceil(64 / workers) and served < 64
    recorded = [r for r in proxy.recorded if r.path.startswith("/get_reward")]
    assert {r.path for r in recorded} == {"/get_reward"}
    assert {r.body["on_error"] for r in recorded} == {"report"}  # in the body, never the URL
    assert {r.authorization for r in recorded} == {"Bearer secret"}
    assert sum(len(r.body["query"]) for r in recorded) == 64


async def test_an_item_error_raises_in_that_caller_only(module: Any) -> None:
    calls = [(n, str(n + 1), "" if n == 3 else str(n + 1)) for n in range(8)]  # "": no label
    infos = await many(module.reward_func, calls)
    failed = infos.pop(3)
    assert isinstance(failed, ItemFailed) and failed.type == "missing_reference"
    assert [info["rewards"] for info in infos] == [[1.0]] * 7


async def test_a_number_is_the_reward_of_a_failed_item_flagged(
    module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_ON_ERROR", "-0.5")
    infos = await many(module.reward_func, [(1, "2", ""), (2, "3", "3")])
    assert [info["rewards"] for info in infos] == [[-0.5], [1.0]]
    assert [info["scores"] for info in infos] == [[-0.5], [1.0]]
    assert [info["extra_logs"]["rmserve_error"] for info in infos] == [[1.0], [0.0]]


async def test_a_refused_label_fails_its_caller_and_the_others_are_sent_again(
    module: Any, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_ON_ERROR", "0")  # a refused label raises whatever the policy
    labels = ["2", {"bogus": 1}, "4"]
    infos = await many(module.reward_func, [(n, str(n + 1), labels[n - 1]) for n in (1, 2, 3)])
    assert isinstance(infos[1], RewardServiceError) and infos[1].status == 422
    assert "labels[" in str(infos[1])
    assert [infos[0]["rewards"], infos[2]["rewards"]] == [[1.0], [1.0]]


async def test_the_model_from_the_environment(
    module: Any, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_MODEL", "exact")
    prompt = PROMPT.format(n=1)
    info = module.reward_func([f"{prompt}Paris<|im_end|>"], [prompt], ["Paris"])
    assert info["rewards"] == [1.0]
    assert proxy.recorded[-1].path == "/get_reward?model=exact"
    monkeypatch.setenv("RMSERVE_MODEL", "no-such-model")
    with pytest.raises(RewardServiceError, match="404"):
        module.reward_func([f"{prompt}Paris<|im_end|>"], [prompt], ["Paris"])


def test_a_bad_on_error_is_refused(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSERVE_ON_ERROR", "flag")
    with pytest.raises(ValueError, match="RMSERVE_ON_ERROR must be 'raise' or a number"):
        module.reward_func(["q"], ["p"], ["l"])
