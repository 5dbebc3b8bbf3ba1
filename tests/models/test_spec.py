"""The registry file: names from keys, env expansion, relative paths, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.spec import DiscriminativeSpec, ProcessSpec, RegistryError, load_registry

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_example_registries_load() -> None:
    example = load_registry(REPO / "deploy" / "registry.example.yaml")
    assert isinstance(example.models["skywork-rm"], DiscriminativeSpec)
    prm = example.models["qwen-math-prm"]
    assert isinstance(prm, ProcessSpec) and prm.options.step_tag == "<extra_0>"
    for tiny in (REPO / "tests" / "registry.tiny.yaml", REPO / "examples" / "registry.tiny.yaml"):
        assert load_registry(tiny).models["tiny-prm"].kind == "process"


def test_names_env_vars_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RM_DIR", "/data/models")
    registry = load_registry(
        write(
            tmp_path,
            "models:\n"
            "  a: {kind: discriminative, weights: '${RM_DIR}/a'}\n"
            "  b: {kind: discriminative, weights: ./weights/b}\n"
            "  c: {kind: discriminative, weights: org/model, revision: v1}\n",
        )
    )
    assert registry.models["a"].name == "a"
    assert registry.models["a"].weights == "/data/models/a"
    assert registry.models["b"].weights == str(tmp_path / "weights" / "b")
    assert registry.models["c"].weights == "org/model" and registry.models["c"].revision == "v1"
    assert registry.models["c"].engine.max_model_len == 4096


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("models: {}\n", "non-empty 'models:' map"),
        ("models: [\n", "not valid YAML"),
        ("models:\n  a: {kind: generative-ish, weights: x}\n", "models.a"),
        ("models:\n  a: {kind: process, weights: x}\n", "models.a.options: Field required"),
        ("models:\n  a: {kind: process, weights: x, options: {}}\n", "models.a.options.step_tag"),
        (
            "models:\n  a: {kind: discriminative, weights: x, engine: {max_model_len: 0}}\n",
            "max_model_len",
        ),
        (
            "models:\n  a: {kind: discriminative, weights: x, options: {too_long: drop}}\n",
            "too_long",
        ),
        ("models:\n  a: {kind: discriminative, weights: x, colour: red}\n", "colour"),
        ("models:\n  'bad name!': {kind: discriminative, weights: x}\n", "name"),
    ],
)
def test_invalid_registry_says_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(RegistryError, match="registry") as caught:
        load_registry(write(tmp_path, text))
    assert says in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read registry"):
        load_registry(tmp_path / "absent.yaml")
