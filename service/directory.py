"""Which models exist and whether each is loading, ready or unavailable (and why)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rmserve.models.spec import ModelSpec
from rmserve.service.protocol import ModelInfo, ModelStatus


@dataclass
class ModelEntry:
    spec: ModelSpec
    status: ModelStatus = "loading"
    reason: str | None = None
    # Distributed mode: live workers serving the model; None in embedded mode.
    workers: int | None = None


class ModelDirectory:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._entries = {spec.name: ModelEntry(spec) for spec in specs}

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def spec(self, name: str) -> ModelSpec:
        return self._entries[name].spec

    def names(self) -> list[str]:
        return list(self._entries)

    def mark_ready(self, name: str) -> None:
        self.set(name, "ready")

    def mark_unavailable(self, name: str, reason: str) -> None:
        self.set(name, "unavailable", reason)

    def set(
        self, name: str, status: ModelStatus, reason: str | None = None, workers: int | None = None
    ) -> None:
        entry = self._entries[name]
        entry.status, entry.reason, entry.workers = status, reason, workers

    def infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=name,
                kind=entry.spec.kind,
                status=entry.status,
                reason=entry.reason,
                weights=entry.spec.weights,
                revision=entry.spec.revision,
                max_model_len=_max_model_len(entry.spec),
                workers=entry.workers,
            )
            for name, entry in self._entries.items()
        ]


def _max_model_len(spec: ModelSpec) -> int:
    remote = getattr(spec, "remote", None)
    return remote.max_model_len if remote is not None else spec.engine.max_model_len
