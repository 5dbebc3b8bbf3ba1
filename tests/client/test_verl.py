"""The verl reward functions against a real `rmserve serve` (weight-free verifiers), called the way
verl calls them. verl itself cannot be installed here (it pins transformers<5.11), so its call
shapes are copied into the tests, each with the verl file, line and version it comes from."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import os
import pprint
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from rmserve.client import RewardServiceError, verl, verl_scoring
from rmserve.client.client import group_of
from rmserve.client.policy import ItemFailed
from rmserve.service.launcher import ServerProcess, free_port
from tests.client.conftest import RecordingProxy, requests_served


@pytest.fixture
def service(verifiers: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("RMSERVE_URL", verifiers.base_url)
    monkeypatch.setenv("RMSERVE_MODEL", "math")
    monkeypatch.delenv("RMSERVE_API_KEY", raising=False)
    monkeypatch.delenv("RMSERVE_ON_ERROR", raising=False)
    yield verifiers.base_url
    verl.reset()


@pytest.fixture
async def loop_client() -> AsyncIterator[None]:
    """Close the test loop's shared client at the end (the next test has another loop)."""
    yield
    await verl.aclose()


@pytest.fixture
def via_proxy(
    service: str, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> RecordingProxy:
    monkeypatch.setenv("RMSERVE_URL", proxy.url)
    return proxy


async def _call_with_kwargs_async(raw_fn: Any, extra_kwargs: Any, *args: Any, **kwargs: Any) -> Any:
    # verl/trainer/ppo/reward.py:41-47 (verl 0.9.1): reward_kwargs win over the call's keywords.
    merged_kwargs = {**kwargs, **extra_kwargs}
    return await raw_fn(*args, **merged_kwargs)


def custom_reward_fn(**reward_kwargs: Any) -> Any:
    # verl/trainer/ppo/reward.py:82-86 (verl 0.9.1): how the reward loop binds reward_kwargs.
    return partial(_call_with_kwargs_async, verl.compute_score_async, reward_kwargs)


async def naive_call(
    compute_score: Any, data_source: str, response_str: str, ground_truth: Any, extra_info: Any
) -> Any:
    # verl/experimental/reward_loop/reward_manager/naive.py:30 and 66-73 (verl 0.9.1, the same
    # in 0.8.0): the coroutine check, then keywords only; extra_reward_kwargs is {} unless verl
    # runs its own reward model (naive.py:58-65).
    assert inspect.iscoroutinefunction(compute_score)
    return await compute_score(
        data_source=data_source,
        solution_str=response_str,
        ground_truth=ground_truth,
        extra_info=extra_info,
    )


def gsm8k_extra_info(index: int, question: str) -> dict[str, Any]:
    # examples/data_preprocess/gsm8k.py:78-83 (verl 0.9.1): no `prompt` key.
    return {"split": "train", "index": index, "answer": "#### 4", "question": question}


def agent_loop_extra_info(index: int, raw_prompt: list[dict[str, str]]) -> dict[str, Any]:
    """extra_info as the naive manager hands it over after an agent loop: the dataset's fields,
    `tool_extra_fields` merged in (raw_prompt: agent_loop.py:730), num_turns and
    rollout_reward_scores (naive.py:44-52, verl 0.9.1)."""
    info: dict[str, Any] = gsm8k_extra_info(index, raw_prompt[-1]["content"])
    info.update({"raw_prompt": raw_prompt})
    info["num_turns"] = 2
    info["rollout_reward_scores"] = {}
    return info


def items_sent(proxy: RecordingProxy) -> list[dict[str, Any]]:
    return [item for body in proxy.bodies("/v1/score") for item in body["items"]]


def load_like_verl(module_path: str, object_name: str) -> Any:
    # verl/utils/import_utils.py:175-191 and 256-261 (verl 0.9.1, load_extern_object for
    # custom_reward_function.path): a fresh module under a hashed name, outside sys.modules.
    spec_name = f"custom_module_{hash(os.path.abspath(module_path))}"
    spec = importlib.util.spec_from_file_location(spec_name, module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, object_name)


async def test_loaded_by_path_like_verl_it_is_the_same_coroutine_function(
    service: str, loop_client: None
) -> None:
    loaded = load_like_verl(verl.__file__, "compute_score_async")
    assert loaded is verl.compute_score_async and inspect.iscoroutinefunction(loaded)
    bound = partial(_call_with_kwargs_async, loaded, {})
    assert (await naive_call(bound, "d", "\\boxed{1}", "1", None))["score"] == 1.0


async def test_the_reward_loop_call_scores_the_chat_and_returns_the_fixed_keys(
    via_proxy: RecordingProxy, loop_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = [
        {"role": "system", "content": "Answer in a box."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    monkeypatch.setenv("TRAINING_RMSERVE_KEY", "secret")
    fn = custom_reward_fn(api_key_env="TRAINING_RMSERVE_KEY")
    good = await naive_call(fn, "gsm8k", "So \\boxed{4}.", "4", agent_loop_extra_info(0, chat))
    wrong = await naive_call(fn, "gsm8k", "So \\boxed{5}.", "4", agent_loop_extra_info(1, chat))
    assert list(good) == list(verl.EXTRA_INFO_KEYS) == list(wrong)
    assert good["score"] == 1.0 and wrong["score"] == 0.0
    assert good["rmserve_ok"] is True and good["rmserve_error"] == ""
    assert "equivalent" in good["critique"] and good["verdict"] == good["step_scores"] == ""
    assert items_sent(via_proxy)[0] == {
        "messages": [*chat, {"role": "assistant", "content": "So \\boxed{4}."}],
        "group": group_of(chat),  # the rollouts of one prompt form a group
        "reference": "4",
        "metadata": {"data_source": "gsm8k"},
    }
    assert items_sent(via_proxy)[1]["group"] == group_of(chat)
    assert {r.authorization for r in via_proxy.recorded} == {"Bearer secret"}


async def test_the_prompt_comes_from_raw_prompt_then_prompt_then_question(
    via_proxy: RecordingProxy, loop_client: None
) -> None:
    fn = custom_reward_fn()
    await naive_call(fn, "gsm8k", "\\boxed{4}", "4", gsm8k_extra_info(0, "2+2?"))
    await naive_call(fn, "d", "\\boxed{4}", "4", {"prompt": "two plus two?", "question": "x"})
    await naive_call(fn, "d", "\\boxed{4}", 4, {"prompt": [{"role": "user", "content": "hi"}]})
    first, second, third = (item["messages"][0] for item in items_sent(via_proxy))
    assert first == {"role": "user", "content": "2+2?"}
    assert second == {"role": "user", "content": "two plus two?"}
    assert third == {"role": "user", "content": "hi"}
    assert items_sent(via_proxy)[2]["reference"] == "4"  # a number becomes text


async def test_no_prompt_warns_once_and_scores_the_answer_alone(
    via_proxy: RecordingProxy, loop_client: None, caplog: pytest.LogCaptureFixture
) -> None:
    fn = custom_reward_fn()
    with caplog.at_level(logging.WARNING, logger="rmserve.client.verl"):
        for index in range(3):
            info = {"split": "train", "index": index}
            assert (await naive_call(fn, "d", "\\boxed{1}", "1", info))["score"] == 1.0
    warnings = [r for r in caplog.records if "without the question" in r.getMessage()]
    assert len(warnings) == 1
    assert "raw_prompt, prompt, question" in warnings[0].getMessage()
    assert [len(item["messages"]) for item in items_sent(via_proxy)] == [1, 1, 1]


async def test_items_without_a_prompt_are_in_no_group(
    via_proxy: RecordingProxy, loop_client: None
) -> None:
    # examples/data_preprocess/math_dataset.py (verl 0.9.1): extra_info has no question; verl
    # gives a reward function no uid either (naive.py:66-73), so nothing says which items
    # answer one problem: none may share a group (it was one group for all).
    fn = custom_reward_fn()
    infos = [{"split": "train", "index": index // 2} for index in range(8)]  # 4 problems, n=2
    await asyncio.gather(*(naive_call(fn, "math", "\\boxed{1}", "1", i) for i in infos))
    assert [item.get("group") for item in items_sent(via_proxy)] == [None] * 8
    verl.compute_score_batch(["math"] * 8, ["\\boxed{1}"] * 8, ["1"] * 8, infos)
    assert all("group" not in item for item in items_sent(via_proxy)[8:])


async def test_the_api_key_comes_from_a_named_variable_or_a_file_and_is_never_shown(
    via_proxy: RecordingProxy,
    loop_client: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("TRAINING_RMSERVE_KEY", "key-from-env")
    key_file = tmp_path / "rmserve-key"
    key_file.write_text("key-from-file\n")
    by_env = {"api_key_env": "TRAINING_RMSERVE_KEY"}
    by_file = {"api_key_file": str(key_file)}
    for kwargs in (by_env, by_file):
        assert (await naive_call(custom_reward_fn(**kwargs), "d", "\\boxed{1}", "1", None))[
            "score"
        ] == 1.0
    authorizations = [r.authorization for r in via_proxy.recorded]
    assert authorizations == ["Bearer key-from-env", "Bearer key-from-file"]
    # What verl prints (main_ppo.py:144, verl 0.9.1) and every repr on the way to the request.
    config = {"reward": {"custom_reward_function": {"reward_kwargs": by_env}}}
    for kwargs in (by_env, by_file):
        settings = verl_scoring.Settings.from_kwargs(kwargs)
        shown = [pprint.pformat(config), repr(settings), repr(verl_scoring.loop_scorer(settings))]
        shown.append(repr(verl_scoring.loop_scorer(settings).client.settings))
        assert settings.api_key is not None
        assert not any(settings.api_key in text for text in shown)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"api_key": "sk-literal"}, TypeError, "verl prints its config"),
        ({"api_key_env": "NO_SUCH_RMSERVE_KEY"}, RuntimeError, "NO_SUCH_RMSERVE_KEY.*not set"),
        ({"api_key_file": "/nonexistent/rmserve-key"}, FileNotFoundError, "rmserve-key"),
        ({"api_key_env": "A", "api_key_file": "/b"}, TypeError, "not both"),
    ],
)
async def test_a_literal_key_or_a_key_source_without_a_key_is_refused(
    via_proxy: RecordingProxy,
    loop_client: None,
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await naive_call(custom_reward_fn(**kwargs), "d", "\\boxed{1}", "1", None)
    assert via_proxy.recorded == []


async def test_an_empty_key_file_is_refused(service: str, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("\n")
    with pytest.raises(RuntimeError, match="is empty"):
        verl_scoring.Settings.from_kwargs({"api_key_file": str(tmp_path / "key")})


async def test_64_concurrent_calls_are_one_request_and_each_caller_gets_its_result(
    service: str, verifiers: ServerProcess, loop_client: None
) -> None:
    fn = custom_reward_fn()
    before = requests_served(verifiers, "/v1/score")
    # The reward loop gathers one task per sample (reward_loop.py:138-143, verl 0.9.1).
    answers = [f"\\boxed{{{n if n % 3 else n + 1}}}" for n in range(64)]
    tasks = [
        asyncio.create_task(naive_call(fn, "d", answers[n], str(n), gsm8k_extra_info(n, "?")))
        for n in range(64)
    ]
    results = await asyncio.gather(*tasks)
    assert [r["score"] for r in results] == [0.0 if n % 3 == 0 else 1.0 for n in range(64)]
    assert requests_served(verifiers, "/v1/score") - before == 1


async def test_an_item_error_raises_in_its_caller_only(service: str, loop_client: None) -> None:
    fn = custom_reward_fn()
    calls = [
        naive_call(fn, "d", "\\boxed{1}", "1", None),
        naive_call(fn, "d", "\\boxed{2}", None, None),  # math without reference
        naive_call(fn, "d", "\\boxed{3}", "3", None),
    ]
    first, failed, third = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(failed, ItemFailed) and failed.type == "missing_reference"
    assert isinstance(first, dict) and isinstance(third, dict)
    assert first["score"] == third["score"] == 1.0


async def test_flag_gives_the_explicit_error_score_and_says_why(
    service: str, loop_client: None
) -> None:
    fn = custom_reward_fn(on_error="flag", error_score=-1.0)
    flagged = await naive_call(fn, "d", "\\boxed{2}", None, None)
    scored = await naive_call(fn, "d", "\\boxed{2}", "2", None)
    assert list(flagged) == list(verl.EXTRA_INFO_KEYS)
    assert flagged["score"] == -1.0 and flagged["rmserve_ok"] is False
    assert flagged["rmserve_error"].startswith("missing_reference: ")
    assert scored["score"] == 1.0 and scored["rmserve_ok"] is True


async def test_the_error_policy_from_the_environment(
    service: str, loop_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_ON_ERROR", "0.25")
    flagged = await naive_call(custom_reward_fn(), "d", "\\boxed{2}", None, None)
    assert (flagged["score"], flagged["rmserve_ok"]) == (0.25, False)
    monkeypatch.setenv("RMSERVE_ON_ERROR", "zero")
    with pytest.raises(ValueError, match="RMSERVE_ON_ERROR must be 'raise' or a number"):
        await naive_call(custom_reward_fn(), "d", "\\boxed{2}", None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_error": "flag"}, "needs an explicit error_score"),
        ({"on_error": "flag", "error_score": float("nan")}, "finite"),
        ({"error_score": 0.0}, "only with on_error='flag'"),
        ({"on_error": "zero"}, "must be 'raise' or 'flag'"),
    ],
)
async def test_flag_without_an_explicit_number_is_refused_before_any_request(
    via_proxy: RecordingProxy, loop_client: None, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await naive_call(custom_reward_fn(**kwargs), "d", "x", "1", None)
    assert via_proxy.recorded == []


async def test_a_service_that_is_down_raises_even_with_flag(
    service: str, loop_client: None
) -> None:
    fn = custom_reward_fn(url=f"http://127.0.0.1:{free_port()}", on_error="flag", error_score=0)
    with pytest.raises(RewardServiceError) as failure:
        await naive_call(fn, "d", "\\boxed{1}", "1", None)
    assert failure.value.type == "connection_error"


async def test_an_invalid_item_fails_its_caller_not_its_batch(
    via_proxy: RecordingProxy, loop_client: None
) -> None:
    fn = custom_reward_fn(on_error="flag", error_score=-2.0)
    bad_chat = [{"role": "narrator", "content": "once upon a time"}]
    results = await asyncio.gather(
        naive_call(fn, "d", "\\boxed{1}", "1", None),
        naive_call(fn, "d", "\\boxed{1}", "1", {"raw_prompt": bad_chat}),
        naive_call(fn, "d", "\\boxed{2}", "2", None),
    )
    assert [r["score"] for r in results] == [1.0, -2.0, 1.0]
    assert results[1]["rmserve_error"].startswith("invalid_request: items.1.messages.0")
    sizes = [len(body["items"]) for body in via_proxy.bodies("/v1/score")]
    assert sizes == [3, 2]  # the batch, then the valid items again


async def test_unknown_settings_and_no_model_are_clear_errors(
    service: str, loop_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TypeError, match=r"unknown reward_kwargs \['on_eror'\]"):
        await naive_call(custom_reward_fn(on_eror="flag"), "d", "x", "1", None)
    monkeypatch.delenv("RMSERVE_MODEL")
    with pytest.raises(RuntimeError, match="set RMSERVE_MODEL"):
        await naive_call(custom_reward_fn(), "d", "x", "1", None)
    scored = await naive_call(custom_reward_fn(model="exact"), "d", "Paris", "Paris", None)
    assert scored["score"] == 1.0


async def test_verls_own_reward_model_arguments_are_accepted(
    service: str, loop_client: None
) -> None:
    # naive.py:58-65 (verl 0.9.1): with verl's reward model on, these two keywords are added.
    result = await verl.compute_score_async(
        data_source="d",
        solution_str="\\boxed{1}",
        ground_truth="1",
        extra_info={},
        reward_router_address="127.0.0.1:1",
        reward_model_tokenizer=object(),
    )
    assert result["score"] == 1.0


async def test_one_client_per_event_loop_replaced_when_the_service_changes(
    service: str, loop_client: None
) -> None:
    settings = verl_scoring.Settings.from_kwargs({})
    scorer = verl_scoring.loop_scorer(settings)
    assert verl_scoring.loop_scorer(settings) is scorer
    other_service = verl_scoring.Settings.from_kwargs({"url": "http://127.0.0.1:9"})
    other = verl_scoring.loop_scorer(other_service)
    assert other is not scorer and verl_scoring.loop_scorer(settings) is not other
    await asyncio.sleep(0.05)  # the replaced one closes once it has answered
    assert scorer.client._http.is_closed and other.client._http.is_closed


def test_sync_calls_from_threads_share_batches(service: str, verifiers: ServerProcess) -> None:
    before = requests_served(verifiers, "/v1/score")

    def legacy_naive(n: int) -> Any:
        # verl/workers/reward_manager/naive.py:131-136 (verl 0.9.1, the legacy manager); the
        # reward loop's sync path makes the same call from its default thread pool
        # (experimental/reward_loop/reward_manager/naive.py:75-84).
        return verl.compute_score(
            data_source="d",
            solution_str=f"\\boxed{{{n}}}",
            ground_truth=str(n if n % 2 else n + 1),
            extra_info=gsm8k_extra_info(n, "?"),
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(legacy_naive, range(32)))
    assert [r["score"] for r in results] == [float(n % 2) for n in range(32)]
    assert requests_served(verifiers, "/v1/score") - before < 32


def test_batch_manager_call_keeps_order_and_the_policy(
    service: str, verifiers: ServerProcess
) -> None:
    before = requests_served(verifiers, "/v1/score")
    # verl/workers/reward_manager/batch.py:70-76 (verl 0.9.1): keywords, lists, reward_kwargs.
    scores = verl.compute_score_batch(
        data_sources=["d"] * 100,
        solution_strs=[f"\\boxed{{{n}}}" for n in range(100)],
        ground_truths=[str(n) if n % 10 else "-1" for n in range(100)],
        extra_infos=[gsm8k_extra_info(n, f"q{n}") for n in range(100)],
    )
    assert [s["score"] for s in scores] == [1.0 if n % 10 else 0.0 for n in range(100)]
    assert all(list(s) == list(verl.EXTRA_INFO_KEYS) for s in scores)
    assert requests_served(verifiers, "/v1/score") - before == 2  # 64 + 36
    truths: list[str | None] = ["1", None, "3"]
    with pytest.raises(ItemFailed, match=r"missing_reference.*item 1; 1 of 3 items failed"):
        verl.compute_score_batch(["d"] * 3, ["\\boxed{1}"] * 3, truths, [None] * 3)
    flagged = verl.compute_score_batch(
        ["d"] * 3, ["\\boxed{1}"] * 3, truths, None, on_error="flag", error_score=0.5
    )
    assert [(s["score"], s["rmserve_ok"]) for s in flagged] == [
        (1.0, True),
        (0.5, False),
        (0.0, True),
    ]


def test_bad_prompt_and_lengths() -> None:
    with pytest.raises(TypeError, match="prompt"):
        verl.build_item("d", "x", "y", {"prompt": 3})
    with pytest.raises(ValueError, match="length"):
        verl.compute_score_batch(["d"], ["x", "y"], ["z"], model="math")


def test_numpy_fields_become_json() -> None:
    numpy = pytest.importorskip("numpy")
    chat = numpy.array([{"role": "user", "content": "hi"}], dtype=object)
    item = verl.build_item("d", "x", numpy.array([1, 2]), {"raw_prompt": chat})
    assert item["messages"][0] == {"role": "user", "content": "hi"}
    assert json.loads(item["reference"]) == [1, 2]
