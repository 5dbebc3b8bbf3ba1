"""The model registry: a YAML file naming each model, its kind, weights and engine options.

    models:
      skywork-rm:
        kind: discriminative
        weights: Skywork/Skywork-Reward-V2-Qwen3-0.6B   # HF hub id or a local directory
        revision: main
        engine: {max_model_len: 8192, dtype: bfloat16, kv_cache_gib: 4}
        options: {too_long: error}

Models are a map keyed by name so that several registry files (or Helm values) merge.
`${VAR}` in `weights` is expanded from the environment; a relative local path is taken
relative to the registry file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineOptions(_Strict):
    """Options passed to the vLLM engine."""

    max_model_len: int = Field(default=4096, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # KV cache memory in GiB. On CPU, vLLM otherwise reserves a fraction of node memory
    # (gpu_memory_utilization), which fails when several engines share a machine.
    kv_cache_gib: float | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    # Tokens per KV cache block: the prefix cache reuses whole blocks only, so a smaller block
    # shares more of a GRPO group's prompt (and a PRM's earlier steps). None: vLLM's default
    # (16 on GPUs, 128 on CPU, where multiples of 32 run fastest).
    block_size: int | None = Field(default=None, ge=1)
    # Skip graph compilation: starts several times faster, runs somewhat slower.
    enforce_eager: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    trust_remote_code: bool = False
    seed: int = 0


TooLongPolicy = Literal["error", "truncate_left"]


class DiscriminativeOptions(_Strict):
    too_long: TooLongPolicy = "error"
    # Index of the head output used as the score when the head has several labels;
    # all of them are returned in `scores`.
    score_label: int = Field(default=0, ge=0)


Aggregate = Literal["min", "last", "prod", "mean"]


class ProcessOptions(_Strict):
    too_long: TooLongPolicy = "error"
    # assistant_turns: one step per assistant message (one reward per agent action).
    # separator: the final assistant message split by `separator` (math-style solutions).
    steps: Literal["assistant_turns", "separator"] = "separator"
    separator: str = Field(default="\n\n", min_length=1)
    # The token the PRM was trained to score at the end of each step, e.g. "<extra_0>".
    step_tag: str = Field(min_length=1)
    aggregate: Aggregate = "min"
    # How a step's head output becomes its score: softmax over labels and take
    # `positive_label` (Qwen2.5-Math-PRM), sigmoid of that label, or the raw logit.
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    positive_label: int = Field(default=1, ge=0)
    # Score each step as its own request on the conversation up to its tag (the head's output
    # at a tag equals the last-token output of that prefix, attention being causal), so vLLM's
    # prefix cache computes a group's shared prompt and earlier steps once. Off: one request
    # per item reading every token's output, which vLLM never serves from the prefix cache.
    # A head vLLM serves per token only (Qwen2ForProcessRewardModel) always gets the latter.
    reuse_prefix: bool = True


class Sampling(_Strict):
    """Sampling of a generative judge; requests may override within the model's limits."""

    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=1024, ge=1)
    seed: int | None = None


JudgeMode = Literal["pointwise", "pairwise", "listwise"]
ToolName = Literal["crop", "search", "code_run", "calculator", "instruction_check"]
SampleAggregate = Literal["mean", "sum", "vote"]
ListwiseFormat = Literal["scores_block", "boxed_list"]
_DEFAULT_TEMPLATES = {
    "pointwise": "principles_pointwise",
    "pairwise": "rubric_pairwise",
    "listwise": "listwise",
}


