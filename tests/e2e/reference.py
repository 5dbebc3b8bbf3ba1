"""Independent reference scores computed with transformers (not vLLM, not rmserve's code)."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)


@cache
def tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


@cache
def _model(path: Path, token_level: bool) -> Any:
    cls = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def render(path: Path, hf_messages: list[dict[str, Any]]) -> str:
    text: str = tokenizer(path).apply_chat_template(hf_messages, tokenize=False)
    return text


def token_ids(path: Path, text: str) -> list[int]:
    ids: list[int] = tokenizer(path)(text, add_special_tokens=False)["input_ids"]
    return ids


@torch.no_grad()
def sequence_logits(path: Path, ids: list[int]) -> list[float]:
    logits = _model(path, False)(torch.tensor([ids])).logits[0]
    return [float(x) for x in logits]


@torch.no_grad()
def token_logits(path: Path, ids: list[int]) -> list[list[float]]:
    rows = _model(path, True)(torch.tensor([ids])).logits[0]
    return [[float(x) for x in row] for row in rows]


def softmax_label(row: list[float], label: int) -> float:
    probs = torch.softmax(torch.tensor(row, dtype=torch.float64), dim=0)
    return float(probs[label])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))
