"""RMServeRewardManager, verl's reward-loop manager for rmserve, against a real `rmserve serve`.

verl cannot be installed into rmserve's own environment (it pins other versions), so here the two
verl modules the manager imports are stood in for by files with the same interface (base.py and
registry.py of verl 0.9.1, and base.py of 0.7.0), which also covers verl 0.7's constructor; the
manager is loaded the way verl loads an importlib manager, built the way verl builds it, and its
`run_single` gets a DataProto-like object with exactly what verl's naive manager reads. verl
0.9.1 itself, in a virtualenv of its own, drives the manager in tests/trainers/test_verl_real.py."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rmserve.client import verl, verl_manager
from rmserve.client.client import group_of
from rmserve.client.policy import ItemFailed
from rmserve.service.launcher import ServerProcess
from tests.client.conftest import RecordingProxy, requests_served

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

# verl/experimental/reward_loop/reward_manager/base.py:34-59 (verl 0.9.1; 0.8.0 the same),
# with get_event_loop of verl/utils/ray_utils.py:87-94.
BASE_09 = """
    import asyncio
    from abc import ABC, abstractmethod

    def get_event_loop():
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        return loop

    class RewardManagerBase(ABC):
        _class_initialized = False

        def __init__(self, config, tokenizer, compute_score):
            self.config = config
            self.tokenizer = tokenizer
            self.compute_score = compute_score
            self.loop = get_event_loop()
            self.init_class(config, tokenizer)

        @classmethod
        def init_class(cls, config, tokenizer):
            if cls._class_initialized:
                return
            cls._class_initialized = True

        @abstractmethod
        async def run_single(self, data):
            raise NotImplementedError
"""
# verl/experimental/reward_loop/reward_manager/base.py:29-61 (verl 0.7.0): no compute_score.
BASE_07 = """
    import asyncio
    from abc import ABC, abstractmethod

    class RewardManagerBase(ABC):
        _class_initialized = False

        def __init__(self, config, tokenizer):
            self.config = config
            self.tokenizer = tokenizer
            self._loop = None

        @property
        def loop(self):
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            return self._loop

        @abstractmethod
        async def run_single(self, data):
            raise NotImplementedError
"""
# verl/experimental/reward_loop/reward_manager/registry.py:21-51 (verl 0.9.1).
REGISTRY = """
    REWARD_MANAGER = {}

    def register(name):
        def decorator(cls):
            if name in REWARD_MANAGER and REWARD_MANAGER[name] != cls:
                raise ValueError(f"reward manager {name} has already been registered")
            REWARD_MANAGER[name] = cls
            return cls
        return decorator

    def get_reward_manager_cls(name):
        if name not in REWARD_MANAGER:
            raise ValueError(f"Unknown reward manager: {name}")
        return REWARD_MANAGER[name]
