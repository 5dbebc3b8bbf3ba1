"""Build a ready-to-serve reward model from its registry spec, or say why it cannot be served."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rmserve.models.base import PeerScorer, RewardModel
from rmserve.models.discriminative import DiscriminativeModel
from rmserve.models.engine import (
    SEED_ON_CPU,
    EngineStats,
    VllmGenerateEngine,
    VllmPoolingEngine,
    cpu_platform,
)
from rmserve.models.errors import ModelLoadError
from rmserve.models.generative.backends import LocalBackend
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.prompts import JudgePrompt
from rmserve.models.generative.remote import RemoteBackend
from rmserve.models.process import ProcessModel, step_tag_id
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import (
    CodeTestsSpec,
    DiscriminativeSpec,
    FormatSpec,
    GenerativeSpec,
    MathSpec,
    ModelSpec,
    ProcessSpec,
    RemoteJudge,
    SimilaritySpec,
    VerifierSpec,
)
from rmserve.models.weights import resolve_weights
from rmserve.wire.tools import Toolbox

log = logging.getLogger(__name__)

_GIB = 1 << 30


def load_model(
    spec: ModelSpec,
    peers: PeerScorer | None = None,
    toolbox: Toolbox | None = None,
    stats: EngineStats | None = None,
) -> RewardModel:
    """Resolve weights, check the model fits its spec, start its engine. Blocking (tens of s).

    `peers` reaches the other models this one scores with (a judge's meta reward model);
    `toolbox` the sandbox an agentic judge calls; `stats` receives the engine's statistics.

    Cheap checks (weights present, tokenizer, chat template, head size, step tag) run before
    the engine starts, so a misconfigured model fails in seconds with a precise reason.
    """
    if not isinstance(spec, DiscriminativeSpec | ProcessSpec | GenerativeSpec):
        return _load_verifier(spec, peers, toolbox)
    if isinstance(spec, GenerativeSpec) and spec.options.meta_model and peers is None:
        raise ModelLoadError("options.meta_model: this runtime cannot reach other models")
    if isinstance(spec, GenerativeSpec) and spec.options.tools and toolbox is None:
        raise ModelLoadError("options.tools: no sandbox is configured (RMSERVE_SANDBOX_URL)")
    if isinstance(spec, GenerativeSpec) and spec.remote is not None:
        return _load_remote_judge(spec, spec.remote, peers, toolbox)
    assert spec.weights is not None  # the spec's validator: weights or remote
    trust = spec.engine.trust_remote_code
    weights = resolve_weights(spec.weights, spec.revision, allow_remote_code=trust)
    tokenizer_dir = (
        resolve_weights(spec.tokenizer, None, allow_remote_code=trust)
        if spec.tokenizer
        else weights
    )
    tokenizer = _load_tokenizer(tokenizer_dir, trust)
    if isinstance(spec, GenerativeSpec):
        return _load_judge(spec, weights, tokenizer_dir, tokenizer, peers, toolbox, stats)
    ChatRenderer(tokenizer, spec.engine.max_model_len, spec.options.too_long)  # has a template?
    _check_head(spec, _num_labels(weights, trust))
    if spec.kind == "process":
        step_tag_id(tokenizer, spec.options.step_tag)
    _check_memory(spec, weights)
    log.info("starting engine for %s from %s", spec.name, weights)
    engine = VllmPoolingEngine.start(weights, tokenizer_dir, spec.engine, stats)
    problem = engine.token_rows_problem() if isinstance(spec, ProcessSpec) else None
    if problem is not None:  # a PRM reads the head at its step tags, one row per token
        engine.shutdown()
        raise ModelLoadError(problem)
    renderer = ChatRenderer(tokenizer, engine.max_model_len, spec.options.too_long)
    if isinstance(spec, DiscriminativeSpec):
        return DiscriminativeModel(spec, renderer, engine)
    return ProcessModel(spec, renderer, engine)


def _load_judge(
    spec: GenerativeSpec,
    weights: Path,
    tokenizer_dir: Path,
    tokenizer: Any,
    peers: PeerScorer | None,
    toolbox: Toolbox | None,
    stats: EngineStats | None,
) -> RewardModel:
    ChatRenderer(tokenizer, spec.engine.max_model_len, "error")  # has a chat template?
    try:
        prompt = JudgePrompt.load(spec.options.template_name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if spec.options.sampling.seed is not None and cpu_platform():
        raise ModelLoadError(f"options.sampling.seed: {SEED_ON_CPU}")
    _check_memory(spec, weights)
    log.info("starting generation engine for %s from %s", spec.name, weights)
    vision = _reads_images(weights, spec.engine.trust_remote_code)
    engine = VllmGenerateEngine.start(
        weights, tokenizer_dir, spec.engine, spec.options.max_images if vision else None, stats
    )
    renderer = ChatRenderer(tokenizer, engine.max_model_len, "error")
    return GenerativeModel(spec, LocalBackend(renderer, engine), prompt, peers, toolbox)


def _load_remote_judge(
    spec: GenerativeSpec, remote: RemoteJudge, peers: PeerScorer | None, toolbox: Toolbox | None
) -> RewardModel:
    try:
        prompt = JudgePrompt.load(spec.options.template_name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    return GenerativeModel(spec, RemoteBackend.from_spec(remote), prompt, peers, toolbox)


def _load_verifier(
    spec: VerifierSpec, peers: PeerScorer | None, toolbox: Toolbox | None
) -> RewardModel:
    """Rule-based kinds: nothing to download or start, only their options to check."""
    from rmserve.models.verifiers import rewards

    if isinstance(spec, MathSpec):
        return rewards.MathVerifier(spec)
    if isinstance(spec, SimilaritySpec):
        return rewards.SimilarityVerifier(spec)
    if isinstance(spec, FormatSpec):
        try:
            return rewards.FormatVerifier(spec)
        except ValueError as exc:
            raise ModelLoadError(f"options: {exc}") from None
    if isinstance(spec, CodeTestsSpec):
        if toolbox is None:
            raise ModelLoadError("code_tests needs the tool sandbox (RMSERVE_SANDBOX_URL)")
        return rewards.CodeTestsVerifier(spec, toolbox)
    if peers is None:
        raise ModelLoadError("a composite reward needs to reach its input models")
    return rewards.CompositeReward(spec, peers)


def _check_memory(spec: ModelSpec, weights: Path) -> None:
    """On CPU, refuse a model whose KV cache and weights cannot fit in the memory available now.

    vLLM would fail too, but from its engine process, with the reason only in its log.
    """
    import psutil  # like vllm, a model worker's (rmserve[worker]): verifier workers have neither
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or spec.engine.kv_cache_gib is None:
        return
    weights_gib = sum(f.stat().st_size for f in weights.glob("*.safetensors")) / _GIB
    needed = spec.engine.kv_cache_gib + weights_gib
    available = psutil.virtual_memory().available / _GIB
    if needed > available:
        raise ModelLoadError(
            f"too little memory: the KV cache (kv_cache_gib {spec.engine.kv_cache_gib:g}) and "
            f"{weights_gib:.1f} GiB of weights need {needed:.1f} GiB, but only {available:.1f} GiB "
            "is available; lower engine.kv_cache_gib or free memory"
        )


def _load_tokenizer(path: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc


def _reads_images(path: Any, trust_remote_code: bool) -> bool:
    """A vision-language model (its config has a vision tower)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    return getattr(config, "vision_config", None) is not None


def _num_labels(path: Any, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    return int(getattr(config, "num_labels", 1))


def _check_head(spec: DiscriminativeSpec | ProcessSpec, num_labels: int) -> None:
    label = (
        spec.options.score_label if spec.kind == "discriminative" else spec.options.positive_label
    )
    if label >= num_labels:
        field = "score_label" if spec.kind == "discriminative" else "positive_label"
        raise ModelLoadError(
            f"options.{field} is {label} but the model's head has {num_labels} label(s)"
        )
