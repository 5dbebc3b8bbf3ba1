"""Settings: the registry defaults to the one shipped in the package, whatever the working
directory, and shipped registries can be named."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve import examples
from rmserve.service.config import Settings


def test_the_default_registry_is_the_shipped_one_and_names_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RMSERVE_REGISTRY", raising=False)
    assert Settings().registry == examples.DEFAULT_REGISTRY and examples.DEFAULT_REGISTRY.is_file()
    assert Settings(registry="tiny").registry == examples.TINY_REGISTRY
    (tmp_path / "tiny").write_text("models: {}\n")  # a file of that name wins
    assert Settings(registry="tiny").registry == Path("tiny")
