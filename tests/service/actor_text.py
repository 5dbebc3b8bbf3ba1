"""What OpenRLHF sends as `query` and `prompts`, built the way OpenRLHF builds them, with real chat
templates of actor models.

The templates in chat_templates/ are verbatim copies of the ones TRL 1.16.0 ships to recognize
models by their `tokenizer.chat_template` (an exact comparison, so they are the Hub's text):
huggingface/trl `trl/chat_templates/qwen2_5.jinja` ("Original Qwen2.5 chat template",
Qwen/Qwen2.5-*-Instruct), `llama3.jinja` ("Original Llama 3 chat template",
meta-llama/Meta-Llama-3-*-Instruct) and `gemma.jinja` (Gemma and Gemma 2 `-it`, which ship the
same one). The Qwen2.5 text also matches the copies quoted in public code found by searching for
"You are Qwen, created by Alibaba Cloud" (e.g. a Swift llama.cpp demo's Qwen2.5-1.5B-Instruct
template).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rmserve.models.tiny.llama import build_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Actor:
    """An actor model's chat template and the special tokens it writes."""

    template: str
    bos: str | None
    eos: str
    specials: tuple[str, ...]


QWEN25 = Actor("qwen2.5-instruct.jinja", None, "<|im_end|>", ("<|endoftext|>",))
LLAMA3 = Actor(
    "llama-3-instruct.jinja",
    "<|begin_of_text|>",
    "<|eot_id|>",
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
GEMMA = Actor(
    "gemma-2-it.jinja", "<bos>", "<eos>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
)


@cache
def actor_tokenizer(actor: Actor) -> Any:
    """The tiny byte-level BPE tokenizer with the actor's special tokens and chat template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(actor.specials)})
    if actor.bos is not None:
        tokenizer.bos_token = actor.bos
    tokenizer.eos_token = actor.eos
    tokenizer.chat_template = (TEMPLATES / actor.template).read_text()
    return tokenizer


@dataclass(frozen=True)
class Sample:
    query: str
    prompt: str
    prompt_tokens: int


def openrlhf_sample(
    actor: Actor,
    conversation: list[dict[str, str]],
    response: str,
    *,
    keep_prompt_tokens: int | None = None,
    eos: bool = True,
    after_eos: str = "",
) -> Sample:
    """One sample as OpenRLHF v0.11.0 (3c3be62) sends it: the prompt rendered with the actor's
    template (`--data.apply_chat_template`, openrlhf/datasets/prompts_dataset.py), the generated
    response ids ending in EOS unless cut at max tokens, and (openrlhf/utils/agent.py:202-283)
    `query = tokenizer.decode(prompt_token_ids[-max_prompt_length:] + action_token_ids,
    skip_special_tokens=False)`; `prompts` is the untruncated prompt text."""
    tokenizer = actor_tokenizer(actor)
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    action_ids: list[int] = tokenizer(response, add_special_tokens=False)["input_ids"]
    if eos:
        action_ids.append(tokenizer.convert_tokens_to_ids(actor.eos))
    if after_eos:
        action_ids += tokenizer(after_eos, add_special_tokens=False)["input_ids"]
    kept = prompt_ids[-keep_prompt_tokens:] if keep_prompt_tokens else prompt_ids
    query = tokenizer.decode(kept + action_ids, skip_special_tokens=False)
    return Sample(query=query, prompt=prompt, prompt_tokens=len(prompt_ids))
