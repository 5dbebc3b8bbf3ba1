"""Tiny twins of generative judges: the causal LM a real judge is, scaled down, with the chat
template and special tokens of its family. Their judgements are random text until a test
fine-tunes them (tests/trained_judge.py) to write given answers.

DeepSeek-GRM-27B (Liu et al. 2025, "Inference-Time Scaling for Generalist Reward Modeling",
https://arxiv.org/abs/2504.02495) is Gemma-2-27B fine-tuned with SPCT: "DeepSeek-GRM-27B is
based on Gemma-2-27B" (model card, https://huggingface.co/BBQGOD/DeepSeek-GRM-27B). It keeps
the base model's architecture (`Gemma2ForCausalLM`), configuration, tokenizer and chat template,
so its twin is the Gemma 2 twin of tiny/twins.py (GEMMA2_RM: gemma-2-27b's config scaled down,
Gemma's chat template verbatim, <bos>/<eos>/<pad> and the turn markers as single tokens)
without the classification head:

- architecture `Gemma2ForCausalLM` (tied embeddings as in Gemma 2: the LM head is the embedding);
- 1024 positions instead of the reward twin's 512, so that a judge prompt of two responses and
  its judgement fit (gemma-2-27b has 8192); the sliding window stays 64 tokens, so every judge
  prompt crosses it;
- the tokenizer is trained on Gemma's template and the built-in judge template `deepseek_grm`
  as well, so that the judge prompt's words are few tokens, as in Gemma's 256k vocabulary.

Gemma's template has no system role: the judge prompt is the single user turn.

    make_grm_judge_twin(out)  ->  out  (config.json, float32 safetensors, tokenizer)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmserve.models.generative.prompts import template_path
from rmserve.models.tiny.twins import GEMMA2_RM, build_tokenizer, twin_config

GRM_JUDGE_NAME = "twin-deepseek-grm-27b"
# The real model the twin stands for.
GRM_JUDGE_WEIGHTS = "BBQGOD/DeepSeek-GRM-27B"
GRM_JUDGE_ARCHITECTURE = "Gemma2ForCausalLM"
GRM_JUDGE_TEMPLATE = "deepseek_grm"
GRM_JUDGE_SOURCES = (
    "https://arxiv.org/abs/2504.02495",
    "https://huggingface.co/BBQGOD/DeepSeek-GRM-27B",
    *GEMMA2_RM.sources[1:],  # gemma-2-27b-it's config.json, Gemma's chat template (trl copy)
)
_MAX_POSITIONS = 1024
# Gemma 2's published initializer range; a judge twin is fine-tuned, not read as random scores.
_INITIALIZER_RANGE = 0.02
_HEAD_KEYS = ("num_labels", "id2label", "label2id")


def grm_judge_tokenizer() -> Any:
    """GEMMA2_RM's tokenizer (special tokens, BOS added on encoding, chat template), its BPE
    trained on the judge template too."""
    return build_tokenizer(GEMMA2_RM, (template_path(GRM_JUDGE_TEMPLATE).read_text(),))


def grm_judge_config(tokenizer: Any) -> dict[str, Any]:
    """config.json of the twin: GEMMA2_RM's, as a causal LM (no head), token ids resolved."""
    config = {k: v for k, v in twin_config(GEMMA2_RM, tokenizer).items() if k not in _HEAD_KEYS}
    return {
        **config,
        "architectures": [GRM_JUDGE_ARCHITECTURE],
        "max_position_embeddings": _MAX_POSITIONS,
        "initializer_range": _INITIALIZER_RANGE,
    }


def make_grm_judge_twin(out: Path, seed: int = 0) -> Path:
    """Write the DeepSeek-GRM-27B twin (random float32 weights) into `out`; return `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = grm_judge_tokenizer()
    config_dict = grm_judge_config(tokenizer)
    settings = {k: v for k, v in config_dict.items() if k not in ("model_type", "torch_dtype")}
    config = AutoConfig.for_model(config_dict["model_type"], **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    if type(model).__name__ != GRM_JUDGE_ARCHITECTURE:
        raise AssertionError(f"built {type(model).__name__}, not {GRM_JUDGE_ARCHITECTURE}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # config.json in the real model's layout, as tiny/twins.py writes it.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return out
