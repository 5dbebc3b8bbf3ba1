"""The `rmserve` command: the demo prints real rewards and names unavailable models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TESTS


def rmserve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rmserve.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd or TESTS.parent,
    )


def _rows(out: str) -> dict[str, list[str]]:
    """The cells of the demo's rewards table, by item id."""
    rows = {}
    for line in out.splitlines():
        line = line.replace("┃", "│").strip()
        cells = [cell.strip() for cell in line[1:-1].split("│")]
        if (
            line.startswith("│") and len(cells) > 1
        ):  # the first header line (model names) has an empty first cell
            rows[cells[0]] = cells[1:]
    return rows


def test_the_default_demo_scores_real_rewards_without_a_model_hub(tmp_path: Path) -> None:
    """From any directory (the examples and registry come from the package), offline: the
    weight-free rewards score every example, and the hub model is listed with the reason."""
    env = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    clean = {k: v for k, v in os.environ.items() if k != "RMSERVE_REGISTRY"}
    done = subprocess.run(
        [sys.executable, "-m", "rmserve.service.cli", "demo"],
        capture_output=True, text=True, timeout=600, env={**clean, **env}, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert rows["item"] == ["math", "code_tests", "format", "composite"], done.stdout
    assert rows[""] == ["math", "unit-tests", "boxed", "math-reward"]
    assert rows["math-correct"] == ["1.000", "missing_tests", "1.000", "1.000"]
    assert rows["math-wrong"] == ["0.000", "missing_tests", "1.000", "0.100"]
    assert rows["math-equivalent"][0] == "1.000"  # 1/2 and 0.5, by math-verify
    assert rows["math-unboxed"][:3] == ["0.000", "missing_tests", "0.000"]
    assert rows["code-correct"][:2] == ["missing_reference", "1.000"]
    assert rows["code-off-by-one"][1] == "0.250"  # 1 of the 4 tests passes, in the sandbox
    assert rows["agent-code"][1] == "1.000"
    assert rows["chat-helpful"][:2] == ["missing_reference", "missing_tests"]
    assert "4 of 5 models scored 10 example trajectories" in done.stdout
    assert "unavailable skywork-rm" in done.stdout


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
    assert "1 of 2 models scored 10 example trajectories" in out
    assert "unavailable hub-only" in out and "does not exist" in out


def test_check_registry(tmp_path: Path) -> None:
    done = rmserve("check-registry", str(TESTS.parent / "deploy" / "registry.gpu.yaml"))
    assert done.returncode == 0
    assert "skywork-rm\tdiscriminative\tSkywork/Skywork-Reward-V2-Qwen3-0.6B" in done.stdout
    catalogue = rmserve(
        "check-registry", str(TESTS.parent / "examples" / "registry.catalogue.yaml")
    )
    assert catalogue.returncode == 0, catalogue.stderr
    assert "Qwen/Qwen2.5-Math-PRM-7B" in catalogue.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  x: {kind: process, weights: w, options: {}}\n")
    done = rmserve("check-registry", str(bad))
    assert done.returncode == 2
    assert "models.x.options.step_tag: Field required" in done.stderr