class GenerativeOptions(_Strict):
    # pointwise: each response gets a score in score_range; pairwise: the item's `candidates`
    # are compared and the judge names the best (any number of them); listwise: one judgement
    # sees all the item's `candidates` and gives each a score in score_range.
    mode: JudgeMode = "pointwise"
    # A built-in template name (principles_pointwise, rubric_pairwise, rm_r1_reasoning, listwise,
    # deepseek_grm) or a .jinja file; by default the built-in one of the mode (and answer format).
    template: str | None = None
    # Listwise: how the judge writes its scores: `Scores: A=7, B=3` (scores_block) or, as
    # DeepSeek-GRM does, `Scores: \boxed{7, 3}` in the order shown (boxed_list).
    answer_format: ListwiseFormat = "scores_block"
    score_range: tuple[int, int] = (1, 10)
    sampling: Sampling = Sampling()
    # Upper bounds for per-request overrides.
    max_tokens_limit: int = Field(default=4096, ge=1)
    # Judgements per item (inference-time scaling) and how they are combined.
    samples: int = Field(default=1, ge=1)
    max_samples: int = Field(default=16, ge=1)
    aggregate: SampleAggregate = "mean"
    # The judge reasons in a <think>...</think> block before its answer (RM-R1, JudgeLRM,
    # DeepSeek-R1 distills, Qwen3 thinking). The thinking never counts as an answer (always);
    # with this, structured_output lets the judge think unconstrained and constrains what
    # follows its `</think>`.
    thinking: bool = False
    # Constrain the final answer with vLLM structured outputs, so that it always parses.
    structured_output: bool = False
    # With structured_output: the longest critique before the final answer, in characters.
    max_critique_chars: int = Field(default=2000, ge=0)
    # Meta reward model (DeepSeek-GRM): a discriminative model of this registry that rates
    # each judgement (the judge prompt as the user turn, the judgement as the assistant turn);
    # only the best-rated `meta_keep` fraction of the parsed judgements is aggregated.
    meta_model: str | None = Field(default=None, pattern=_NAME)
    meta_keep: float = Field(default=0.5, gt=0, le=1)
    # Vision-language judges: images per item, and pixels per image (read from the image
    # header before decoding, so decompression bombs are refused undecoded).
    max_images: int = Field(default=8, ge=0)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Agentic judging: the sandbox tools the judge may call, for up to max_tool_turns turns;
    # `required`: every turn but the last must call a tool (enforced with structured_output).
    tools: list[ToolName] = Field(default_factory=list)
    max_tool_turns: int = Field(default=4, ge=0, le=32)
    tool_choice: Literal["auto", "required"] = "auto"
    # Tool results longer than this (characters) are cut before the judge reads them.
    max_observation_chars: int = Field(default=4000, ge=100)

    @model_validator(mode="after")
    def _consistent(self) -> GenerativeOptions:
        low, high = self.score_range
        if low >= high:
            raise ValueError(f"score_range [{low}, {high}] must go from low to high")
        if self.samples > self.max_samples:
            raise ValueError(f"samples ({self.samples}) exceeds max_samples ({self.max_samples})")
        if self.sampling.max_tokens > self.max_tokens_limit:
            raise ValueError("sampling.max_tokens exceeds max_tokens_limit")
        if self.answer_format != "scores_block" and self.mode != "listwise":
            raise ValueError(f"answer_format {self.answer_format} applies to mode listwise only")
        return self

    @property
    def template_name(self) -> str:
        if self.template is None and self.answer_format == "boxed_list":
            return "deepseek_grm"
        return self.template or _DEFAULT_TEMPLATES[self.mode]


class _ModelSpecBase(_Strict):
    name: str = Field(pattern=_NAME)
    revision: str | None = None
    tokenizer: str | None = None
    engine: EngineOptions = EngineOptions()
    description: str = ""


class DiscriminativeSpec(_ModelSpecBase):
    kind: Literal["discriminative"]
    weights: str = Field(min_length=1)
    options: DiscriminativeOptions = DiscriminativeOptions()


class ProcessSpec(_ModelSpecBase):
    kind: Literal["process"]
    weights: str = Field(min_length=1)
    options: ProcessOptions


class RemoteJudge(_Strict):
    """An OpenAI-compatible chat endpoint serving the judge (POST {base_url}/chat/completions)."""

    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    # The API key: from this environment variable, or the first line of this file (a relative
    # path is taken relative to the registry file).
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    # Retries of 429 and 5xx answers only (with backoff); other errors fail the item at once.
    max_retries: int = Field(default=3, ge=0)
    # Requests in flight to the endpoint at once.
    max_concurrency: int = Field(default=16, ge=1)
    # The endpoint model's context length (prompt + max_tokens), for the too_long check.
    max_model_len: int = Field(default=32768, ge=16)
    # The endpoint's model reads images (image_url parts are sent to it); otherwise items
    # with images get `unsupported_content`.
    vision: bool = False


class GenerativeSpec(_ModelSpecBase):
    kind: Literal["generative"]
    # A local judge (weights, on a vLLM engine here) or a remote one, not both.
    weights: str | None = Field(default=None, min_length=1)
    remote: RemoteJudge | None = None
    options: GenerativeOptions = GenerativeOptions()

    @model_validator(mode="after")
    def _one_backend(self) -> GenerativeSpec:
        if (self.weights is None) == (self.remote is None):
            raise ValueError("a generative model needs either `weights` or `remote`, not both")
        return self


