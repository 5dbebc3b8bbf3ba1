"""Tiny twins of Qwen's math reward models, whose heads are not transformers classes:

- Qwen2.5-Math-PRM-7B, architecture `Qwen2ForProcessRewardModel`: a token classifier with two
  labels, read at each `<extra_0>` step tag (softmax, label 1 is "correct");
- Qwen2.5-Math-RM-72B, architecture `Qwen2ForRewardModel`: one output per token, the score being
  the last token's.

Both are a Qwen2 decoder (transformers' `Qwen2Model`, parameters `model.*`) and the head
`score = Sequential(Linear(h, h), ReLU(), Linear(h, num_labels))` (parameters `score.0.*` and
`score.2.*`), defined in the repositories' own remote code and ported natively by vLLM:

- https://huggingface.co/Qwen/Qwen2.5-Math-PRM-7B/blob/main/modeling_qwen2_rm.py
- https://huggingface.co/Qwen/Qwen2.5-Math-RM-72B/blob/main/modeling_qwen2_rm.py
- https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/models/qwen2_rm.py
  ("Adapted from" the RM-72B file; `Qwen2RewardBaseModel.score`)

The twins keep the published configs (architectures, num_labels, rope_theta, rms_norm_eps,
max_position_embeddings, sliding-window settings, tie_word_embeddings, the `auto_map` to the
remote code) and scale the sizes down: 2 layers, hidden size 128, 2 query heads and 1 KV head of
head_dim 64 (the CPU attention backend refuses smaller heads; grouped-query attention as in the
real models). The configs they copy:

- https://huggingface.co/Qwen/Qwen2.5-Math-PRM-7B/blob/main/config.json
- https://huggingface.co/Qwen/Qwen2.5-Math-RM-72B/blob/main/config.json

No remote code is shipped with the twins: `model_type` is `qwen2`, so transformers and vLLM read
the config without it (serve them with `trust_remote_code: false`, as the real models can be).

The tokenizer is a `Qwen2Tokenizer` (Qwen's NFC normalizer, pre-tokenizer regex and byte-level
BPE) trained on a small built-in corpus, with Qwen's special tokens `<|endoftext|>` (pad, and
the config's bos), `<|im_start|>`, `<|im_end|>` (eos) and the step tag `<extra_0>`, each a single
token, and the Qwen2.5-Math chat template (templates/qwen2_5_math.jinja, unmodified: the
"chat_template" of the Qwen2.5-Math tokenizers' tokenizer_config.json, e.g.
https://huggingface.co/Qwen/Qwen2.5-Math-7B-Instruct/blob/main/tokenizer_config.json, copied as
printed from Qwen/Qwen2.5-Math-1.5B's tokenizer: the Qwen2.5 template with Qwen2.5-Math's default
system prompt; both reward models' model cards render with tokenizer.apply_chat_template,
https://huggingface.co/Qwen/Qwen2.5-Math-PRM-7B and
https://huggingface.co/Qwen/Qwen2.5-Math-RM-72B). Weights are random,
float32, and every parameter is random (norm weights and biases too), so that a parameter an
engine failed to load would show in its scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STEP_TAG = "<extra_0>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", STEP_TAG]
TEMPLATE = Path(__file__).parent / "templates" / "qwen2_5_math.jinja"

PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"
RM_ARCHITECTURE = "Qwen2ForRewardModel"

# The published config.json files, verbatim (URLs in the module docstring).
_PUBLISHED: dict[str, dict[str, Any]] = {
    PRM_ARCHITECTURE: {
        "architectures": [PRM_ARCHITECTURE],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 4096,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    RM_ARCHITECTURE: {
        "architectures": [RM_ARCHITECTURE],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForRewardModel",
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 29568,
        "max_position_embeddings": 4096,
        "max_window_layers": 70,
        "model_type": "qwen2",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
}
# Neither file sets num_labels: the heads' remote code and vLLM fix them (vLLM's qwen2_rm.py sets
# hf_config.num_labels to 2 for the PRM and 1 for the RM); the twins write them out.
_NUM_LABELS = {PRM_ARCHITECTURE: 2, RM_ARCHITECTURE: 1}

# The scaled-down sizes: 2 query heads and 1 KV head of 64 (the real models group 7 or 8 query
# heads per KV head).
_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
# Standard deviation of the random parameters: large enough that scores spread over a few units,
# so that comparisons mean something; smaller for the head's output layer, so that the PRM's step
# probabilities spread over (0, 1) rather than sit at its ends.
_STD = 0.2
_OUTPUT_STD = 0.08
# The real vocabularies are padded past the tokenizer (152064 rows for 151665 tokens).
_VOCAB_MULTIPLE = 128

_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let x be the number of apples. Then 3x + 5 = 20, so 3x = 15 and x = 5.",
    "First, compute 12 * 7 = 84. Then add 16 to get 100. The answer is \\boxed{100}.",
    "On Saturday they took back one third of the 18 flamingos, so 18 / 3 = 6 were taken.",
    "The area of the rectangle is 4 \\times 8 = 32 square feet, and each piece has area 8.",
    "Therefore, the difference is 36 - 6 = 30. The final answer is \\boxed{30}.",
    "We substitute y = 2 into the equation: 2^2 + 3 \\cdot 2 - 1 = 9.",
    "The probability is \\frac{1}{6} + \\frac{1}{6} = \\frac{1}{3}, since the events are disjoint.",
    "system user assistant tool <tool_call> </tool_call> <tool_response> </tool_response>",
    '{"name": "calculator", "arguments": {"expression": "12 * 7"}}',
]


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """A `Qwen2Tokenizer` with Qwen's pipeline and special tokens, trained on a tiny corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    # The same normalizer, pre-tokenizer and decoder as Qwen2Tokenizer, for training.
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_CORPUS * 20, trainer)
    trained = json.loads(core.to_str())["model"]
    # Pairs, as tokenizers' BPE takes them (its JSON writes "a b" or ["a", "b"]).
    merges: Any = [tuple(m.split(" ") if isinstance(m, str) else m) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        # Qwen2.5-Math's tokenizer_config.json: no bos token, eos <|im_end|>, pad <|endoftext|>.
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", STEP_TAG],
    )
    tokenizer.chat_template = TEMPLATE.read_text()
    return tokenizer


