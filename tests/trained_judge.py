"""A tiny judge that answers given prompts with given texts: tiny-lm fine-tuned (a few seconds
on CPU) on the exact judge prompts the service renders for some items.

The random tiny LM never writes a valid verdict; this one writes `\\boxed{7}` for some items and
prose without a verdict for others, so one batch holds parseable and unparseable judgements.
The prompts are built by the service's own code (template, transcript, chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmserve.models.generative.prompts import JudgePrompt, split_response, transcript
from rmserve.wire.trajectory import Trajectory


def judge_prompt(tokenizer: Any, item: dict[str, Any], low: int = 1, high: int = 10) -> str:
    """The text LocalBackend sends to the engine for this item (principles_pointwise)."""
    trajectory = Trajectory.model_validate(item)
    context, response = split_response(trajectory.messages)
    prompt = JudgePrompt.load("principles_pointwise").pointwise(
        transcript(context), transcript(response), trajectory.reference, low, high
    )
    text: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text


def train_judge(base: Path, out: Path, answers: list[tuple[dict[str, Any], str]]) -> Path:
    """Fine-tune the causal LM in `base` until it answers each item's prompt with its text
    (greedy decoding), and save it to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    batches = []
    for item, answer in answers:
        prompt = tokenizer(judge_prompt(tokenizer, item), add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        batches.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(400):
        worst = 0.0
        for ids, labels in batches:
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            worst = max(worst, loss.item())
        if worst < 0.002:  # every answer memorized with a wide margin
            break
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
