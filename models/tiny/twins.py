"""Tiny twins of real reward models: each real model's config.json scaled down (few layers, a small
hidden size, head_dim 64: the CPU attention backend refuses smaller heads), random float32
weights, and a small byte-level BPE tokenizer that carries the family's real chat template
(verbatim, in templates/) and its special tokens as single tokens.

A twin keeps what makes its family different to serve: the architecture class and its
sequence-classification head (num_labels, id2label), rope (theta, Llama 3.1's `llama3`
scaling), sliding-window and soft-capped attention, Gemma 2's query_pre_attn_scalar (not the
head size), grouped-query attention, tied or untied embeddings, the BOS the tokenizer adds, and
the pad/bos/eos ids (mapped to the twin tokenizer's ids of the same tokens). What it does not
keep: the vocabulary and the tokenization of ordinary text (a BPE trained on a small corpus),
the depth and width, and of course the judgement (scores are random functions of the input).
Serving a twin with rmserve and scoring it with transformers on the same tokens tests that
rmserve renders, tokenizes and scores that family the way the model was trained.

    build_twin("twin-skywork-qwen3-rm", out)  ->  out/twin-skywork-qwen3-rm/

Sources (templates: byte-identical copies; configs: the values the hub configs publish):

* Chat templates. huggingface/trl keeps the Hub's templates verbatim, to recognise a model by
  comparing `tokenizer.chat_template` exactly (trl/chat_templates/README.md):
  https://github.com/huggingface/trl/blob/main/trl/chat_templates/qwen3.jinja ("Original Qwen3
  chat template", as in https://huggingface.co/Qwen/Qwen3-8B/blob/main/tokenizer_config.json),
  https://github.com/huggingface/trl/blob/main/trl/chat_templates/llama3_1.jinja
  (meta-llama/Llama-3.1-8B-Instruct) and
  https://github.com/huggingface/trl/blob/main/trl/chat_templates/gemma.jinja (Gemma and
  Gemma 2 `-it`, google/gemma-2-27b-it, which ship the same one; tests/service/chat_templates/
  holds it too). The Skywork reward models keep their base model's tokenizer and template and
  format conversations with `tokenizer.apply_chat_template`:
  https://github.com/SkyworkAI/Skywork-Reward-V2 (README, "Model Usage") and
  https://huggingface.co/Skywork/Skywork-Reward-Gemma-2-27B-v0.2.
* Configs: https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json,
  https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json and
  https://huggingface.co/google/gemma-2-27b-it/blob/main/config.json (the values as copies in
  public code quote them), with the reward models' head: `*ForSequenceClassification` with one
  label (Skywork-Reward-V2 README: `num_labels=1`, the score is `logits[0][0]`). The reward
  models' own pad ids could not be read here: each twin's pad is a token its chat template never
  writes, as it must be (transformers pools the last token that is not pad).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"

# What the catalogue's Bradley-Terry models need: the one label's logit; a conversation longer
# than max_model_len keeps its end.
_RM_OPTIONS: dict[str, Any] = {"too_long": "truncate_left", "score_label": 0}


@dataclass(frozen=True)
class Tok:
    """A token named in a twin's config; `build_twin` writes its id in the twin's tokenizer."""

    text: str


@dataclass(frozen=True)
class Twin:
    name: str
    # The family: its chat template is templates/<family>.jinja.
    family: str
    architecture: str
    # config.json as the real model has it, scaled down; token ids as Tok (vocab_size is the
    # twin tokenizer's, rounded up to `vocab_multiple`).
    config: dict[str, Any]
    chat_template: str
    # Single tokens of the family: special ones first (ids 0, 1, ...), then `added_tokens`
    # (not special: they are written in text, like Qwen3's <think> and <tool_call>).
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    sources: tuple[str, ...]
    # The real model the twin stands for (its hub id), and how rmserve serves it: the kind and
    # options of its entry in examples/registry.catalogue.yaml.
    real_weights: str
    kind: str = "discriminative"
    options: dict[str, Any] = field(default_factory=lambda: dict(_RM_OPTIONS))
    added_tokens: tuple[str, ...] = ()
    unk_token: str | None = None
    # Encoding with special tokens prepends the BOS (Llama 3's and Gemma's tokenizers do).
    prepend_bos: bool = False
    vocab_multiple: int = 1


def _template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text()


def _head(labels: int = 1) -> dict[str, Any]:
    return {
        "num_labels": labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
        "label2id": {f"LABEL_{i}": i for i in range(labels)},
    }


_TRL = "https://github.com/huggingface/trl/blob/main/trl/chat_templates/"

QWEN3_RM = Twin(
    name="twin-skywork-qwen3-rm",
    family="qwen3",
    architecture="Qwen3ForSequenceClassification",
    # Qwen3-8B: 36 layers, hidden 4096 = 32 heads x 128, 8 KV heads (4 queries per KV head),
    # intermediate 3 x hidden; q/k RMSNorm is the architecture's own (Qwen3Attention).
    config={
        "architectures": ["Qwen3ForSequenceClassification"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": Tok("<|endoftext|>"),
        "eos_token_id": Tok("<|im_end|>"),
        "pad_token_id": Tok("<|endoftext|>"),
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 256,
        "intermediate_size": 768,
        "max_position_embeddings": 40960,
        "max_window_layers": 2,  # Qwen3-8B: 36, every layer
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        **_head(),
    },
    chat_template=_template("qwen3"),
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    added_tokens=(
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ),
    bos_token=None,  # Qwen's tokenizer has none, and its template writes none
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    vocab_multiple=128,  # Qwen3 pads its embedding: 151,936 rows for 151,669 tokens
    sources=(
        "https://github.com/SkyworkAI/Skywork-Reward-V2",
        "https://huggingface.co/Skywork/Skywork-Reward-V2-Qwen3-8B",
        "https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json",
        _TRL + "qwen3.jinja",
    ),
    real_weights="Skywork/Skywork-Reward-V2-Qwen3-8B",
)

LLAMA31_RM = Twin(
    name="twin-skywork-llama31-rm",
    family="llama3_1",
    architecture="LlamaForSequenceClassification",
    # Llama-3.1-8B-Instruct: 32 layers, hidden 4096 = 32 x 128, 8 KV heads, intermediate
    # 14336 (3.5 x hidden), rope theta 500000 with the `llama3` frequency scaling (factor 8 from
    # an original 8192 positions to 131072).
    config={
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": Tok("<|begin_of_text|>"),
        "eos_token_id": [Tok("<|end_of_text|>"), Tok("<|eom_id|>"), Tok("<|eot_id|>")],
        # Meta's tokenizer has no pad token; a reward model gets one that is not <|eot_id|>,
        # or transformers would pool the token before the final <|eot_id|>.
        "pad_token_id": Tok("<|finetune_right_pad_id|>"),
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 256,
        "intermediate_size": 896,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        **_head(),
    },
    chat_template=_template("llama3_1"),
    # In Meta's order (ids 128000-128010).
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    prepend_bos=True,
    sources=(
        "https://github.com/SkyworkAI/Skywork-Reward-V2",
        "https://huggingface.co/Skywork/Skywork-Reward-V2-Llama-3.1-8B",
        "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json",
        _TRL + "llama3_1.jinja",
    ),
    real_weights="Skywork/Skywork-Reward-V2-Llama-3.1-8B",
)

GEMMA2_RM = Twin(
    name="twin-skywork-gemma2-rm",
    family="gemma2",
    architecture="Gemma2ForSequenceClassification",
    # gemma-2-27b: 46 layers alternating sliding (4096 tokens) and global attention over 8192
    # positions; hidden 4608 but 32 heads x 128 (so query_pre_attn_scalar 144 = hidden / heads,
    # not the head size), 16 KV heads, intermediate 8 x hidden, attention logits soft-capped at
    # 50 and final logits at 30, tied embeddings. Scaled: 4 heads x 64 in a hidden of 288
    # (scalar 72), the window 64 tokens of 512 positions.
    config={
        "architectures": ["Gemma2ForSequenceClassification"],
        "model_type": "gemma2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": Tok("<bos>"),
        "cache_implementation": "hybrid",
        "eos_token_id": Tok("<eos>"),
        "final_logit_softcapping": 30.0,
        "head_dim": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 288,
        "intermediate_size": 2304,
        "max_position_embeddings": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": Tok("<pad>"),
        "query_pre_attn_scalar": 72,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 64,
        "tie_word_embeddings": True,
        "use_cache": True,
        **_head(),
    },
    chat_template=_template("gemma2"),
    # <pad> 0, <eos> 1, <bos> 2, <unk> 3 as in Gemma's vocabulary.
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    unk_token="<unk>",
    prepend_bos=True,
    sources=(
        "https://huggingface.co/Skywork/Skywork-Reward-Gemma-2-27B-v0.2",
        "https://huggingface.co/google/gemma-2-27b-it/blob/main/config.json",
        _TRL + "gemma.jinja",
    ),
    real_weights="Skywork/Skywork-Reward-Gemma-2-27B-v0.2",
)


def _r1(name: str) -> str:
    """A DeepSeek special token: <NAME> between two U+FF5C bars, spaces written as U+2581."""
    return "<\uff5c" + name.replace(" ", "\u2581") + "\uff5c>"


RM_R1_JUDGE = Twin(
    name="twin-rm-r1-deepseek-qwen-judge",
    family="deepseek_r1_distill",
    architecture="Qwen2ForCausalLM",
    # RM-R1-DeepSeek-Distilled-Qwen-7B is DeepSeek-R1-Distill-Qwen-7B fine-tuned (distillation,
    # then RL) into a pairwise judge: Qwen2.5-Math-7B's architecture (28 layers, hidden 3584 =
    # 28 heads x 128, 4 KV heads: 7 queries per KV head, intermediate 18944 = 5.3 x hidden, rope
    # theta 10000, q/k/v biases), untied embeddings. The config's bos_token_id is the EOS id
    # (151643) as published; the tokenizer's BOS is begin-of-sentence. Scaled: 4 heads x 64,
    # 1 KV head.
    config={
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": Tok(_r1("end of sentence")),
        "eos_token_id": Tok(_r1("end of sentence")),
        "hidden_act": "silu",
        "hidden_size": 256,
        "intermediate_size": 1344,
        "max_position_embeddings": 131072,
        "max_window_layers": 2,  # 28: every layer
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    chat_template=_template("deepseek_r1_distill"),
    special_tokens=(
        _r1("end of sentence"),
        _r1("User"),
        _r1("Assistant"),
        _r1("begin of sentence"),
        *(
            _r1(f"tool {part}")
            for part in (
                "calls begin",
                "calls end",
                "call begin",
                "call end",
                "outputs begin",
                "outputs end",
                "output begin",
                "output end",
                "sep",
            )
        ),
    ),
    # Written in text and kept in decoded judgements (not special), as in DeepSeek's vocabulary.
    added_tokens=("<think>", "</think>"),
    bos_token=_r1("begin of sentence"),
    eos_token=_r1("end of sentence"),
    pad_token=_r1("end of sentence"),
    vocab_multiple=128,  # 152,064 embedding rows for 151,665 tokens
    sources=(
        "https://github.com/RM-R1-UIUC/RM-R1 (README; eval/reward-bench/rewardbench/generative.py)",
        "https://huggingface.co/gaotang/RM-R1-DeepSeek-Distilled-Qwen-7B",
        "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B/blob/main/config.json",
        "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B/blob/main/"
        "tokenizer_config.json (the chat template, as of its <think>\\n update)",
    ),
    real_weights="gaotang/RM-R1-DeepSeek-Distilled-Qwen-7B",
    kind="generative",
    options={
        "mode": "pairwise",
        "template": "rm_r1_reasoning",
        "thinking": True,
    },
)

# Discriminative twins (a sequence-classification head) and judge twins (causal LMs).
RM_TWINS: dict[str, Twin] = {twin.name: twin for twin in (QWEN3_RM, LLAMA31_RM, GEMMA2_RM)}
JUDGE_TWINS: dict[str, Twin] = {RM_R1_JUDGE.name: RM_R1_JUDGE}
TWINS: dict[str, Twin] = {**RM_TWINS, **JUDGE_TWINS}

# Large enough that scores spread over a few units, so comparisons mean something.
_INITIALIZER_RANGE = 0.2


def build_tokenizer(twin: Twin, corpus: tuple[str, ...] = ()) -> Any:
    """The twin's tokenizer; its BPE also learns the words of `corpus` (e.g. a judge template,
    so that a judge prompt is few tokens, as in the real vocabulary)."""
    from rmserve.models.tiny.llama import bpe_tokenizer

    tokenizer = bpe_tokenizer(
        twin.special_tokens,
        bos=twin.bos_token,
        eos=twin.eos_token,
        pad=twin.pad_token,
        unk=twin.unk_token,
        added_tokens=twin.added_tokens,
        prepend_bos=twin.prepend_bos,
        # The template's own words (roles, headers) become few tokens, as in the real vocabulary.
        corpus=[twin.chat_template, *corpus],
    )
    tokenizer.chat_template = twin.chat_template
    return tokenizer


def twin_config(twin: Twin, tokenizer: Any) -> dict[str, Any]:
    """The twin's config.json: token names resolved to the tokenizer's ids."""

    def resolve(value: Any) -> Any:
        if isinstance(value, Tok):
            token_id = tokenizer.convert_tokens_to_ids(value.text)
            assert isinstance(token_id, int) and token_id != tokenizer.unk_token_id, value
            return token_id
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    vocab = -(-len(tokenizer) // twin.vocab_multiple) * twin.vocab_multiple
    config = {k: resolve(v) for k, v in twin.config.items()}
    return {
        **config,
        "vocab_size": vocab,
        "initializer_range": _INITIALIZER_RANGE,
        "torch_dtype": "float32",
    }


def build_twin(name: str, out: Path, seed: int = 0) -> Path:
    """Write the twin `name` (config.json, float32 safetensors, tokenizer with the family's chat
    template) into out/<name>; return that directory."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GenerationConfig,
    )

    twin = TWINS[name]
    path = out / name
    tokenizer = build_tokenizer(twin)
    config_dict = twin_config(twin, tokenizer)
    settings = {k: v for k, v in config_dict.items() if k not in ("model_type", "torch_dtype")}
    config = AutoConfig.for_model(config_dict["model_type"], **settings)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if twin.kind == "generative" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    if type(model).__name__ != twin.architecture:
        raise AssertionError(f"{name}: built {type(model).__name__}, not {twin.architecture}")
    if twin.kind == "generative":  # where generation stops: the tokenizer's EOS
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # config.json in the real model's own layout (transformers reads it back into the same
    # configuration), so the engine and the reference read what a real checkpoint holds.
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return path
