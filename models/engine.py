"""Pooling engines: the part that turns token ids into reward-head outputs.

`VllmPoolingEngine` wraps one long-lived vLLM `AsyncLLM` with the pooling runner. vLLM runs the
model in its own engine-core process; concurrent `pool` calls from many requests are batched
by its scheduler (continuous batching), so callers simply await one call per item.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from rmserve.models.errors import ModelLoadError
from rmserve.models.spec import EngineOptions
from rmserve.wire.errors import ItemError

PoolingTask = Literal["classify", "token_classify"]

_GIB = 1 << 30


class EngineStats(Protocol):
    """Where an engine reports what it does (service.metrics records it for Prometheus)."""

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        """After an engine step: requests running and waiting, the KV cache fraction in use."""

    def prefix_cache(self, queries: int, hits: int) -> None:
        """Since the last report: prompt tokens looked up in the prefix cache, and found."""

    def iteration(self, batch: int, prompt_tokens: int, generation_tokens: int) -> None:
        """An engine step's output: the requests it advanced and the tokens it processed."""


def stat_logger_factory(stats: EngineStats) -> Any:
    """A vLLM stat-logger factory feeding `stats` (vLLM calls it once per engine). A custom
    stat logger turns vLLM's statistics on despite `disable_log_stats` (which only keeps its
    own loggers off): the scheduler then counts prefix-cache queries and hits, per step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Bridge(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                stats.scheduler(
                    scheduler_stats.num_running_reqs,
                    scheduler_stats.num_waiting_reqs,
                    scheduler_stats.kv_cache_usage,
                )
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                if prefix is not None and (prefix.queries or prefix.hits):
                    stats.prefix_cache(prefix.queries, prefix.hits)
            if iteration_stats is not None:
                # Each request the step advanced has a first-token (prefill done) or an
                # inter-token (decode) latency in it.
                batch = len(iteration_stats.time_to_first_tokens_iter) + len(
                    iteration_stats.inter_token_latencies_iter
                )
                stats.iteration(
                    batch, iteration_stats.num_prompt_tokens, iteration_stats.num_generation_tokens
                )

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: Bridge(vllm_config, engine_index)


class PoolingEngine(Protocol):
    """Raw (no activation) head outputs for one tokenized input."""

    max_model_len: int

    async def pool(self, token_ids: list[int], task: PoolingTask) -> list[list[float]]:
        """Rows of head outputs: one row for `classify` (the model's output for the sequence),
        one per token, in order, for `token_classify`."""
        ...

    async def supports(self, task: PoolingTask) -> bool:
        """Whether the loaded model serves `task`; `classify` only as a last-token request the
        engine can serve from its prefix cache (what a PRM's `reuse_prefix` relies on)."""
        ...

    def shutdown(self) -> None: ...


def engine_args(
    model_dir: Path,
    tokenizer_dir: Path,
    options: EngineOptions,
    runner: Literal["pooling", "generate"] = "pooling",
    max_images: int | None = None,
) -> Any:
    """vLLM engine arguments (shared with the benchmarks' baselines). `max_images`: a
    vision-language model's images per prompt (vLLM sizes its encoder cache by it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra: dict[str, Any] = {}
    if max_images is not None:
        extra["limit_mm_per_prompt"] = {"image": max_images}
    if runner == "pooling":
        extra["pooler_config"] = per_token_pooler_config()
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
        block_size=options.block_size,
        enforce_eager=options.enforce_eager,
        tensor_parallel_size=options.tensor_parallel_size,
        trust_remote_code=options.trust_remote_code,
        seed=options.seed,
        disable_log_stats=True,
        **extra,
    )


def per_token_pooler_config() -> Any:
    """vLLM's pooler configuration for rmserve's pooling engines: `token_classify` returns one
    row per token (ALL pooling), whatever the model's default.

    vLLM 0.32 gives Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM) STEP token pooling by default
    (vllm/model_executor/models/qwen2_rm.py, `@default_pooling_type(tok_pooling_type="STEP")`),
    with step_tag_id 151651, the real model's <extra_0>, set when none is configured
    (vllm/model_executor/models/config.py, Qwen2ForProcessRewardModelConfig). STEP pooling
    returns rows only at the tokens equal to that id (vllm/model_executor/layers/pooler/
    tokwise/methods.py, StepPool.forward), and it also turns vLLM's chunked prefill and prefix
    caching off (vllm/config/model.py, is_chunked_prefill_supported and
    is_prefix_caching_supported). rmserve finds the step tags itself and reads the per-token
    rows at their positions, so it asks every model for ALL token pooling: the default of
    every other vLLM model, so nothing changes for them. A value the user sets wins over the
    model's default (ModelConfig.__post_init__, "Init pooler config").
    """
    from vllm.config import PoolerConfig

    return PoolerConfig(tok_pooling_type="ALL")


def _start_async_llm(
    model_dir: Path,
    tokenizer_dir: Path,
    options: EngineOptions,
    runner: Literal["pooling", "generate"],
    max_images: int | None = None,
    stats: EngineStats | None = None,
) -> Any:
    """Start a vLLM AsyncLLM (blocking, tens of seconds: call it from a thread). `stats`
    receives its per-step statistics."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    try:
        # The API-server context gives the scheduler defaults `vllm serve` uses (e.g. the
        # per-step token budget); the default context would fall back to a small budget.
        return AsyncLLM.from_engine_args(
            engine_args(model_dir, tokenizer_dir, options, runner, max_images),
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[stat_logger_factory(stats)] if stats is not None else None,
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
        self._served: frozenset[str] | None = None

    @classmethod
    def start(
        cls,
        model_dir: Path,
        tokenizer_dir: Path,
        options: EngineOptions,
        stats: EngineStats | None = None,
    ) -> VllmPoolingEngine:
        llm = _start_async_llm(model_dir, tokenizer_dir, options, "pooling", stats=stats)
        return cls(llm, llm.model_config.max_model_len)

    def token_rows_problem(self) -> str | None:
        """Why `token_classify` would not give one row per token (None: it does). rmserve
        asks for ALL token pooling (see `per_token_pooler_config`); this catches an engine
        that pools otherwise anyway, before any item is scored."""
        pooler = self._llm.model_config.pooler_config
        kind = getattr(pooler, "tok_pooling_type", None)
        if kind == "ALL":
            return None
        return (
            f"vLLM pools this model's tokens with {kind} pooling"
            + _step_pooling_detail(pooler)
            + ", not one row per token (ALL), so rmserve cannot read the head at its own "
            "step tags"
        )

    async def pool(self, token_ids: list[int], task: PoolingTask) -> list[list[float]]:
        served = await self._served_tasks()
        if task == "token_classify" and task in served:
            return await self._token_rows(token_ids)
        if task in served:
            return await self._encode(token_ids, task)
        if task == "classify" and "token_classify" in served and self._causal():
            # A head vLLM serves only per token (Qwen2ForRewardModel, say): its output for the
            # sequence is the last token's, as the model's own code pools it.
            return [(await self._token_rows(token_ids))[-1]]
        raise ItemError(
            "unsupported_model",
            f"vLLM serves this model's head for {', '.join(sorted(served)) or 'no task'}, "
            f"not {task}"
            + (" (nor token_classify of a causal model)" if task == "classify" else ""),
        )

    async def supports(self, task: PoolingTask) -> bool:
        # The tasks of the model's pooler, asked of the engine core once (AsyncLLM caches
        # them too). A *ForTokenClassification model is loaded through vLLM's seq-cls
        # adapter, whose pooler serves token_classify and classify with the same head.
        served = await self._served_tasks()
        if task == "classify":
            pooler = self._llm.model_config.pooler_config
            # classify of a prefix equals a token's row only when it pools the last token.
            return "classify" in served and getattr(pooler, "seq_pooling_type", None) == "LAST"
        return task in served

    def shutdown(self) -> None:
        self._llm.shutdown()

    async def _served_tasks(self) -> frozenset[str]:
        if self._served is None:
            self._served = frozenset(await self._llm.get_supported_tasks())
        return self._served

    def _causal(self) -> bool:
        """Causal attention: the last token's row then depends on the whole sequence."""
        return getattr(self._llm.model_config, "attn_type", None) == "decoder"

    async def _token_rows(self, token_ids: list[int]) -> list[list[float]]:
        rows = await self._encode(token_ids, "token_classify")
        if len(rows) != len(token_ids):
            pooler = self._llm.model_config.pooler_config
            raise ItemError(
                "unsupported_model",
                f"the engine returned {len(rows)} head rows for {len(token_ids)} tokens "
                f"(vLLM token pooling {getattr(pooler, 'tok_pooling_type', None)}"
                f"{_step_pooling_detail(pooler)}); rmserve needs one row per token",
            )
        return rows

    async def _encode(self, token_ids: list[int], task: PoolingTask) -> list[list[float]]:
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


def _step_pooling_detail(pooler: Any) -> str:
    """What STEP pooling keeps: rows at `step_tag_id`, columns `returned_token_ids`."""
    if getattr(pooler, "tok_pooling_type", None) != "STEP":
        return ""
    detail = f": rows only at token id {getattr(pooler, 'step_tag_id', None)}"
    if getattr(pooler, "returned_token_ids", None):
        detail += f", columns {pooler.returned_token_ids}"
    return detail


def _image_token_id(hf_config: Any) -> int | None:
    """The placeholder id of a vision-language model's config (names differ by family)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


def _input_error(exc: Exception) -> str:
    return "too_long" if "longer than the maximum model length" in str(exc) else "invalid_input"


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


@dataclass(frozen=True)
class Generation:
    completions: list[Completion]
    # As the engine counted them: images expanded into their tokens.
    prompt_tokens: int


class GenerateEngine(Protocol):
    max_model_len: int
    # The image placeholder token of a vision-language model; None for a text-only one.
    image_token_id: int | None

    async def generate(
        self, token_ids: list[int], sampling: SamplingRequest, images: Sequence[Any] = ()
    ) -> Generation:
        """`sampling.n` completions of one prompt. With `images` (PIL images), `token_ids`
        hold one `image_token_id` per image, which the engine expands."""
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
        config = llm.model_config
        self.image_token_id: int | None = (
            _image_token_id(config.hf_config) if config.is_multimodal_model else None
        )

    @classmethod
    def start(
        cls,
        model_dir: Path,
        tokenizer_dir: Path,
        options: EngineOptions,
        max_images: int | None = None,
        stats: EngineStats | None = None,
    ) -> VllmGenerateEngine:
        """`max_images`: images per prompt, for a vision-language model."""
        llm = _start_async_llm(model_dir, tokenizer_dir, options, "generate", max_images, stats)
        return cls(llm, llm.model_config.max_model_len)

    async def generate(
        self, token_ids: list[int], sampling: SamplingRequest, images: Sequence[Any] = ()
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
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
        prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if images:
            prompt["multi_modal_data"] = {"image": list(images)}
        final = None
        try:
            async for output in self._llm.generate(prompt, params, f"judge-{next(self._ids)}"):
                final = output
        except (ValueError, VLLMValidationError) as exc:  # vLLM's input checks
            raise ItemError(_input_error(exc), f"the engine refused the prompt: {exc}") from None
        assert final is not None, "vLLM finished a request without output"
        return Generation(
            [Completion(out.text, len(out.token_ids), out.finish_reason) for out in final.outputs],
            len(final.prompt_token_ids or token_ids),
        )

    def shutdown(self) -> None:
        self._llm.shutdown()
