"""The registry file: names from keys, env expansion, relative paths, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve import examples
from rmserve.models.spec import (
    DiscriminativeSpec,
    GenerativeSpec,
    ProcessSpec,
    RegistryError,
    load_registry,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_example_registries_load() -> None:
    example = load_registry(REPO / "deploy" / "registry.gpu.yaml")
    assert isinstance(example.models["skywork-rm"], DiscriminativeSpec)
    prm = example.models["qwen-math-prm"]
    assert isinstance(prm, ProcessSpec) and prm.options.step_tag == "<extra_0>"
    for tiny in (REPO / "tests" / "registry.tiny.yaml", examples.TINY_REGISTRY):
        assert load_registry(tiny).models["tiny-prm"].kind == "process"
    default = load_registry(examples.DEFAULT_REGISTRY)
    kinds = {name: spec.kind for name, spec in default.models.items()}
    assert kinds == {"math": "math", "unit-tests": "code_tests", "boxed": "format",
                     "math-reward": "composite", "skywork-rm": "discriminative"}  # fmt: skip


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


def test_generative_judges_local_or_remote_with_their_templates(tmp_path: Path) -> None:
    (tmp_path / "judges").mkdir()
    (tmp_path / "judges" / "mine.jinja").write_text("Judge {{ response }}")
    registry = load_registry(
        write(
            tmp_path,
            "models:\n"
            "  rm: {kind: discriminative, weights: org/rm}\n"
            "  local: {kind: generative, weights: org/judge,\n"
            "          options: {mode: pairwise, samples: 4}}\n"
            "  own: {kind: generative, weights: org/judge,\n"
            "        options: {template: judges/mine.jinja}}\n"
            "  far: {kind: generative, remote: {base_url: 'http://judge:8000/v1', model: j,\n"
            "        api_key_file: secrets/key}}\n",
        )
    )
    local, own, far = (registry.models[n] for n in ("local", "own", "far"))
    assert isinstance(local, GenerativeSpec) and local.options.template_name == "rubric_pairwise"
    assert isinstance(own, GenerativeSpec)
    assert own.options.template_name == str(tmp_path / "judges" / "mine.jinja")
    assert isinstance(far, GenerativeSpec) and far.weights is None and far.remote is not None
    assert far.remote.api_key_file == str(tmp_path / "secrets" / "key")
    assert far.options.template_name == "principles_pointwise"


@pytest.mark.parametrize(
    ("models", "says"),
    [
        ("  j: {kind: generative}\n", "either `weights` or `remote`"),
        ("  j: {kind: generative, weights: a, remote: {base_url: 'http://x/v1', model: m}}\n",
         "not both"),
        ("  j: {kind: generative, remote: {base_url: 'ftp://x', model: m}}\n",
         "models.j.remote.base_url"),
        ("  j: {kind: generative, weights: a, options: {score_range: [10, 1]}}\n",
         "score_range [10, 1]"),
        ("  j: {kind: generative, weights: a, options: {samples: 20}}\n", "exceeds max_samples"),
        ("  j: {kind: generative, weights: a, options: {template: nowhere.jinja}}\n",
         "no such built-in template or file"),
        ("  j: {kind: generative, weights: a, options: {meta_model: m}}\n",
         "models.j.options.meta_model: 'm' is not a discriminative model of this registry"),
        ("  j: {kind: generative, weights: a, options: {meta_model: p}}\n"
         "  p: {kind: process, weights: b, options: {step_tag: x}}\n",
         "'p' is not a discriminative model"),
        ("  j: {kind: generative, weights: a, options: {meta_keep: 0}}\n",
         "models.j.options.meta_keep"),
    ],
)  # fmt: skip
def test_invalid_judges_say_what_is_wrong(tmp_path: Path, models: str, says: str) -> None:
    with pytest.raises(RegistryError) as caught:
        load_registry(write(tmp_path, "models:\n" + models))
    assert says in str(caught.value)


def test_a_judge_names_its_meta_model_as_a_peer(tmp_path: Path) -> None:
    registry = load_registry(
        write(
            tmp_path,
            "models:\n"
            "  judge: {kind: generative, weights: ./j, options: {meta_model: rm}}\n"
            "  rm: {kind: discriminative, weights: ./r}\n",
        )
    )
    assert [peer.name for peer in registry.peers("judge")] == ["rm"]
    assert registry.peers("rm") == []
