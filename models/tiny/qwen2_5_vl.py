"""The tiny twin of a multimodal judge on Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct, the base of
R1-Reward and ARM-Thinker): its config.json scaled down, random float32 weights, a small
byte-level BPE tokenizer with Qwen's special tokens and the real chat template (verbatim, in
templates/qwen2_5_vl.jinja), and Qwen2-VL's image processor in its PIL flavour (no torchvision)
with a small pixel budget, so an image is a few dozen patches.

    make_qwen2_5_vl_judge_twin(out)  ->  out/ (config, weights, tokenizer, processor)

What the twin keeps of the family: the architecture (Qwen2_5_VLForConditionalGeneration: a ViT
with 2D rope, window attention but in `fullatt_block_indexes`, RMSNorm and a SwiGLU MLP, a 2x2
patch merger into the language model; a Qwen2 decoder with q/k/v biases, grouped-query attention
and multimodal rope, its `mrope_section` splitting head_dim/2 rotary frequencies between time,
height and width in the real 2:3:3 proportion), the vision geometry (14-pixel patches, 2 frames
per temporal patch, 2x2 merging, window_size 56 pixels: 2x2 merged tokens per window, as the real
112 is 4x4 at the real resolution), the image normalisation (CLIP's mean and std), the special
tokens as single tokens with their roles (eos <|im_end|>, pad <|endoftext|>, no BOS) and the
placeholder ids in config.json. What it does not keep: the vocabulary, depth and width, the
pixel budget (min/max pixels) and the judgement.

The chat template renders `{"type": "image"}` parts as <|vision_start|><|image_pad|>
<|vision_end|>; the processor (and vLLM) expand <|image_pad|> into one token per merged patch.
It reads neither `tools` nor `tool_calls`: Qwen2.5-VL-Instruct's template has no tool support,
so a tool-calling judge on it (ARM-Thinker) describes its tools in its own prompt; rmserve's
ChatRenderer refuses assistant turns with `tool_calls` under it (`unsupported_content`).

Sources:

* config.json: https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json (28
  layers, hidden 3584 = 28 heads x 128, 4 KV heads, intermediate 18944, rope theta 1e6,
  `mrope_section` [16, 24, 24]; vision depth 32, hidden 1280 = 16 heads x 80, intermediate 3420,
  window_size 112, fullatt_block_indexes [7, 15, 23, 31], out_hidden_size 3584, vocab 152064),
  the values as copies in public code quote them.
* preprocessor_config.json (Qwen2VLImageProcessor, patch 14, merge 2, temporal patch 2, CLIP
  mean/std, min_pixels 3136) and chat_template.json:
  https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/tree/main. The template is the one
  Qwen2-VL-Instruct ships too; transformers quotes it verbatim in
  tests/models/qwen2_vl/test_processing_qwen2_vl.py (`prepare_processor_dict`, before the
  tests moved to a hub processor), and R1-style trainers for Qwen2.5-VL set it the same way.
* Token ids and roles: tokenizer_config.json of the same repository (151643 <|endoftext|> ...
  151656 <|video_pad|> special, then <tool_call> and </tool_call> as ordinary added tokens).
* R1-Reward: https://huggingface.co/yifanzhang114/R1-Reward (Qwen2.5-VL-7B-Instruct, its
  processor and template); ARM-Thinker: https://github.com/InternLM/ARM-Thinker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmserve.models.tiny.twins import TEMPLATES, Tok, Twin, build_tokenizer, twin_config

IMAGE_TOKEN = "<|image_pad|>"
PATCH_SIZE = 14
MERGE_SIZE = 2
# Pixels per merged token: what the processor's pixel budget counts in.
MERGED_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2
# At most 48 merged tokens (192 patches) an image; at least 4 (the real min_pixels, 56 x 56).
MIN_PIXELS = 4 * MERGED_PIXELS
MAX_PIXELS = 48 * MERGED_PIXELS
# CLIP's normalisation, as Qwen2-VL's processor uses it.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

QWEN2_5_VL_JUDGE = Twin(
    name="twin-qwen2.5-vl-judge",
    family="qwen2_5_vl",
    architecture="Qwen2_5_VLForConditionalGeneration",
    config={
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": Tok("<|endoftext|>"),
        "eos_token_id": Tok("<|im_end|>"),
        "pad_token_id": Tok("<|endoftext|>"),
        "vision_start_token_id": Tok("<|vision_start|>"),
        "vision_end_token_id": Tok("<|vision_end|>"),
        "vision_token_id": Tok("<|vision_pad|>"),
        "image_token_id": Tok(IMAGE_TOKEN),
        "video_token_id": Tok("<|video_pad|>"),
        "hidden_act": "silu",
        # 4 heads x 64 (head_dim is hidden / heads in Qwen2, as in the real 3584 / 28), one KV
        # head for the four (the real model: 7 per KV head); intermediate ~5.3 x hidden.
        "hidden_size": 256,
        "intermediate_size": 1344,
        "max_position_embeddings": 128000,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        # [16, 24, 24] of head_dim/2 = 64 frequencies, scaled to 32.
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            # 2 heads x 64 (the real: 16 x 80); intermediate ~2.7 x hidden, as 3420 / 1280.
            "hidden_size": 128,
            "intermediate_size": 342,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 256,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "spatial_patch_size": PATCH_SIZE,
            "temporal_patch_size": 2,
            "window_size": 56,
            # The real model's last block of every eight attends globally: here the last of two.
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    },
    chat_template=(TEMPLATES / "qwen2_5_vl.jinja").read_text(),
    # In Qwen's order (ids 151643-151656).
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        IMAGE_TOKEN,
        "<|video_pad|>",
    ),
    added_tokens=("<tool_call>", "</tool_call>"),
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    vocab_multiple=128,  # 152064 embedding rows for 151665 tokens
    sources=(
        "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct",
        "https://huggingface.co/yifanzhang114/R1-Reward",
        "https://github.com/InternLM/ARM-Thinker",
    ),
    real_weights="Qwen/Qwen2.5-VL-7B-Instruct",
    kind="generative",
    options={"max_images": 4, "tools": ["crop"]},
)


def image_processor() -> Any:
    """Qwen2-VL's image processor (the PIL backend: no torchvision) with the twin's budget."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )


def make_qwen2_5_vl_judge_twin(out: Path, seed: int = 0) -> Path:
    """Write the Qwen2.5-VL judge twin into `out` (created if missing); return `out`."""
    import copy
    import json

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    twin = QWEN2_5_VL_JUDGE
    tokenizer = build_tokenizer(twin)
    config_dict = twin_config(twin, tokenizer)
    # A copy: transformers rewrites the rope dict it is given in place.
    settings = {k: v for k, v in config_dict.items() if k not in ("model_type", "torch_dtype")}
    config = AutoConfig.for_model(config_dict["model_type"], **copy.deepcopy(settings))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _save_processor(out)
    # config.json in the real model's own layout (transformers reads it back into the same
    # configuration), so the engine and the reference read what a real checkpoint holds.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return out


def _save_processor(out: Path) -> None:
    """The processor's files as the Hub repository has them: preprocessor_config.json (the
    image processor, `processor_class` Qwen2_5_VLProcessor) and the chat template. Written
    from the image processor alone: transformers cannot build a Qwen2_5_VLProcessor without
    torchvision (it checks the class of its video processor, which needs torchvision)."""
    import json

    processor = image_processor()
    processor.save_pretrained(out)
    config_path = out / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor"
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(QWEN2_5_VL_JUDGE.chat_template)