def make_qwen2_prm_twin(out: Path, seed: int = 0) -> Path:
    """Write the Qwen2.5-Math-PRM-7B twin (Qwen2ForProcessRewardModel) to `out`; return `out`."""
    return _make_twin(out, PRM_ARCHITECTURE, seed)


def make_qwen2_rm_twin(out: Path, seed: int = 0) -> Path:
    """Write the Qwen2.5-Math-RM-72B twin (Qwen2ForRewardModel) to `out`; return `out`."""
    return _make_twin(out, RM_ARCHITECTURE, seed)


def twin_config(architecture: str, tokenizer: Any) -> dict[str, Any]:
    """The twin's config.json: the published one with the sizes scaled down, the token ids
    mapped to the twin tokenizer, num_labels written out and float32 weights."""
    vocab_size = -(-len(tokenizer) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    published = {k: v for k, v in _PUBLISHED[architecture].items() if k != "transformers_version"}
    return {
        **published,
        **_SIZES,
        "num_labels": _NUM_LABELS[architecture],
        "vocab_size": vocab_size,
        "initializer_range": _STD,
        # bos 151643 is <|endoftext|>, eos 151645 <|im_end|>; the pad token of Qwen's
        # tokenizer_config.json (<|endoftext|>), which the configs leave out, is written too.
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }


def _make_twin(out: Path, architecture: str, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = build_tokenizer()
    config_json = twin_config(architecture, tokenizer)
    config = Qwen2Config.from_dict({k: v for k, v in config_json.items() if k != "auto_map"})
    # transformers' Qwen2Model gives the decoder's parameter names (model.*, as vLLM's
    # Qwen2Model loads them); the head is the remote code's Sequential (score.0.*, score.2.*).
    body = Qwen2Model(config)
    hidden = config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, config_json["num_labels"]),
    )
    shapes = {f"model.{name}": value.shape for name, value in body.state_dict().items()}
    shapes |= {f"score.{name}": value.shape for name, value in head.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {name: _randomized(name, shape, generator) for name, shape in shapes.items()}

    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out


def _randomized(name: str, shape: Any, generator: Any) -> Any:
    """A random float32 value for parameter `name` (norm weights around 1, the rest around 0)."""
    import torch

    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * noise).contiguous()
    return ((_OUTPUT_STD if name.startswith("score.2.") else _STD) * noise).contiguous()
