"""Drives verl's own reward path; run by tests/trainers/test_verl_real.py with the interpreter of
the verl virtualenv (verl, CPU torch and the rmserve client; no rmserve server).

    python verl_driver.py SPEC.json OUT.json

SPEC: {"verl": "0.9.1", "model_path": tokenizer dir, "num_cpus": 2,
       "cases": [{"name", "overrides": [command-line overrides, as a user types them],
                  "samples": [{"uid", "raw_prompt", "response", "ground_truth",
                               "data_source"}, ...]}, ...]}

For each case: verl's `ppo_trainer` config composed with hydra and the case's overrides (as
`python -m verl.trainer.main_ppo OVERRIDES` composes it), then verl's RewardLoopManager on the
local Ray cluster the driver started, which scores the samples two ways:

- "batch": RewardLoopManager.compute_rm_score on one DataProto of every sample, shaped as the
  agent loop's output (verl/experimental/agent_loop/agent_loop.py:1058-1125, verl 0.9.1); the
  trainer calls it for a colocated reward model (verl/trainer/ppo/ray_trainer.py:588-594).
- "per_sample": what AgentLoopWorker._compute_score (agent_loop.py:967-1029) does for each
  sample when rewards run beside the rollout (rule-based rewards: always): a DataProto of one
  sample, built as there, sent to a reward loop worker chosen with
  `random.choice(manager.reward_loop_worker_handles)`, `await handle.compute_score.remote(data)`,
  all samples concurrently. The AgentLoopWorker itself is not built (it needs an LLM server
  and an agent loop to generate); these lines are its code with the generated tokens given.

Every outcome (rewards, reward_extra_info, or the exception that reached this driver) goes to
OUT as JSON.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import verl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from verl import DataProto
from verl.experimental.reward_loop import RewardLoopManager
from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
from verl.utils import hf_tokenizer

import rmserve.client

PROMPT_LENGTH = 96
RESPONSE_LENGTH = 64


def compose_config(overrides: list[str]) -> DictConfig:
    """verl's ppo_trainer config with `overrides`, resolved as verl's TaskRunner resolves it."""
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    return config


class Samples:
    """The rollouts as token ids of the actor's tokenizer, prompt left-padded and response
    right-padded to the rollout lengths, as the agent loop pads them (agent_loop.py:735-781)."""

    def __init__(self, tokenizer: Any, samples: list[dict[str, Any]]) -> None:
        self.samples = samples
        self.prompt_ids: list[list[int]] = []
        self.response_ids: list[list[int]] = []
        for sample in samples:
            prompt = tokenizer.apply_chat_template(
                sample["raw_prompt"], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(prompt, list):  # transformers 5 answers a BatchEncoding
                prompt = list(prompt["input_ids"])
            response = tokenizer.encode(sample["response"], add_special_tokens=False)
            decoded = tokenizer.decode(response, skip_special_tokens=True)
            if decoded != sample["response"]:
                raise ValueError(f"the tokenizer does not round-trip {sample['response']!r}")
            self.prompt_ids.append(list(prompt))
            self.response_ids.append([*response, tokenizer.eos_token_id])
        assert max(map(len, self.prompt_ids)) <= PROMPT_LENGTH
        assert max(map(len, self.response_ids)) <= RESPONSE_LENGTH

    def fields(self, index: int) -> dict[str, Any]:
        """The dataset row's non-tensor fields (what the trainer passes the agent loop)."""
        sample = self.samples[index]
        question = sample["raw_prompt"][-1]["content"]
        return {
            "data_source": sample["data_source"],
            "reward_model": {"style": "rule", "ground_truth": sample["ground_truth"]},
            # As verl's examples/data_preprocess/gsm8k.py writes it.
            "extra_info": {"split": "train", "index": index, "question": question},
            # RLHFDataset's row: the chat messages as a list (collate_fn puts the list itself
            # in the object array).
            "raw_prompt": list(sample["raw_prompt"]),
            "uid": sample["uid"],
            "index": index,
            "agent_name": "single_turn_agent",
        }

    def batch(self) -> DataProto:
        """All samples in one DataProto, as the agent loop's _postprocess returns them when the
        reward is not computed in the loop (input fields kept)."""
        n = len(self.samples)
        prompts = torch.zeros((n, PROMPT_LENGTH), dtype=torch.int64)
        responses = torch.zeros((n, RESPONSE_LENGTH), dtype=torch.int64)
        prompt_mask = torch.zeros_like(prompts)
        response_mask = torch.zeros_like(responses)
        for i, (p, r) in enumerate(zip(self.prompt_ids, self.response_ids, strict=True)):
            prompts[i, PROMPT_LENGTH - len(p) :] = torch.tensor(p)
            prompt_mask[i, PROMPT_LENGTH - len(p) :] = 1
            responses[i, : len(r)] = torch.tensor(r)
            response_mask[i, : len(r)] = 1
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        position_ids = torch.clip(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
        batch = TensorDict(
            {
                "prompts": prompts,
                "responses": responses,
                "response_mask": response_mask,
                "input_ids": torch.cat([prompts, responses], dim=1),
                "attention_mask": attention_mask,
                "position_ids": position_ids,
            },
            batch_size=n,
        )
        rows = [self.fields(i) for i in range(n)]
        non_tensor: dict[str, np.ndarray] = {}
        for key in rows[0]:
            column: np.ndarray = np.empty(n, dtype=object)
            for i, row in enumerate(rows):
                column[i] = row[key]
            non_tensor[key] = column
        non_tensor["__num_turns__"] = np.array([2] * n, dtype=np.int32)
        return DataProto(batch=batch, non_tensor_batch=non_tensor)

    def one(self, index: int) -> DataProto:
        """One sample as AgentLoopWorker._compute_score builds it (agent_loop.py:975-1024):
        unpadded ids, an all-ones mask, `kwargs` (the row's fields but agent_name) repeated."""
        prompts = torch.tensor(self.prompt_ids[index], dtype=torch.int64)
        responses = torch.tensor(self.response_ids[index], dtype=torch.int64)
        input_ids = torch.cat([prompts, responses], dim=0)
        attention_mask = torch.ones_like(input_ids, dtype=torch.int64)
        position_ids = torch.arange(len(input_ids), dtype=torch.int64)
        batch = TensorDict(
            {
                "prompts": prompts.unsqueeze(0),
                "responses": responses.unsqueeze(0),
                "attention_mask": attention_mask.unsqueeze(0),
                "input_ids": input_ids.unsqueeze(0),
                "position_ids": position_ids.unsqueeze(0),
            },
            batch_size=1,
        )
        fields = self.fields(index)
        del fields["agent_name"]  # _run_agent_loop takes it out of the kwargs
        # The agent loop's extra_fields: _agent_loop_postprocess adds the prompt (line 730).
        extra_fields = {"raw_prompt": fields["raw_prompt"]}
        n = 1
        non_tensor = {
            **{k: np.array([v] * n) for k, v in fields.items()},
            "__num_turns__": np.array([2] * n),
            "tool_extra_fields": np.array([extra_fields] * n, dtype=object),
            "prompt_len": np.array([len(self.prompt_ids[index])] * n),
            "response_len": np.array([len(self.response_ids[index])] * n),
        }
        return DataProto(batch=batch, non_tensor_batch=non_tensor)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return value


def failure(exc: BaseException) -> dict[str, Any]:
    """What verl's driver got: the exception's type, its cause's (a RayTaskError carries the
    worker's exception, unpickled here), and the rmserve fields of either."""
    cause = getattr(exc, "cause", None)
    from rmserve.client.policy import ItemFailed

    def described(error: BaseException | None) -> dict[str, Any] | None:
        if error is None:
            return None
        return {
            "class": f"{type(error).__module__}.{type(error).__qualname__}",
            "mro": [f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__],
            "is_item_failed": isinstance(error, ItemFailed),
            "type": getattr(error, "type", None),
            "message": getattr(error, "message", None),
            "str": str(error)[-3000:],
        }

    return {"error": described(exc), "cause": described(cause)}


def rewards_of_batch(manager: Any, samples: Samples) -> dict[str, Any]:
    data = samples.batch()
    out = manager.compute_rm_score(data)
    rm_scores = out.batch["rm_scores"]
    # verl puts each reward on the sample's last valid response token, zeros elsewhere.
    last = data.batch["attention_mask"][:, PROMPT_LENGTH:].sum(dim=1) - 1
    rows = torch.arange(len(last))
    elsewhere = rm_scores.clone()
    elsewhere[rows, last] = 0.0
    return {
        "rewards": rm_scores[rows, last].tolist(),
        "zero_elsewhere": not bool(elsewhere.any()),
        "reward_extra_keys": out.meta_info["reward_extra_keys"],
        "reward_extra_info": {
            key: jsonable(out.non_tensor_batch[key]) for key in out.meta_info["reward_extra_keys"]
        },
    }


def rewards_per_sample(manager: Any, samples: Samples) -> dict[str, Any]:
    handles = manager.reward_loop_worker_handles
    assert handles is not None, "rule-based rewards run beside the rollout: handles expected"
    chosen: list[int] = []

    async def score(index: int) -> dict[str, Any]:
        handle = random.choice(handles)
        chosen.append(handles.index(handle))
        result: dict[str, Any] = await handle.compute_score.remote(samples.one(index))
        return result

    async def score_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(score(i) for i in range(len(samples.samples)))))

    results = asyncio.run(score_all())
    return {
        "rewards": [float(r["reward_score"]) for r in results],
        "reward_extra_info": [jsonable(r["reward_extra_info"]) for r in results],
        "workers_used": sorted(set(chosen)),
    }


