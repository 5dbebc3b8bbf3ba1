"""`rmserve inspect-model`: the kind of each tiny model, vLLM's view of it, the rendered sample,
vLLM's scores against a transformers reference (the real CPU engine, one start per pooling
model), and a clear reason with exit status 2 for models rmserve cannot serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rmserve.models.spec import load_registry
from rmserve.models.tiny import STEP_TAG
from rmserve.service.inspect_model import TOLERANCE, format_text, inspect_model
from tests.conftest import TESTS
from tests.e2e import reference as ref


def inspect_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """The real command, `--json`: its exit status, the parsed report, its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "rmserve.service.cli", "inspect-model", *args, "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
        cwd=TESTS.parent,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout)  # stdout holds the JSON object only
    assert report["exit_code"] == done.returncode
    return done.returncode, report, done.stderr


@pytest.mark.engine
def test_a_sequence_classifier_is_discriminative_and_vllm_agrees_with_transformers(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["tiny-rm"]
    code, report, stderr = inspect_cli(str(path))
    assert code == 0, (report["problems"], report["failures"], stderr[-4000:])
    assert report["ok"] is True
    assert report["kind"] == {
        "kind": "discriminative",
        "source": "detected",
        "reason": report["kind"]["reason"],
    }
    assert "ForSequenceClassification" in report["kind"]["reason"]
    assert report["config"]["architectures"] == ["LlamaForSequenceClassification"]
    assert report["config"]["num_labels"] == 1
    assert report["head"]["label"] == 0 and report["head"]["activation"] == "none"
    assert report["remote_code"]["needed"] is False

    vllm = report["vllm"]
    assert vllm["resolved_architecture"] == "LlamaForSequenceClassification"
    assert (vllm["runner"], vllm["convert"]) == ("pooling", "classify")
    assert vllm["pooling_tasks_source"] == "the engine"
    assert {"classify", "token_classify"} <= set(vllm["pooling_tasks"])
    assert vllm["seq_pooling_type"] == "LAST"

    prompt = report["prompt"]
    assert prompt["has_chat_template"] is True
    assert prompt["text"].startswith("<|bos|><|im_start|>user")
    assert prompt["num_tokens"] == len(prompt["token_ids"])
    assert prompt["token_ids"] == ref.token_ids(path, ref.render(path, prompt["messages"]))

    comparison = report["comparison"]
    assert comparison["ran"] is True and comparison["verdict"] == "agree", comparison
    assert comparison["max_abs_diff"] <= TOLERANCE
    # An independent reference on the same tokens.
    (engine_score,) = comparison["engine_scores"]
    assert abs(engine_score - ref.sequence_logits(path, prompt["token_ids"])[0]) <= TOLERANCE

    # The suggested registry entry is one rmserve loads.
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump(report["registry_entry"]))
    (spec,) = load_registry(registry).models.values()
    assert (spec.kind, spec.weights) == ("discriminative", str(path))


@pytest.mark.engine
def test_a_token_classifier_is_process_and_vllm_agrees_at_each_step_tag(
    tiny_models: dict[str, Path],
) -> None:
    path = tiny_models["tiny-prm"]
    report = inspect_model(str(path))
    assert report.exit_code == 0, (report.problems, report.failures)
    assert report.kind is not None and report.kind.kind == "process"
    assert report.head is not None
    assert (report.head.activation, report.head.label) == ("softmax", 1)

    prompt = report.prompt
    assert prompt is not None and prompt.token_ids is not None
    assert prompt.step_tag == STEP_TAG
    assert prompt.messages[1]["content"].count(STEP_TAG) == 2  # a two-step answer
    assert prompt.step_positions is not None and len(prompt.step_positions) == 2
    assert all(prompt.token_ids[p] == prompt.step_tag_id for p in prompt.step_positions)

    comparison = report.comparison
    assert comparison is not None and comparison.verdict == "agree", comparison
    assert comparison.max_abs_diff is not None and comparison.max_abs_diff <= TOLERANCE
    assert comparison.engine is not None and comparison.engine_prefix is not None
    want = ref.token_logits(path, prompt.token_ids)
    for position, got, prefix in zip(
        prompt.step_positions, comparison.engine, comparison.engine_prefix, strict=True
    ):
        assert max(abs(a - b) for a, b in zip(got, want[position], strict=True)) <= TOLERANCE
        assert max(abs(a - b) for a, b in zip(prefix, want[position], strict=True)) <= TOLERANCE
    assert comparison.engine_scores is not None
    assert [round(s, 4) for s in comparison.engine_scores] == [
        round(ref.softmax_label(want[p], 1), 4) for p in prompt.step_positions
    ]
    text = format_text(report)
    assert "kind           process (detected)" in text
    assert "verdict      agree" in text
    assert text.rstrip().endswith("ready to serve as process, vLLM agreeing with transformers")


@pytest.mark.parametrize(
    ("name", "multimodal"), [("tiny-lm", False), ("tiny-vlm", True)]
)  # fmt: skip
def test_language_models_are_generative_judges(
    tiny_models: dict[str, Path], name: str, multimodal: bool
) -> None:
    report = inspect_model(str(tiny_models[name]), compare=True)
    assert report.exit_code == 0, report.problems
    assert report.kind is not None and report.kind.kind == "generative"
    assert report.vllm is not None
    assert (report.vllm.runner, report.vllm.multimodal) == ("generate", multimodal)
    assert report.vllm.pooling_tasks is None
    assert report.prompt is not None and report.prompt.num_tokens
    # A judge writes text: there is no head output to compare (no engine is started).
    assert report.comparison is not None and report.comparison.ran is False
    assert "pooling models" in (report.comparison.reason or "")


