"""Fixtures of the model tests: the tiny twins of Qwen's math reward models, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.models.tiny.qwen2_heads import make_qwen2_prm_twin, make_qwen2_rm_twin


@pytest.fixture(scope="session")
def qwen2_head_twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`prm`: the Qwen2.5-Math-PRM-7B twin (Qwen2ForProcessRewardModel); `rm`: the
    Qwen2.5-Math-RM-72B twin (Qwen2ForRewardModel)."""
    out = tmp_path_factory.mktemp("qwen2-head-twins")
    return {
        "prm": make_qwen2_prm_twin(out / "qwen2.5-math-prm-twin"),
        "rm": make_qwen2_rm_twin(out / "qwen2.5-math-rm-twin"),
    }
