"""Which models exist and whether each is loading, ready or unavailable (and why)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from models.spec import ModelSpec
from service.protocol import ModelInfo, ModelStatus


@dataclass
class ModelEntry:
    spec: ModelSpec
    status: ModelStatus = "loading"
    reason: str | None = None


class ModelDirectory:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._entries = {spec.name: ModelEntry(spec) for spec in specs}

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def mark_ready(self, name: str) -> None:
        self._entries[name].status, self._entries[name].reason = "ready", None

    def mark_unavailable(self, name: str, reason: str) -> None:
        self._entries[name].status, self._entries[name].reason = "unavailable", reason

    def infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=name,
                kind=entry.spec.kind,
                status=entry.status,
                reason=entry.reason,
                weights=entry.spec.weights,
                revision=entry.spec.revision,
                max_model_len=entry.spec.engine.max_model_len,
            )
            for name, entry in self._entries.items()
        ]