def shut_down(manager: Any) -> None:
    """Kill the case's reward loop workers, and wait until their names are free again (the next
    case's manager names its workers the same)."""
    names = [f"reward_loop_worker_{i}" for i in range(len(manager.reward_loop_workers))]
    for worker in manager.reward_loop_workers:
        ray.kill(worker)
    deadline = time.monotonic() + 60
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.2)


def run_case(case: dict[str, Any], samples: Samples) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {}
    config = compose_config(case["overrides"])
    result["config"] = {
        "reward": OmegaConf.to_container(config.reward, resolve=True),
        "rollout_n": config.actor_rollout_ref.rollout.n,
    }
    manager = RewardLoopManager(config=config, rm_resource_pool=None)
    result["manager_cls"] = (
        f"{manager.reward_manager_cls.__module__}.{manager.reward_manager_cls.__qualname__}"
    )
    try:
        for path, run in (("batch", rewards_of_batch), ("per_sample", rewards_per_sample)):
            try:
                result[path] = run(manager, samples)
            except Exception as exc:
                result[path] = failure(exc)
                result[path]["traceback"] = traceback.format_exc()[-6000:]
    finally:
        shut_down(manager)
    result["seconds"] = time.monotonic() - started
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    assert verl.__version__ == spec["verl"], (verl.__version__, spec["verl"])
    report: dict[str, Any] = {
        "verl": verl.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "client_from": rmserve.client.__file__,
        "cases": {},
    }
    # A local Ray cluster with main_ppo's runtime environment (verl/trainer/main_ppo.py:56-74);
    # the workers inherit this process's environment (RMSERVE_URL, PYTHONPATH).
    started = time.monotonic()
    ray.init(
        num_cpus=spec["num_cpus"],
        num_gpus=0,
        include_dashboard=False,
        runtime_env=get_ppo_ray_runtime_env(),
        logging_level="WARNING",
    )
    report["ray_init_s"] = time.monotonic() - started
    try:
        tokenizer = hf_tokenizer(spec["model_path"], trust_remote_code=True)
        for case in spec["cases"]:
            samples = Samples(tokenizer, case["samples"])
            report["cases"][case["name"]] = run_case(case, samples)
            out.write_text(json.dumps(report, indent=1))
    finally:
        ray.shutdown()
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