# -- verifiers: rule-based rewards, no weights ---------------------------------------------------

# Which part of the response is checked: the final assistant message, the last \boxed{} in it,
# the last fenced code block in it, or every assistant turn.
Extract = Literal["final", "boxed", "code_block", "full"]


class _VerifierSpec(_Strict):
    name: str = Field(pattern=_NAME)
    description: str = ""
    weights: None = None
    revision: None = None
    tokenizer: None = None
    engine: EngineOptions = EngineOptions()


class MathOptions(_Strict):
    extract: Extract = "boxed"
    # Seconds to parse and compare one answer (math-verify, in a child process).
    timeout_s: float = Field(default=5.0, gt=0, le=60)


class MathSpec(_VerifierSpec):
    """1.0 when the response's answer equals the item's `reference` (math-verify), else 0.0."""

    kind: Literal["math"]
    options: MathOptions = MathOptions()


class CodeTestsOptions(_Strict):
    extract: Extract = "code_block"
    # fraction: the share of the item's tests passed; all_pass: 1.0 only if every test passes.
    reward: Literal["fraction", "all_pass"] = "fraction"
    # Per-test wall-clock seconds (at most the sandbox's own limit).
    timeout_s: float | None = Field(default=None, gt=0)
    # refuse: an item whose `code` test would run in the program's own interpreter (anything
    # but plain asserts of calls) gets the error `unsafe_test`: the code under test can forge
    # such tests. allow: run them anyway (code not written by an optimising policy).
    in_process_tests: Literal["allow", "refuse"] = "refuse"


class CodeTestsSpec(_VerifierSpec):
    """Runs the response's code against the item's `tests` in the tool sandbox."""

    kind: Literal["code_tests"]
    options: CodeTestsOptions = CodeTestsOptions()


class FormatOptions(_Strict):
    extract: Extract = "final"
    regex: str | None = None
    regex_mode: Literal["search", "fullmatch"] = "search"
    # Each tag t: exactly one <t> ... </t>, in that order.
    required_tags: list[str] = Field(default_factory=list)
    json_valid: bool = False
    json_schema: dict[str, Any] | None = None
    # all: 1.0 only if every check passes; fraction: the share of checks passed.
    reward: Literal["all", "fraction"] = "all"

    @model_validator(mode="after")
    def _some_check(self) -> FormatOptions:
        if not (self.regex or self.required_tags or self.json_valid or self.json_schema):
            raise ValueError("give at least one of regex, required_tags, json_valid, json_schema")
        return self


class FormatSpec(_VerifierSpec):
    kind: Literal["format"]
    options: FormatOptions


SimilarityMetric = Literal["exact", "fuzzy", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]


class SimilarityOptions(_Strict):
    extract: Extract = "final"
    metric: SimilarityMetric = "exact"
    case_sensitive: bool = False
    normalize_whitespace: bool = True


class SimilaritySpec(_VerifierSpec):
    """Similarity of the response to the item's `reference`, in [0, 1]."""

    kind: Literal["similarity"]
    options: SimilarityOptions = SimilarityOptions()


class CompositeOptions(_Strict):
    # An arithmetic formula over the inputs' rewards, e.g. "0.7*math + 0.3*rm - 0.1*length":
    # + - * / ** and min, max, abs, clip(x, lo, hi); parsed safely, never eval'd.
    formula: str = Field(min_length=1, max_length=1000)
    # Formula variable -> registry model. By default every model of the registry whose name is
    # a valid variable can be used by its name.
    inputs: dict[str, str] = Field(default_factory=dict)


class CompositeSpec(_VerifierSpec):
    """Combines other models' rewards (computed concurrently) with a formula; the result's
    `components` holds each input's reward."""

    kind: Literal["composite"]
    options: CompositeOptions


VerifierSpec = MathSpec | CodeTestsSpec | FormatSpec | SimilaritySpec | CompositeSpec

ModelSpec = Annotated[
    DiscriminativeSpec | ProcessSpec | GenerativeSpec | VerifierSpec,
    Field(discriminator="kind"),
]


