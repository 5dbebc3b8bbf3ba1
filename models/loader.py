"""Build a ready-to-serve reward model from its registry spec, or say why it cannot be served."""

from __future__ import annotations

import logging
from typing import Any

from models.base import RewardModel
from models.discriminative import DiscriminativeModel
from models.engine import VllmPoolingEngine
from models.errors import ModelLoadError
from models.process import ProcessModel, step_tag_id
from models.rendering import ChatRenderer
from models.spec import DiscriminativeSpec, ModelSpec
from models.weights import resolve_weights

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec) -> RewardModel:
    """Resolve weights, check the model fits its spec, start its engine. Blocking (tens of s).

    Cheap checks (weights present, tokenizer, chat template, head size, step tag) run before
    the engine starts, so a misconfigured model fails in seconds with a precise reason.
    """
    trust = spec.engine.trust_remote_code
    weights = resolve_weights(spec.weights, spec.revision, allow_remote_code=trust)
    tokenizer_dir = (
        resolve_weights(spec.tokenizer, None, allow_remote_code=trust)
        if spec.tokenizer
        else weights
    )
    tokenizer = _load_tokenizer(tokenizer_dir, trust)
    ChatRenderer(tokenizer, spec.engine.max_model_len, spec.options.too_long)  # has a template?
    _check_head(spec, _num_labels(weights, trust))
    if spec.kind == "process":
        step_tag_id(tokenizer, spec.options.step_tag)
    log.info("starting engine for %s from %s", spec.name, weights)
    engine = VllmPoolingEngine.start(weights, tokenizer_dir, spec.engine)
    renderer = ChatRenderer(tokenizer, engine.max_model_len, spec.options.too_long)
    if isinstance(spec, DiscriminativeSpec):
        return DiscriminativeModel(spec, renderer, engine)
    return ProcessModel(spec, renderer, engine)


def _load_tokenizer(path: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc


def _num_labels(path: Any, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    return int(getattr(config, "num_labels", 1))


def _check_head(spec: ModelSpec, num_labels: int) -> None:
    label = (
        spec.options.score_label if spec.kind == "discriminative" else spec.options.positive_label
    )
    if label >= num_labels:
        field = "score_label" if spec.kind == "discriminative" else "positive_label"
        raise ModelLoadError(
            f"options.{field} is {label} but the model's head has {num_labels} label(s)"
        )
