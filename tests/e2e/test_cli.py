"""The `rmserve` command: the demo prints real rewards and names unavailable models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TESTS

EXAMPLES = TESTS.parent / "examples" / "trajectories.jsonl"


def rmserve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rmserve.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=TESTS.parent,
    )


def test_demo_scores_examples_and_reports_unavailable_models(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "models:\n"
        f"  demo-rm:\n    kind: discriminative\n    weights: {tiny_models['tiny-rm']}\n"
        "    engine: {max_model_len: 1024, dtype: float32, kv_cache_gib: 0.1,"
        " enforce_eager: true}\n"
        "  hub-only:\n    kind: discriminative\n    weights: /nonexistent/rmserve/hub-only\n"
    )
    done = rmserve("demo", "--registry", str(registry), env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    example_ids = ["math-correct", "math-wrong", "agent-search", "agent-code", "chat-helpful"]
    assert all(example_id in out for example_id in example_ids), out
    assert "1 of 2 models served 6 example trajectories" in out
    assert "unavailable hub-only" in out and "does not exist" in out


def test_check_registry(tmp_path: Path) -> None:
    done = rmserve("check-registry", str(TESTS.parent / "deploy" / "registry.example.yaml"))
    assert done.returncode == 0
    assert "skywork-rm\tdiscriminative\tSkywork/Skywork-Reward-V2-Qwen3-0.6B" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  x: {kind: process, weights: w, options: {}}\n")
    done = rmserve("check-registry", str(bad))
    assert done.returncode == 2
    assert "models.x.options.step_tag: Field required" in done.stderr
