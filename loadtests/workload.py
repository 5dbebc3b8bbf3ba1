"""The trajectories a load test sends: the examples of examples/*.jsonl, lengthened.

Each item is one of the example trajectories (math with a `reference`, an agent with tool calls,
a chat) whose final assistant answer gets 0 to `max_extra_steps` more reasoning paragraphs before
its last one (the boxed answer stays last; paragraphs are "\n\n"-separated, so a process model
sees that many more steps). Most items get few paragraphs and some many, so request sizes vary
as in a real rollout batch. Every item has a distinct `id`. What an item needs depends on the
kind of model it goes to: a math or similarity verifier compares with the item's `reference`, so
it only gets examples that have one.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trajectories.jsonl"

# Verifier kinds that compare the response with the item's `reference`.
NEEDS_REFERENCE = frozenset({"math", "similarity"})

_STEPS = [
    "First I restate the problem in my own words, so that no condition is lost on the way.",
    "Let me check the units: every quantity above is in the same unit, so no conversion is "
    "needed before combining them.",
    "I could also solve this by working backwards from the result and checking that each "
    "intermediate value is consistent with the question.",
    "The tool output agrees with the estimate I made by hand, which makes a transcription "
    "error unlikely.",
    "Before answering I re-read the question: it asks for the total, not for the value of a "
    "single part.",
    "A quick sanity check with smaller numbers gives the expected pattern, so the method is sound.",
    "Edge cases: an empty input or a zero count would change the answer, but neither occurs here.",
    "I compare two approaches: the direct computation and the one through the intermediate "
    "sums. Both give the same value.",
]


def read_items(path: Path) -> list[dict[str, Any]]:
    """Trajectories from a JSON-lines file, one object per non-empty line."""
    items: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        items.append(item)
    return items


class Workload:
    """Items for a model of a given kind, drawn with the caller's seeded random generator."""

    def __init__(self, examples: list[dict[str, Any]], max_extra_steps: int = 24) -> None:
        if not examples:
            raise ValueError("no example trajectories")
        if max_extra_steps < 0:
            raise ValueError("max_extra_steps must be >= 0")
        self._examples = examples
        self._referenced = [item for item in examples if item.get("reference") is not None]
        self._max_extra = max_extra_steps
        self._ids = itertools.count()

    @classmethod
    def from_file(cls, path: Path = EXAMPLES, max_extra_steps: int = 24) -> Workload:
        return cls(read_items(path), max_extra_steps)

    def item(self, rng: random.Random, kind: str | None = None) -> dict[str, Any]:
        """One trajectory suited to a model of `kind` (None: any)."""
        pool = self._referenced if kind in NEEDS_REFERENCE and self._referenced else self._examples
        item = copy.deepcopy(rng.choice(pool))
        # Squared uniform: most items get few extra steps, a few get many.
        extra = round(self._max_extra * rng.random() ** 2)
        _lengthen(item, [rng.choice(_STEPS) for _ in range(extra)])
        item["id"] = f"{item.get('id', 'item')}-{next(self._ids)}"
        return item

    def batch(self, rng: random.Random, size: int, kind: str | None = None) -> list[dict[str, Any]]:
        return [self.item(rng, kind) for _ in range(size)]


def _lengthen(item: dict[str, Any], steps: list[str]) -> None:
    """Insert `steps` as paragraphs before the last paragraph of the last assistant answer."""
    if not steps:
        return
    for message in reversed(item.get("messages", [])):
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            paragraphs = message["content"].split("\n\n")
            message["content"] = "\n\n".join([*paragraphs[:-1], *steps, paragraphs[-1]])
            return
