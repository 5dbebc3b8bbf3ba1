"""The tiny twin of a Qwen2.5-VL judge (R1-Reward, ARM-Thinker): rmserve renders its judge chats
with the family's own template and tokens, and (once vLLM can serve the family here) judges as
transformers does.

What cannot run on this machine is marked xfail(strict) with the exact blocker, so the test
flags the day it lifts: without torchvision, transformers 5.19 cannot build Qwen2.5-VL's
processor, and vLLM 0.32 can load neither its own Qwen2.5-VL module nor the Transformers backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rmserve.models.engine import Completion, Generation, SamplingRequest
from rmserve.models.errors import ModelLoadError
from rmserve.models.generative.agentic import ToolLoop
from rmserve.models.generative.backends import LocalBackend, first_turn
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import EngineOptions
from rmserve.models.tiny.qwen2_5_vl import IMAGE_TOKEN, QWEN2_5_VL_JUDGE, make_qwen2_5_vl_judge_twin
from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.crop import image_to_data_url
from rmserve.sandbox.tools import LocalToolbox
from rmserve.wire.images import JudgeImage

PROMPT = "Rate the answer from 1 to 10 and put the score in \\boxed{}."
GREEDY = SamplingRequest(temperature=0.0, top_p=1.0, max_tokens=16, seed=None)
CROP = '<tool_call>{"name": "crop", "arguments": {"image": 0, "bbox_2d": [0, 0, 500, 500]}}'

# torchvision is missing here, and the only wheels for torch 2.13.0 are CUDA builds.
PROCESSOR_BLOCKER = (
    "transformers 5.19 without torchvision cannot build Qwen2_5_VLProcessor: AutoProcessor "
    "loads its video processor (models/auto/video_processing_auto.py, from_pretrained: "
    "'Qwen2VLVideoProcessor requires the Torchvision library'), and the constructor checks "
    "the video processor against VideoProcessorMixin, which transformers exports only with "
    "torchvision"
)
ENGINE_BLOCKER = (
    "vLLM 0.32 cannot load Qwen2_5_VLForConditionalGeneration without torchvision: "
    "vllm/model_executor/models/qwen2_vl.py line 43 imports smart_resize from "
    "transformers.models.qwen2_vl.image_processing_qwen2_vl, whose line 26 imports "
    "torchvision.transforms.v2 (ModuleNotFoundError; the registry then fails to inspect the "
    "architecture). Its Transformers backend (model_impl='transformers', which EngineOptions "
    "does not expose) gets as far as TransformersMultiModalForCausalLM, then fails loading "
    "the HF processor: " + PROCESSOR_BLOCKER
)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_judge_twin(tmp_path_factory.mktemp("twin") / "qwen2.5-vl-judge")


@pytest.fixture(scope="module")
def tokenizer(twin: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(twin)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A picture with structure in it (stripes and a block), so crops differ from the whole."""
    image = Image.new("RGB", (width, height), (20 * seed % 256, 90, 160))
    for x in range(0, width, 7):
        for y in range(height):
            image.putpixel((x, y), (250, 240 - 3 * seed, 10))
    image.paste((0, 200, 60), (width // 4, height // 3, width // 2, height // 2))
    return image


def judge_image(image: Image.Image) -> JudgeImage:
    return JudgeImage(url=image_to_data_url(image), image=image)


@dataclass
class ScriptedEngine:
    """Stands in for vLLM (which cannot load Qwen2.5-VL here, see ENGINE_BLOCKER): records the
    ids and images LocalBackend sends and answers with the next scripted text."""

    image_token_id: int
    script: list[str]
    max_model_len: int = 4096
    sent: list[tuple[list[int], int]] = field(default_factory=list)

    async def generate(
        self, token_ids: list[int], sampling: SamplingRequest, images: Sequence[Any] = ()
    ) -> Generation:
        self.sent.append((list(token_ids), len(images)))
        text = self.script.pop(0)
        return Generation([Completion(text, 1, "stop")], len(token_ids))

    def shutdown(self) -> None:
        pass


def test_the_twin_keeps_the_family(twin: Path, tokenizer: Any) -> None:
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(twin)
    text, vision = config.text_config, config.vision_config
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 64 and text.num_attention_heads > text.num_key_value_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.rope_parameters["rope_theta"] == 1e6
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision.out_hidden_size == text.hidden_size
    assert vision.fullatt_block_indexes == [vision.depth - 1]
    raw = json.loads((twin / "config.json").read_text())
    assert raw["rope_scaling"] == {"type": "mrope", "mrope_section": [8, 12, 12]}

    for token in QWEN2_5_VL_JUDGE.special_tokens + QWEN2_5_VL_JUDGE.added_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    assert tokenizer.chat_template == QWEN2_5_VL_JUDGE.chat_template
    # An image is a few dozen merged patches: 112 x 168 pixels -> 8 x 12 patches -> 24 tokens.
    processed = AutoImageProcessor.from_pretrained(twin)(picture(168, 112, 1), return_tensors="pt")
    assert processed["image_grid_thw"].tolist() == [[1, 8, 12]]


async def test_a_judge_chat_with_images_renders_as_the_family_does(
    twin: Path, tokenizer: Any
) -> None:
    renderer = ChatRenderer(tokenizer, 4096, "error")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    engine = ScriptedEngine(image_id, ["\\boxed{7}"])
    images = [judge_image(picture(168, 112, 1)), judge_image(picture(112, 112, 2))]
    chat = first_turn(PROMPT, len(images))
    await LocalBackend(renderer, engine).chat(chat, GREEDY, images)

    ((sent, sent_images),) = engine.sent
    # The Hub template's prompt, written out: default system turn, each image a placeholder.
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{vision}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(sent) == expected
    reference = tokenizer.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert sent == list(reference["input_ids"])
    assert sent.count(image_id) == sent_images == 2


async def test_the_crop_loop_writes_tools_as_qwens_templates_do(twin: Path, tokenizer: Any) -> None:
    """Qwen2.5-VL-Instruct's template reads neither `tools` nor `tool_calls`. The agentic loop
    then writes them in Qwen's own (Hermes) format: the tools' signatures in the system turn,
    the judge's call as <tool_call> text, the result as a user turn of <tool_response>, and the
    crop as a new image, rendered by the family's template token for token."""
    renderer = ChatRenderer(tokenizer, 4096, "error")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    engine = ScriptedEngine(image_id, [CROP, "Sharp enough. \\boxed{7}"])
    toolbox = LocalToolbox(SandboxSettings(tools=["crop"]))
    specs = await toolbox.specs()
    loop = ToolLoop(LocalBackend(renderer, engine), toolbox, specs, 2, False, 4000, 10**6)
    result = await loop.run(PROMPT, [judge_image(picture(168, 112, 1))], [], GREEDY, None, 0)
    assert result.text == "Sharp enough. \\boxed{7}"
    (evidence,) = result.evidence
    assert evidence.result.error is None and len(evidence.result.output.images) == 1

    (first, first_images), (second, second_images) = engine.sent
    assert (first_images, second_images) == (1, 2)
    tools = "".join("\n" + json.dumps(spec.openai(), ensure_ascii=False) for spec in specs)
    system = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>{tools}\n</tools>\n\nFor each function call, return a json object with "
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    image = {"type": "image"}
    opening = [
        {"role": "system", "content": system},
        {"role": "user", "content": [image, {"type": "text", "text": PROMPT}]},
    ]
    call = '{"name": "crop", "arguments": {"image": 0, "bbox_2d": [0, 0, 500, 500]}}'
    observation = evidence.result.output.text + "\n[image 2]"
    following = [
        {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        {"role": "user", "content": f"<tool_response>\n{observation}\n</tool_response>"},
        {"role": "user", "content": [image, {"type": "text", "text": "[image 2]"}]},
    ]

    def reference(chat: list[dict[str, Any]]) -> list[int]:
        ids = tokenizer.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        return list(ids)

    assert first == reference(opening)
    assert second == reference([*opening, *following])
    assert second.count(image_id) == 2


@pytest.mark.xfail(strict=True, raises=ImportError, reason=PROCESSOR_BLOCKER)
def test_rendering_equals_the_processors_chat_template(twin: Path, tokenizer: Any) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(twin)
    images = [picture(168, 112, 1), picture(112, 112, 2)]
    chat = first_turn(PROMPT, len(images))
    text = ChatRenderer(tokenizer, 4096, "error").render(chat, generation_prompt=True)
    assert text == processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ours = processor(text=[text], images=images)["input_ids"][0]
    parts = [{"type": "image", "image": image} for image in images]
    theirs = processor.apply_chat_template(
        [{"role": "user", "content": [*parts, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"][0]
    assert list(ours) == list(theirs)


@pytest.mark.xfail(strict=True, raises=ModelLoadError, reason=ENGINE_BLOCKER)
async def test_the_engine_judges_as_transformers_does(twin: Path, tokenizer: Any) -> None:
    import asyncio

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from rmserve.models.engine import VllmGenerateEngine

    options = EngineOptions(
        max_model_len=2048, dtype="float32", kv_cache_gib=0.25, enforce_eager=True
    )
    engine = await asyncio.to_thread(VllmGenerateEngine.start, twin, twin, options, 2)
    try:
        renderer = ChatRenderer(tokenizer, engine.max_model_len, "error")
        images = [picture(168, 112, 1)]
        chat = first_turn(PROMPT, len(images))
        judged = await LocalBackend(renderer, engine).chat(
            chat, GREEDY, [judge_image(i) for i in images]
        )
    finally:
        engine.shutdown()

    processor = AutoProcessor.from_pretrained(twin)
    text = renderer.render(chat, generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(twin, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1] :]
    assert judged.completions[0].text == tokenizer.decode(generated, skip_special_tokens=True)
    assert judged.prompt_tokens == inputs["input_ids"].shape[1]
