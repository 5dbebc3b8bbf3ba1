"""The tiny Llamas: a byte-level BPE tokenizer trained on a small built-in corpus, a ChatML-style
chat template with tool calls, and random tiny-rm, tiny-prm and tiny-lm (head_dim 64: the CPU
attention backend refuses smaller heads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

STEP_TAG = "<step>"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", STEP_TAG]

# Tools (agentic judges) are listed in a system turn, as Hermes-style templates do.
TOOLS_PREAMBLE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n'
    "{%- endif %}"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}" + TOOLS_PREAMBLE + "{%- for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'tool' %}<tool_response id={{ m['tool_call_id'] }}>{{ m['content'] }}"
    "</tool_response>"
    "{%- else %}{{ m['content'] }}{% endif %}"
    "{%- for call in m.get('tool_calls') or [] %}\n<tool_call>"
    '{"name": "{{ call["function"]["name"] }}", '
    '"arguments": {{ call["function"]["arguments"] | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant. Answer the question step by step and check your work.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Step 1: compute 12 * 7 = 84. Step 2: add 16 to get 100. The answer is \\boxed{100}.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    '{"name": "search", "arguments": {"query": "capital of France", "top_k": 3}}',
    "The capital of France is Paris. Paris is known for the Eiffel Tower and the Louvre.",
    "Let x be the number of apples. Then 3x + 5 = 20, so x = 5.",
    "I ran the tests: 3 passed, 1 failed. The failure is an off-by-one error in the loop.",
    "<tool_call> </tool_call> <tool_response> </tool_response> user assistant system tool",
]


def build_tokenizer(vocab_size: int = 1024) -> Any:
    tokenizer = bpe_tokenizer(
        SPECIAL_TOKENS, bos="<|bos|>", eos="<|eos|>", pad="<|pad|>", vocab_size=vocab_size
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def bpe_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str | None,
    unk: str | None = None,
    added_tokens: Sequence[str] = (),
    prepend_bos: bool = False,
    corpus: Sequence[str] = (),
    vocab_size: int = 1024,
) -> Any:
    """A byte-level BPE tokenizer trained on the built-in corpus (and `corpus`), whose
    `special_tokens` (ids 0, 1, ... in that order) and `added_tokens` (not special: written in
    text, like Qwen's <think>) are single tokens. `prepend_bos`: encoding with special tokens
    puts `bos` first (the post-processor of Llama 3's and Gemma's tokenizers)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([*_CORPUS, *corpus] * 20, trainer)
    if added_tokens:
        core.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    if prepend_bos:
        assert bos is not None
        bos_id = core.token_to_id(bos)
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, **{k: v for k, v in named.items() if v is not None}
    )


def make_tiny_text_models(
    out: Path, *, hidden_size: int = 128, layers: int = 2, max_positions: int = 4096, seed: int = 0
) -> dict[str, Path]:
    """Write tiny-rm, tiny-prm and tiny-lm under `out`; return their directories."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
    )

    tokenizer = build_tokenizer()
    paths: dict[str, Path] = {}
    for name, cls, labels in (
        ("tiny-rm", LlamaForSequenceClassification, 1),
        ("tiny-prm", LlamaForTokenClassification, 2),
        ("tiny-lm", LlamaForCausalLM, 1),
    ):
        torch.manual_seed(seed)
        options = llama_options(tokenizer, hidden_size, layers, max_positions)
        model = cls(LlamaConfig(**{**options, "num_labels": labels, "dtype": "float32"}))
        paths[name] = out / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def llama_options(
    tokenizer: Any, hidden_size: int, layers: int, max_positions: int
) -> dict[str, Any]:
    """The tiny Llama's configuration (also the language model of tiny-vlm)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=max_positions,
        # Large enough that scores spread over a few units, so comparisons mean something.
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
