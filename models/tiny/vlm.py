"""Generate a tiny random vision-language model, saved like a real one, so multimodal paths can be
tested and benchmarked without a model hub. Its answers are random text, not descriptions.

    make_tiny_vlm(DIR)  ->  DIR with config, random weights, tokenizer, processor, chat template

Architecture: Idefics3 (SmolVLM's): a SigLIP-style vision tower, a pixel-shuffle connector and
a Llama language model (head_dim 64, as in tiny/llama.py, with its byte-level BPE tokenizer and
ChatML). Idefics3 is chosen because vLLM's LLaVA / Qwen2-VL / Gemma3 modules import torchvision,
which vLLM's CPU install here lacks; Idefics3's PIL image processor needs none.

Each image is resized so its longest edge is RESIZE_EDGE, cut into TILE_EDGE tiles (plus one
downscaled global view) and every tile becomes TOKENS_PER_TILE `<image>` tokens, wrapped in
`<fake_token_around_image>`, `<row_R_col_C>` and `<global-img>` tokens. The chat template renders
OpenAI-style content lists: `{"type": "image"}` (or "image_url") parts become one `<image>`
placeholder, which the processor (or vLLM) expands; text parts render as their text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmserve.models.tiny.llama import TOOLS_PREAMBLE

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
TILE_EDGE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
RESIZE_EDGE = 4 * TILE_EDGE
# Patches per tile, merged SCALE_FACTOR**2 at a time by the connector's pixel shuffle.
TOKENS_PER_TILE = (TILE_EDGE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

CHAT_TEMPLATE = (
    "{{ bos_token }}" + TOOLS_PREAMBLE + "{%- for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    # A plain loop over m['content'] (no filter) lets vLLM detect the "openai" content format.
    "{%- elif m['content'] %}{%- for part in m['content'] %}"
    "{%- if part['type'] in ('image', 'image_url') %}<image>"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{%- endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _image_tokens() -> list[str]:
    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    return [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE_TOKEN, *rows_cols]


def make_tiny_vlm(
    out: Path, *, hidden_size: int = 128, layers: int = 2, max_positions: int = 4096, seed: int = 0
) -> Path:
    """Write a tiny random Idefics3 to `out` (created if missing) and return `out`."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    from rmserve.models.tiny.llama import build_tokenizer, llama_options

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": _image_tokens()})
    tokenizer.chat_template = CHAT_TEMPLATE
    special: dict[str, Any] = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    text_config = LlamaConfig(**llama_options(tokenizer, hidden_size, layers, max_positions))
    vision_config = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=TILE_EDGE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        **special,
    )
    config.dtype = "float32"

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": RESIZE_EDGE},
        do_image_splitting=True,
        max_image_size={"longest_edge": TILE_EDGE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
