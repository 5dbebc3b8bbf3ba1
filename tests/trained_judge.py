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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return train_answers(base, out, [(judge_prompt(tokenizer, i), a) for i, a in answers])


def train_answers(
    base: Path, out: Path, answers: list[tuple[str, str]], lr: float = 2e-3, margin: float = 4.0
) -> Path:
    """Fine-tune the causal LM in `base` until greedy decoding continues each rendered prompt
    (chat template applied) with its answer and the EOS, every token ahead of the runner-up by
    `margin` logits (so that engines whose float rounding differs still agree); save to `out`.
    All answers train together, one padded batch per step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = []
    for text, answer in answers:
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))
    width = max(len(prompt) + len(target) for prompt, target in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, target) in enumerate(rows):
        end = len(prompt) + len(target)
        ids[row, :end] = torch.tensor(prompt + target)
        labels[row, len(prompt) : end] = torch.tensor(target)
        mask[row, :end] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, 1201):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 and _memorized(model, ids, mask, labels, margin):
            break
    else:
        raise AssertionError(f"the answers were not memorized in {step} steps")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _memorized(model: Any, ids: Any, mask: Any, labels: Any, margin: float) -> bool:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    top2 = logits[scored].topk(2, dim=-1)
    right = bool((top2.indices[:, 0] == target[scored]).all())
    return right and float((top2.values[:, 0] - top2.values[:, 1]).min()) >= margin
