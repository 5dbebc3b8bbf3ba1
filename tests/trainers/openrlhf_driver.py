"""Runs in the OpenRLHF virtualenv (tests/trainers/test_openrlhf_real.py builds it), never in the
project's: drives OpenRLHF's own `SingleTurnAgentExecutor` (openrlhf/utils/agent.py:188-365 in
0.11.2) against a running rmserve, the way a rollout worker does.

    python openrlhf_driver.py SPEC.json OUT.json

SPEC: {"openrlhf_version", "tokenizer" (a directory), "runs": [{"id", "remote_rm_url" (a URL, a
list of URLs or a reward-function .py file), "env" ({name: value or null}, set for the run),
"max_length", "max_tokens", "samples": [{"conversation", "response", "label"}]}]}.
OUT: {"openrlhf_version", "agent_file", "runs": {id: {"outputs": [...], "logs": [[level,
message], ...], "seconds"}}}. The samples of one run are executed concurrently (asyncio.gather),
as `RolloutRayActor.generate_responses` does (openrlhf/trainer/ray/vllm_engine.py:183-205).

Only the policy's generation is stood in for (`PolicyEngine`: fixed response tokens instead of
vLLM); prompt rendering, tokenization, truncation, the query text and the whole reward path
(HTTP or reward function, retries, error handling) are OpenRLHF's own code.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any


@dataclass
class SamplingParams:
    """What the executor reads of vLLM's SamplingParams (it deep-copies them)."""

    max_tokens: int | None
    logprobs: int | None = 1


class PolicyEngine:
    """Stands in for the policy's vLLM engine (`RolloutRayActor.generate`): answers every prompt
    with fixed response tokens, ending in EOS as a finished generation does. What is under test
    is OpenRLHF's reward path, not the policy's generation."""

    def __init__(self, response_ids: list[int]) -> None:
        self.response_ids = response_ids
        self.prompts: list[list[int]] = []

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        multi_modal_data: Any = None,
    ) -> SimpleNamespace:
        await asyncio.sleep(0)  # yield, as a real engine does, so the samples interleave
        self.prompts.append(list(prompt_token_ids))
        limit = sampling_params.max_tokens
        ids = self.response_ids if limit is None else self.response_ids[:limit]
        finish = "length" if len(ids) < len(self.response_ids) else "stop"
        logprobs = [{token: SimpleNamespace(logprob=-0.5)} for token in ids]
        output = SimpleNamespace(token_ids=ids, text="", finish_reason=finish, logprobs=logprobs)
        return SimpleNamespace(outputs=[output])


class Records(logging.Handler):
    """OpenRLHF's log records (its own handler still prints them to stdout)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[list[str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([record.levelname, record.getMessage()])


def load_file(name: str, path: Path) -> ModuleType:
    """A module loaded by path, as OpenRLHF loads its reward functions."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_value(value: Any) -> Any:
    """The executor's output as JSON (a reward function may return tensors)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


async def run(
    executor_cls: type, preprocess: Any, tokenizer: Any, spec: dict[str, Any], records: Records
) -> dict[str, Any]:
    for name, value in spec.get("env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    del records.lines[:]
    started = time.monotonic()
    executor = executor_cls(spec["remote_rm_url"])
    tasks = []
    for sample in spec["samples"]:
        # The dataset's prompt and label as PromptDataset makes them (--data.apply_chat_template).
        data = {"input": sample["conversation"], "label": sample["label"]}
        prompt, label = preprocess(data, None, "input", "label", tokenizer.apply_chat_template)
        response_ids = tokenizer(sample["response"], add_special_tokens=False)["input_ids"]
        engine = PolicyEngine([*response_ids, tokenizer.eos_token_id])
        params = SamplingParams(max_tokens=spec["max_tokens"])
        tasks.append(
            executor.execute(
                prompt=prompt,
                label=label,
                sampling_params=params,
                max_length=spec["max_length"],
                hf_tokenizer=tokenizer,
                llm_engine=engine,
            )
        )
    outputs = await asyncio.gather(*tasks)
    seconds = time.monotonic() - started
    return {
        "outputs": [
            {
                "reward": json_value(out["reward"]),
                "scores": json_value(out["scores"]),
                "extra_logs": json_value(out["extra_logs"]),
                "query": tokenizer.decode(out["observation_tokens"], skip_special_tokens=False),
                "truncated": out["truncated"],
                "action_ranges": json_value(out["action_ranges"]),
                "rollout_log_probs": len(out["rollout_log_probs"] or []),
            }
            for out in outputs
        ],
        "logs": list(records.lines),
        "seconds": seconds,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    version = importlib.metadata.version("openrlhf")
    assert version == spec["openrlhf_version"], (version, spec["openrlhf_version"])

    from openrlhf.utils import agent  # type: ignore[import-not-found]  # the trainer venv
    from transformers import AutoTokenizer

    # openrlhf/datasets/__init__.py imports the `datasets` library (not installed: not on the
    # reward path), so prompts_dataset.py, which needs only torch, is loaded by its path.
    package = Path(agent.__file__).parents[1]
    prompts = load_file("openrlhf_prompts_dataset", package / "datasets" / "prompts_dataset.py")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    records = Records()
    logging.getLogger(agent.__name__).addHandler(records)

    async def run_all() -> dict[str, Any]:
        return {
            one["id"]: await run(
                agent.SingleTurnAgentExecutor, prompts.preprocess_data, tokenizer, one, records
            )
            for one in spec["runs"]
        }

    results = asyncio.run(run_all())
    if "rmserve.client.openrlhf_scoring" in sys.modules:  # the reward function's connections
        sys.modules["rmserve.client.openrlhf_scoring"].reset()
    out = {"openrlhf_version": version, "agent_file": agent.__file__, "runs": results}
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