def test_a_causal_lm_asked_to_be_a_reward_model_has_no_head(tiny_models: dict[str, Path]) -> None:
    report = inspect_model(str(tiny_models["tiny-lm"]), kind="discriminative")
    assert report.exit_code == 2
    assert any("embedding model" in problem for problem in report.problems), report.problems
    assert report.comparison is not None and report.comparison.ran is False


def _copy_config(source: Path, target: Path, template: bool = True, **changes: Any) -> Path:
    """A model directory with source's tokenizer and its config changed (no weights)."""
    target.mkdir()
    names = ["tokenizer.json", "tokenizer_config.json"] + ["chat_template.jinja"] * template
    for name in names:
        shutil.copy(source / name, target / name)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


CUSTOM_CODE = {
    "architectures": ["AcmeRewardForSequenceClassification"],
    "model_type": "acme-reward",
    "auto_map": {
        "AutoConfig": "configuration_acme.AcmeConfig",
        "AutoModelForSequenceClassification": "modeling_acme.AcmeRewardForSequenceClassification",
    },
}


def test_unservable_models_get_a_reason_and_exit_2(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    rm = tiny_models["tiny-rm"]
    mystery = ["MysteryNetForSequenceClassification"]
    custom = _copy_config(rm, tmp_path / "custom", **CUSTOM_CODE)
    cases: list[tuple[Path, dict[str, Any], str]] = [
        (tmp_path / "no-such-model", {}, "no such model directory"),
        (rm / "config.json", {}, "is a file, not a model directory"),
        (
            _copy_config(rm, tmp_path / "mystery", architectures=mystery),
            {},
            "has no implementation of MysteryNetForSequenceClassification",
        ),
        (
            _copy_config(rm, tmp_path / "encoder", architectures=["MysteryNetModel"]),
            {},
            "MysteryNetModel is not an architecture rmserve serves",
        ),
        (custom, {}, "pass --trust-remote-code"),
        # Trusted, but the code auto_map names is not in the directory.
        (custom, {"trust_remote_code": True}, "modeling_acme.py, missing from the model"),
        (_copy_config(rm, tmp_path / "untemplated", template=False), {}, "no chat template"),
    ]
    for path, options, reason in cases:
        report = inspect_model(str(path), **options)
        assert report.exit_code == 2, (path, report)
        assert any(reason in problem for problem in report.problems), (reason, report.problems)
        assert report.comparison is None or report.comparison.ran is False
        text = format_text(report)
        assert f"error: {report.problems[0]}" in text
        assert text.rstrip().endswith("as it is (exit 2)")
        assert json.loads(json.dumps(report.to_json()))["ok"] is False


def test_a_broken_config_and_an_unreachable_hub_id_fail_cleanly_on_the_command_line(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tiny_models["tiny-rm"].parent / "broken-config"
    code, report, stderr = inspect_cli(str(broken))
    assert code == 2
    assert report["problems"] == [report["problems"][0]]
    assert report["problems"][0].startswith("config.json is not valid JSON")
    assert f"error: {report['problems'][0]}" in stderr

    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code, report, _ = inspect_cli("rmserve-tests/no-such-model", env=offline)
    assert code == 2
    (problem,) = report["problems"]
    assert "is not a local directory, and as a hub id" in problem
    assert "could not be fetched from the model hub" in problem


def test_the_verdict_names_a_disagreement_and_an_engine_that_cannot_serve_the_head(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison's outcomes other than agreement, on the real tiny-rm with the engine's
    rows made up (no engine is started)."""
    from rmserve.models.errors import ModelLoadError
    from rmserve.service import inspect_model as module
    from rmserve.wire.errors import ItemError

    path = str(tiny_models["tiny-rm"])

    def rows(shift: float) -> Any:
        """The engine's row: transformers' output, shifted."""

        def engine_rows(path: Path, kind: str, ids: list[int], *_: Any) -> module._EngineRun:
            logits = [x + shift for x in ref.sequence_logits(path, ids)]
            return module._EngineRun([logits], None, ["classify"], "LAST", "ALL")

        return engine_rows

    monkeypatch.setattr(module, "_engine_rows", rows(0.5))
    report = inspect_model(path)
    assert report.exit_code == 1
    assert report.comparison is not None and report.comparison.verdict == "disagree"
    assert report.comparison.max_abs_diff is not None
    assert abs(report.comparison.max_abs_diff - 0.5) < 1e-4
    assert "a different computation" in (report.comparison.explanation or "")
    assert "failed: vLLM and transformers disagree by 0.5" in format_text(report)

    monkeypatch.setattr(module, "_engine_rows", rows(5e-3))
    report = inspect_model(path)
    assert report.exit_code == 1
    assert "numerics" in (report.comparison.explanation or "")  # type: ignore[union-attr]

    def fails(error: Exception) -> Any:
        def engine_rows(*args: Any) -> module._EngineRun:
            raise error

        return engine_rows

    monkeypatch.setattr(module, "_engine_rows", fails(ItemError("unsupported_model", "no head")))
    report = inspect_model(path)
    assert report.exit_code == 2
    assert report.problems == ["vLLM cannot give rmserve the discriminative head outputs: no head"]

    monkeypatch.setattr(module, "_engine_rows", fails(ModelLoadError("too little memory")))
    report = inspect_model(path)
    assert report.exit_code == 1
    assert report.failures == ["the vLLM engine could not score the sample: too little memory"]