class Registry(_Strict):
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _meta_models_exist(self) -> Registry:
        for name, spec in self.models.items():
            meta = spec.options.meta_model if isinstance(spec, GenerativeSpec) else None
            if meta is not None and not isinstance(self.models.get(meta), DiscriminativeSpec):
                raise ValueError(
                    f"models.{name}.options.meta_model: {meta!r} is not a discriminative model "
                    "of this registry"
                )
        return self

    @model_validator(mode="after")
    def _composites_resolve(self) -> Registry:
        for spec in self.models.values():
            if isinstance(spec, CompositeSpec):
                composite_inputs(spec, self.models)  # raises ValueError saying what is wrong
        return self

    def peers(self, name: str) -> list[ModelSpec]:
        """The models `name` scores with while it scores (a judge's meta reward model, a
        composite's inputs)."""
        spec = self.models[name]
        if isinstance(spec, CompositeSpec):
            return [
                self.models[m] for m in sorted(set(composite_inputs(spec, self.models).values()))
            ]
        meta = spec.options.meta_model if isinstance(spec, GenerativeSpec) else None
        return [self.models[meta]] if meta is not None else []

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = {}
            for name, spec in data["models"].items():
                models[name] = {"name": name, **spec} if isinstance(spec, dict) else spec
            data = {**data, "models": models}
        return data


def composite_inputs(spec: CompositeSpec, models: Mapping[str, ModelSpec]) -> dict[str, str]:
    """Formula variable -> model name, for the variables the formula uses; ValueError when the
    formula is invalid, uses an unknown variable, or names a composite."""
    from rmserve.models.formula import Formula

    where = f"models.{spec.name}.options"
    try:
        formula = Formula(spec.options.formula)
    except ValueError as exc:
        raise ValueError(f"{where}.formula: {exc}") from None
    resolved = {}
    for variable in formula.variables:
        target = spec.options.inputs.get(variable, variable)
        if target not in models:
            raise ValueError(
                f"{where}.formula: {variable!r} is not a model of this registry (map it to one "
                "in options.inputs)"
            )
        if isinstance(models[target], CompositeSpec):
            raise ValueError(f"{where}.inputs: {target!r} is itself composite")
        resolved[variable] = target
    return resolved


class RegistryError(ValueError):
    """The registry file cannot be read or does not describe valid models."""


def load_registry(path: str | Path) -> Registry:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RegistryError(f"cannot read registry {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"registry {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise RegistryError(f"registry {path} must hold a non-empty 'models:' map")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(err["loc"], err["msg"]) for err in exc.errors())
        raise RegistryError(f"registry {path}: {problems}") from None
    return _with_resolved_paths(registry, path.parent)


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{_where(loc)}: {message}" if loc else message


def _where(loc: tuple[int | str, ...]) -> str:
    # ("models", "a", "process", "options") -> "models.a.options": drop the union's kind tag.
    return ".".join(str(part) for i, part in enumerate(loc) if not (i == 2 and part in _KINDS))


_KINDS = (
    "discriminative",
    "process",
    "generative",
    "math",
    "code_tests",
    "format",
    "similarity",
    "composite",
)


def _with_resolved_paths(registry: Registry, base: Path) -> Registry:
    models: dict[str, ModelSpec] = {}
    for name, spec in registry.models.items():
        update: dict[str, Any] = {}
        if spec.weights is not None:
            update["weights"] = _resolve(spec.weights, base)
        if spec.tokenizer:
            update["tokenizer"] = _resolve(spec.tokenizer, base)
        if isinstance(spec, GenerativeSpec) and spec.options.template is not None:
            template = _template(spec.options.template, base)
            update["options"] = spec.options.model_copy(update={"template": template})
        if isinstance(spec, GenerativeSpec) and spec.remote and spec.remote.api_key_file:
            key_file = str((base / Path(spec.remote.api_key_file).expanduser()).resolve())
            update["remote"] = spec.remote.model_copy(update={"api_key_file": key_file})
        models[name] = spec.model_copy(update=update)
    return Registry(models=models)


def _template(name_or_path: str, base: Path) -> str:
    """A built-in template name stays; a path is resolved like weights and must exist."""
    from rmserve.models.generative.prompts import BUILTIN

    if (BUILTIN / f"{name_or_path}.jinja").is_file():
        return name_or_path
    path = Path(os.path.expandvars(name_or_path)).expanduser()
    path = path if path.is_absolute() else (base / path).resolve()
    if not path.is_file():
        raise RegistryError(f"judge template {name_or_path!r}: no such built-in template or file")
    return str(path)


def _resolve(location: str, base: Path) -> str:
    """Expand ${VAR}; make local relative paths absolute. Hub ids (org/name) stay as given."""
    expanded = os.path.expandvars(location)
    if expanded.startswith(("/", "./", "../", "~")):
        return str((base / Path(expanded).expanduser()).resolve())
    return expanded
