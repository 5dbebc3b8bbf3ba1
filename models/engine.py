"""Pooling engines: the part that turns token ids into reward-head outputs.

`VllmPoolingEngine` wraps one long-lived vLLM `AsyncLLM` with the pooling runner. vLLM runs the
model in its own engine-core process; concurrent `pool` calls from many requests are batched
by its scheduler (continuous batching), so callers simply await one call per item.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from models.errors import ItemError, ModelLoadError
from models.spec import EngineOptions

PoolingTask = Literal["classify", "token_classify"]

_GIB = 1 << 30


class PoolingEngine(Protocol):
    """Raw (no activation) head outputs for one tokenized input."""

    max_model_len: int

    async def pool(self, token_ids: list[int], task: PoolingTask) -> list[list[float]]:
        """Rows of head outputs: one row for `classify`, one per token for `token_classify`."""
        ...

    def shutdown(self) -> None: ...


def engine_args(
    model_dir: Path,
    tokenizer_dir: Path,
    options: EngineOptions,
    runner: Literal["pooling", "generate"] = "pooling",
) -> Any:
    """vLLM engine arguments (shared with the benchmarks' baselines)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(model_dir),
        tokenizer=str(tokenizer_dir),
        runner=runner,
        max_model_len=options.max_model_len,
        dtype=options.dtype,
        kv_cache_memory_bytes=int(options.kv_cache_gib * _GIB) if options.kv_cache_gib else None,
        gpu_memory_utilization=options.gpu_memory_utilization,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        enforce_eager=options.enforce_eager,
        tensor_parallel_size=options.tensor_parallel_size,
        trust_remote_code=options.trust_remote_code,
        seed=options.seed,
        disable_log_stats=True,
    )


def _start_async_llm(
    model_dir: Path,
    tokenizer_dir: Path,
    options: EngineOptions,
    runner: Literal["pooling", "generate"],
) -> Any:
    """Start a vLLM AsyncLLM (blocking, tens of seconds: call it from a thread)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    try:
        # The API-server context gives the scheduler defaults `vllm serve` uses (e.g. the
        # per-step token budget); the default context would fall back to a small budget.
        return AsyncLLM.from_engine_args(
            engine_args(model_dir, tokenizer_dir, options, runner),
            usage_context=UsageContext.OPENAI_API_SERVER,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"the vLLM engine failed to start: {_root_cause(exc)} (the engine's own error is "
            "in the server log, on lines marked EngineCore or Worker)"
        ) from exc


class VllmPoolingEngine:
    def __init__(self, llm: Any, max_model_len: int) -> None:
        self._llm = llm
        self.max_model_len = max_model_len
        self._ids = itertools.count()

    @classmethod
    def start(
        cls, model_dir: Path, tokenizer_dir: Path, options: EngineOptions
    ) -> VllmPoolingEngine:
        llm = _start_async_llm(model_dir, tokenizer_dir, options, "pooling")
        return cls(llm, llm.model_config.max_model_len)

    async def pool(self, token_ids: list[int], task: PoolingTask) -> list[list[float]]:
        from vllm import PoolingParams

        params = PoolingParams(task=task, use_activation=False)
        final = None
        async for output in self._llm.encode(
            {"prompt_token_ids": token_ids}, params, f"rm-{next(self._ids)}"
        ):
            final = output
        assert final is not None, "vLLM finished a request without output"
        data = final.outputs.data
        rows: list[list[float]] = data.reshape(-1, data.shape[-1]).tolist()
        return rows

    def shutdown(self) -> None:
        self._llm.shutdown()


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class SamplingRequest:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    n: int = 1
    # Structured outputs: the whole completion must match this regex.
    regex: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    # "stop" (finished), "length" (hit max_tokens), ...
    finish_reason: str | None


class GenerateEngine(Protocol):
    max_model_len: int

    async def generate(self, token_ids: list[int], sampling: SamplingRequest) -> list[Completion]:
        """`sampling.n` completions of one prompt."""
        ...

    def shutdown(self) -> None: ...


# vLLM's CPU build crashes its engine ("CPU Generator does not use offset") when a seeded
# request's prompt is prefilled in several steps (chunked prefill, which V1 always uses).
SEED_ON_CPU = (
    "seeded sampling is not available on vLLM's CPU build: it crashes the engine when a "
    "prompt is prefilled in chunks; leave the seed out"
)


def cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VllmGenerateEngine:
    """One long-lived AsyncLLM generating; concurrent requests batch continuously."""

    def __init__(self, llm: Any, max_model_len: int) -> None:
        self._llm = llm
        self.max_model_len = max_model_len
        self._ids = itertools.count()
        self._seeds_crash = cpu_platform()

    @classmethod
    def start(
        cls, model_dir: Path, tokenizer_dir: Path, options: EngineOptions
    ) -> VllmGenerateEngine:
        llm = _start_async_llm(model_dir, tokenizer_dir, options, "generate")
        return cls(llm, llm.model_config.max_model_len)

    async def generate(self, token_ids: list[int], sampling: SamplingRequest) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if sampling.seed is not None and self._seeds_crash:
            raise ItemError("unsupported_option", SEED_ON_CPU)
        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            structured_outputs=(
                StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None
            ),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in self._llm.generate(
            {"prompt_token_ids": token_ids}, params, f"judge-{next(self._ids)}"
        ):
            final = output
        assert final is not None, "vLLM finished a request without output"
        return [
            Completion(out.text, len(out.token_ids), out.finish_reason) for out in final.outputs
        ]

    def shutdown(self) -> None:
        self._llm.shutdown()
