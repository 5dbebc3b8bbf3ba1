"""What `rmserve demo` scores, shipped inside the package so that it works from any directory:
example trajectories and registries.

- `trajectories.jsonl`: math solutions with references, code with unit tests, agent trajectories
  with tool calls, chat answers.
- `registry.default.yaml`: the default registry (`Settings.registry`): rule-based rewards that
  need no weights, and a reward model small enough for a CPU from the Hugging Face hub.
- `registry.tiny.yaml`: tiny random models (`rmserve make-tiny-models`).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAJECTORIES = HERE / "trajectories.jsonl"
DEFAULT_REGISTRY = HERE / "registry.default.yaml"
TINY_REGISTRY = HERE / "registry.tiny.yaml"
SHIPPED_REGISTRIES = {"default": DEFAULT_REGISTRY, "tiny": TINY_REGISTRY}


def registry_path(value: str | Path) -> Path:
    """A registry file, or the name of one shipped with rmserve (`default`, `tiny`) when no file
    of that name exists."""
    path = Path(value)
    if not path.exists() and str(value) in SHIPPED_REGISTRIES:
        return SHIPPED_REGISTRIES[str(value)]
    return path