"""


def stand_in_verl(root: Path, base: str) -> None:
    package = root / "verl" / "experimental" / "reward_loop" / "reward_manager"
    package.mkdir(parents=True)
    for folder in (root / "verl", *(package.parents[i] for i in range(2)), package):
        (folder / "__init__.py").touch()
    (package / "base.py").write_text(textwrap.dedent(base))
    (package / "registry.py").write_text(textwrap.dedent(REGISTRY))


@pytest.fixture
def verl_09(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from _with_verl(tmp_path, monkeypatch, BASE_09)


@pytest.fixture
def verl_07(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from _with_verl(tmp_path, monkeypatch, BASE_07)


def _with_verl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str) -> Iterator[ModuleType]:
    """The stand-in verl on sys.path; yields its registry module."""
    stand_in_verl(tmp_path, base)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("verl.experimental.reward_loop.reward_manager.registry")
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "verl"]:
            del sys.modules[name]


def load_like_verl(module_path: str) -> Any:
    # verl/utils/import_utils.py:175-191 (verl 0.9.1, load_module for a file path): a fresh
    # module under a hashed name, not added to sys.modules.
    spec_name = f"custom_module_{hash(os.path.abspath(module_path))}"
    spec = importlib.util.spec_from_file_location(spec_name, module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class DataProtoItem:
    batch: dict[str, Any]
    non_tensor_batch: dict[str, Any]


@dataclass
class DataProto:
    """What verl's DataProto offers the naive manager: `data[-1:]` a DataProto, `data[0]` a
    DataProtoItem (verl/protocol.py:359-371, verl 0.9.1); tensors in `batch`, numpy object
    arrays in `non_tensor_batch`."""

    batch: dict[str, Any]
    non_tensor_batch: dict[str, Any]

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, item: int | slice) -> Any:
        batch = {key: value[item] for key, value in self.batch.items()}
        non_tensor = {key: value[item] for key, value in self.non_tensor_batch.items()}
        if isinstance(item, slice):
            return DataProto(batch, non_tensor)
        return DataProtoItem(batch, non_tensor)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from rmserve.models.tiny.llama import build_tokenizer

    return build_tokenizer()


def objects(*values: Any) -> Any:
    array = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        array[index] = value
    return array


def sample(
    tokenizer: Any,
    chat: list[dict[str, str]],
    response: str,
    ground_truth: Any,
    index: int = 0,
    uid: str | None = None,
) -> DataProto:
    """One sample as the agent loop hands it to the reward loop (agent_loop.py:1000-1019 and
    730, verl 0.9.1): prompts left-padded, responses right-padded, the attention mask over
    both; past the response's mask the tokens are text that must not be scored. `uid`: the
    trainer's id of the prompt (ray_trainer.py:1481-1484), among the fields the agent loop
    passes on (agent_loop.py:645 and 1013-1014)."""
    prompt_ids = tokenizer.encode("<|user|>" + chat[-1]["content"], add_special_tokens=False)
    response_ids = [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]
    beyond = tokenizer.encode(" \\boxed{999}", add_special_tokens=False)
    prompts = [tokenizer.pad_token_id] * 3 + prompt_ids
    responses = response_ids + beyond
    mask = [0] * 3 + [1] * len(prompt_ids) + [1] * len(response_ids) + [0] * len(beyond)
    reward_model = {"ground_truth": ground_truth, "style": "rule"}
    extra_info = {"split": "train", "index": index, "question": chat[-1]["content"]}
    non_tensor_batch = {
        "data_source": objects("openai/gsm8k"),
        "reward_model": objects(reward_model),
        "extra_info": objects(extra_info),
        "raw_prompt": objects(np.array(chat, dtype=object)),
        "tool_extra_fields": objects({"raw_prompt": chat}),
        "__num_turns__": np.array([2]),
    }
    if uid is not None:
        non_tensor_batch["uid"] = objects(uid)
    return DataProto(
        batch={
            "prompts": torch.tensor([prompts]),
            "responses": torch.tensor([responses]),
            "attention_mask": torch.tensor([mask]),
        },
        non_tensor_batch=non_tensor_batch,
    )


def without_prompt(data: DataProto) -> DataProto:
    """The sample with no prompt anywhere but the token ids (extra_info as verl's MATH
    preprocessing writes it: no question)."""
    fields = dict(data.non_tensor_batch)
    del fields["raw_prompt"], fields["tool_extra_fields"]
    fields["extra_info"] = objects({"split": "train", "index": 0})
    return DataProto(data.batch, fields)


CHAT = [
    {"role": "system", "content": "Put the answer in a box."},
    {"role": "user", "content": "What is 3 + 4?"},
]


def reward_config(url: str, section: str = "reward", **kwargs: Any) -> dict[str, Any]:
    return {section: {"reward_kwargs": {"model": "math", "url": url, **kwargs}}}


def build_09(module: Any, config: Any, tokenizer: Any) -> Any:
    # verl/trainer/ppo/reward.py:148-153 with reward_loop.py:127-132 (verl 0.9.1): keywords.
    return module.RMServeRewardManager(
        config=config,
        tokenizer=tokenizer,
        compute_score=None,
        reward_router_address=None,
        reward_model_tokenizer=None,
    )


@pytest.fixture(autouse=True)
def closed_clients() -> Iterator[None]:
    yield
    verl.reset()


def test_without_verl_the_manager_imports_but_refuses_to_be_built(tokenizer: Any) -> None:
    assert verl_manager.HAVE_VERL is False
    with pytest.raises(RuntimeError, match=r"needs verl \(0.7 or newer\)"):
        verl_manager.RMServeRewardManager(config={}, tokenizer=tokenizer)


def test_loaded_like_verl_it_registers_as_rmserve_once(verl_09: ModuleType) -> None:
    first = load_like_verl(verl_manager.__file__)
    second = load_like_verl(verl_manager.__file__)  # a second load must not raise
    assert first.HAVE_VERL and second.HAVE_VERL
    assert verl_09.get_reward_manager_cls("rmserve") is first.RMServeRewardManager


async def test_run_single_scores_the_chat_and_the_decoded_response(
    verl_09: ModuleType, tokenizer: Any, proxy: RecordingProxy
) -> None:
    module = load_like_verl(verl_manager.__file__)
    manager = build_09(module, reward_config(proxy.url), tokenizer)
    try:
        right = await manager.run_single(sample(tokenizer, CHAT, "So \\boxed{7}.", "7"))
        wrong = await manager.run_single(sample(tokenizer, CHAT, "So \\boxed{8}.", "7"))
    finally:
        await verl.aclose()
    assert right["reward_score"] == 1.0 and wrong["reward_score"] == 0.0
    assert list(right["reward_extra_info"]) == list(verl.EXTRA_INFO_KEYS)
    assert right["reward_extra_info"]["rmserve_ok"] is True
    (body, _) = proxy.bodies("/v1/score")
    assert body["items"][0] == {
        "messages": [*CHAT, {"role": "assistant", "content": "So \\boxed{7}."}],
        "group": group_of(CHAT),
        "reference": "7",
        "metadata": {"data_source": "openai/gsm8k"},
    }


async def test_the_group_is_verls_uid(
    verl_09: ModuleType, tokenizer: Any, proxy: RecordingProxy
) -> None:
    module = load_like_verl(verl_manager.__file__)
    manager = build_09(module, reward_config(proxy.url), tokenizer)
    uids = [f"uid-{problem}" for problem in range(4) for _ in range(2)]  # 4 prompts, n=2
    unprompted = [
        without_prompt(sample(tokenizer, CHAT, "\\boxed{7}", "7", uid=uid)) for uid in uids
    ]
    # The same prompt drawn twice in one batch: two uids, two groups.
    prompted = [sample(tokenizer, CHAT, "\\boxed{7}", "7", uid=uid) for uid in ("a", "a", "b")]
    try:
        await asyncio.gather(*(manager.run_single(item) for item in [*unprompted, *prompted]))
    finally:
        await verl.aclose()
    items = [item for body in proxy.bodies("/v1/score") for item in body["items"]]
    assert [item["group"] for item in items] == [*uids, "a", "a", "b"]
    assert [len(item["messages"]) for item in items] == [1] * 8 + [3] * 3


def test_a_sample_without_uid_or_prompt_is_in_no_group(tokenizer: Any) -> None:
    data = without_prompt(sample(tokenizer, CHAT, "x", "7"))
    assert "group" not in verl_manager.sample_item(data[0].non_tensor_batch, "x")
    long_uid = sample(tokenizer, CHAT, "x", "7", uid="u" * 300)
    group = verl_manager.sample_item(long_uid[0].non_tensor_batch, "x")["group"]
    assert group == group_of("u" * 300)  # the service takes groups of up to 256 characters


async def test_the_key_comes_from_the_file_named_in_the_config(
    verl_09: ModuleType, tokenizer: Any, proxy: RecordingProxy, tmp_path: Path
) -> None:
    module = load_like_verl(verl_manager.__file__)
    (tmp_path / "key").write_text("key-from-file\n")
    config = reward_config(proxy.url, api_key_file=str(tmp_path / "key"))
    manager = build_09(module, config, tokenizer)
    try:
        await manager.run_single(sample(tokenizer, CHAT, "\\boxed{7}", "7", uid="u"))
    finally:
        await verl.aclose()
    assert [r.authorization for r in proxy.recorded] == ["Bearer key-from-file"]
    assert "key-from-file" not in repr(config) + repr(manager.settings)
    with pytest.raises(TypeError, match="verl prints its config"):
        build_09(module, reward_config(proxy.url, api_key="sk-literal"), tokenizer)


async def test_64_concurrent_samples_share_a_few_requests(
    verl_09: ModuleType, tokenizer: Any, verifiers: ServerProcess
) -> None:
    module = load_like_verl(verl_manager.__file__)
    manager = build_09(module, reward_config(verifiers.base_url), tokenizer)
    data = [
        sample(tokenizer, CHAT, f"\\boxed{{{n}}}", str(n if n % 4 else -n - 1)) for n in range(64)
    ]
    before = requests_served(verifiers, "/v1/score")
    try:
        # reward_loop.py:138-143 (verl 0.9.1): one task per sample, gathered.
        tasks = [asyncio.create_task(manager.run_single(item)) for item in data]
        outputs = await asyncio.gather(*tasks)
    finally:
        await verl.aclose()
    assert [o["reward_score"] for o in outputs] == [float(n % 4 != 0) for n in range(64)]
    assert requests_served(verifiers, "/v1/score") - before <= 8


async def test_an_item_error_raises_or_is_flagged(
    verl_09: ModuleType, tokenizer: Any, verifiers: ServerProcess
) -> None:
    module = load_like_verl(verl_manager.__file__)
    strict = build_09(module, reward_config(verifiers.base_url), tokenizer)
    lenient = build_09(
        module, reward_config(verifiers.base_url, on_error="flag", error_score=-1), tokenizer
    )
    unscorable = sample(tokenizer, CHAT, "\\boxed{7}", None)  # math without reference
    try:
        with pytest.raises(ItemFailed, match="missing_reference"):
            await strict.run_single(unscorable)
        flagged = await lenient.run_single(unscorable)
    finally:
        await verl.aclose()
    assert flagged["reward_score"] == -1.0
    info = flagged["reward_extra_info"]
    assert info["rmserve_ok"] is False and info["rmserve_error"].startswith("missing_reference")


async def test_verl_07_builds_it_positionally(
    verl_07: ModuleType, tokenizer: Any, verifiers: ServerProcess
) -> None:
    module = load_like_verl(verl_manager.__file__)
    config = reward_config(verifiers.base_url, section="reward_model")
    # verl/experimental/reward_loop/reward_loop.py:100-102 (verl 0.7.0): positional, and the
    # settings under reward_model.reward_kwargs.
    manager = module.RMServeRewardManager(config, tokenizer, None, None, None)
    try:
        result = await manager.run_single(sample(tokenizer, CHAT, "\\boxed{7}", "7"))
    finally:
        await verl.aclose()
    assert result["reward_score"] == 1.0


def test_unknown_settings_fail_at_construction(verl_09: ModuleType, tokenizer: Any) -> None:
    module = load_like_verl(verl_manager.__file__)
    with pytest.raises(TypeError, match="unknown reward_kwargs"):
        build_09(module, reward_config("http://x", max_resp_len=10), tokenizer)
