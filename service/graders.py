"""OpenAI graders compatibility: `POST /v1/fine_tuning/alpha/graders/run` and `/validate`, so the
official `openai` SDK (`client.fine_tuning.alpha.graders.run(...)`) works against rmserve.

Grader types and what runs them:
  string_check     eq / ne / like / ilike (like: `%` and `_` wildcards; ilike ignores case)
  text_similarity  fuzzy_match, bleu, rouge_1, rouge_2, rouge_l (gleu, meteor, cosine and
                   rouge_3..5 are refused at validation)
  score_model      the templated `input` messages scored by the registry model named `model`
                   (any kind: a judge judges the conversation, a reward model scores it)
  label_model      a generative judge of the registry in pairwise mode chooses among `labels`;
                   reward 1.0 when the chosen label is in `passing_labels`
  python           `grade(sample, item)` run in the tool sandbox (bubblewrap); its float is the
                   reward
  multi            sub-graders (a map of name -> grader, or one grader) combined by
                   `calculate_output`, a formula over their names (parsed safely)

Templates `{{ item.x }}` and `{{ sample.output_text }}` (also `sample.output_json`) are
rendered with sandboxed Jinja. Run-time failures give reward 0 with the matching
`metadata.errors` flag set, as the API documents; invalid graders are 422s naming the field.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.models.formula import Formula
from rmserve.models.spec import GenerativeSpec
from rmserve.service.directory import ModelDirectory
from rmserve.service.protocol import ItemResult, ScoreRequest
from rmserve.service.scoring import ScoringService
from rmserve.web.errors import NotFound, Unavailable, UnprocessableEntity
from rmserve.wire.tools import Toolbox, ToolCall


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)


class StringCheck(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


_METRICS = {"fuzzy_match": "fuzzy", "bleu": "bleu", "rouge_1": "rouge1", "rouge_2": "rouge2",
            "rouge_l": "rougeL"}  # fmt: skip


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: str

    @model_validator(mode="after")
    def _supported(self) -> TextSimilarity:
        if self.evaluation_metric not in _METRICS:
            raise ValueError(
                f"evaluation_metric {self.evaluation_metric!r} is not supported (supported: "
                f"{', '.join(_METRICS)})"
            )
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]] | dict[str, Any]
    type: Literal["message"] = "message"


class ScoreModel(_Grader):
    model_config = ConfigDict(extra="ignore")  # sampling_params etc.: the registry decides

    type: Literal["score_model"]
    model: str
    input: list[Message] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)


class LabelModel(_Grader):
    model_config = ConfigDict(extra="ignore")

    type: Literal["label_model"]
    model: str
    input: list[Message] = Field(min_length=1)
    labels: list[str] = Field(min_length=2, max_length=26)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _subset(self) -> LabelModel:
        if extra := sorted(set(self.passing_labels) - set(self.labels)):
            raise ValueError(f"passing_labels {extra} are not among labels")
        return self


class Python(_Grader):
    type: Literal["python"]
    source: str = Field(min_length=1, max_length=100_000)
    image_tag: str | None = None


Single = Annotated[
    StringCheck | TextSimilarity | ScoreModel | LabelModel | Python, Field(discriminator="type")
]


class Multi(_Grader):
    type: Literal["multi"]
    graders: dict[str, Single] | Single
    calculate_output: str

    @model_validator(mode="after")
    def _formula(self) -> Multi:
        names = set(self.subgraders())
        formula = Formula(self.calculate_output)  # ValueError: a clear validation error
        if unknown := sorted(set(formula.variables) - names):
            raise ValueError(f"calculate_output uses {unknown}, not among graders {sorted(names)}")
        return self

    def subgraders(self) -> dict[str, Single]:
        graders = self.graders
        return dict(graders) if isinstance(graders, dict) else {graders.name: graders}


Grader = Annotated[
    StringCheck | TextSimilarity | ScoreModel | LabelModel | Python | Multi,
    Field(discriminator="type"),
]


def grader_models(grader: Grader) -> list[str]:
    """The registry models a grader scores with (its score_model and label_model graders)."""
    graders = grader.subgraders().values() if isinstance(grader, Multi) else [grader]
    return [sub.model for sub in graders if isinstance(sub, ScoreModel | LabelModel)]


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: Grader
    model_sample: str
    item: Any = None


class ValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: Grader


ERROR_FLAGS = (
    "formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
    "model_grader_refusal_error", "model_grader_server_error", "other_error",
    "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
    "truncated_observation_error", "unresponsive_reward_error",
)  # fmt: skip


class GraderFailed(Exception):
    def __init__(self, flag: str, details: str) -> None:
        super().__init__(details)
        self.flag, self.details = flag, details


class Graders:
    def __init__(
        self, scoring: ScoringService, directory: ModelDirectory, toolbox: Toolbox | None
    ) -> None:
        self._scoring, self._directory, self._toolbox = scoring, directory, toolbox
        self._templates = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

    def check(self, grader: Grader) -> None:
        """Model graders name usable registry models (404 / 422 naming the field)."""
        graders = grader.subgraders() if isinstance(grader, Multi) else {grader.name: grader}
        for sub in graders.values():
            if isinstance(sub, ScoreModel | LabelModel):
                entry = self._directory.get(sub.model)
                if entry is None:
                    known = ", ".join(self._directory.names())
                    message = f"grader.model {sub.model!r} is not a model ({known})"
                    raise NotFound(message, param="grader.model")
                if isinstance(sub, LabelModel) and not (
                    isinstance(entry.spec, GenerativeSpec) and entry.spec.options.mode == "pairwise"
                ):
                    raise UnprocessableEntity(
                        f"label_model needs a pairwise generative judge; {sub.model!r} is not",
                        param="grader.model",
                    )
            if isinstance(sub, Python) and self._toolbox is None:
                raise UnprocessableEntity("python graders need the tool sandbox", param="grader")

    async def run(self, request: RunRequest) -> dict[str, Any]:
        started = time.perf_counter()
        self.check(request.grader)
        sample = {"output_text": request.model_sample, "output_json": _json(request.model_sample)}
        errors: dict[str, Any] = dict.fromkeys(ERROR_FLAGS, False)
        errors |= {"model_grader_server_error_details": None,
                   "python_grader_runtime_error_details": None,
                   "python_grader_server_error_type": None}  # fmt: skip
        sub_rewards: dict[str, float] = {}
        tokens: dict[str, int] = {}
        grader = request.grader
        try:
            if isinstance(grader, Multi):
                for name, sub in grader.subgraders().items():
                    sub_rewards[name] = await self._one(sub, sample, request.item, tokens)
                reward = Formula(grader.calculate_output).evaluate(sub_rewards)
            else:
                reward = await self._one(grader, sample, request.item, tokens)
        except GraderFailed as exc:
            reward = 0.0
            errors[exc.flag] = True
            detail_key = {
                "python_grader_runtime_error": "python_grader_runtime_error_details",
                "model_grader_server_error": "model_grader_server_error_details",
            }.get(exc.flag)
            if detail_key is not None:
                errors[detail_key] = exc.details
        except ValueError:  # calculate_output divided by zero, or is not finite
            reward, errors["formula_parse_error"], errors["other_error"] = 0.0, True, True
        return {
            "reward": reward,
            "metadata": {
                "name": grader.name,
                "type": grader.type,
                "errors": errors,
                "execution_time": time.perf_counter() - started,
                "scores": dict(sub_rewards),
                "token_usage": sum(tokens.values()) or None,
                "sampled_model_name": None,
            },
            "sub_rewards": sub_rewards,
            "model_grader_token_usage_per_model": tokens,
        }

    async def _one(
        self, grader: Single, sample: dict[str, Any], item: Any, tokens: dict[str, int]
    ) -> float:
        if isinstance(grader, StringCheck):
            return _string_check(
                self._render(grader.input, sample, item),
                self._render(grader.reference, sample, item),
                grader.operation,
            )
        if isinstance(grader, TextSimilarity):
            score: float = _similarity()(
                self._render(grader.input, sample, item),
                self._render(grader.reference, sample, item),
                _METRICS[grader.evaluation_metric],
            )
            return score
        if isinstance(grader, Python):
            return await self._python(grader, sample, item)
        messages = [
            {"role": "system" if m.role == "developer" else m.role,
             "content": self._render(_text(m.content), sample, item)}
            for m in grader.input
        ]  # fmt: skip
        if isinstance(grader, ScoreModel):
            result = await self._score(grader.model, {"messages": messages})
            tokens[grader.model] = tokens.get(grader.model, 0) + _tokens(result)
            low, high = grader.range
            return max(low, min(high, float(result.score or 0.0)))
        result = await self._score(grader.model, {"messages": messages,
                                                  "candidates": grader.labels})  # fmt: skip
        tokens[grader.model] = tokens.get(grader.model, 0) + _tokens(result)
        chosen = grader.labels[ord(result.verdict or "A") - ord("A")]
        return 1.0 if chosen in grader.passing_labels else 0.0

    async def _score(self, model: str, item: dict[str, Any]) -> ItemResult:
        request = ScoreRequest.model_validate({"model": model, "items": [item]})
        (result,) = (await self._scoring.score(request)).results
        if result.error is not None:
            flag = "model_grader_parse_error" if result.error.type == "parse_error" else (
                "model_grader_server_error")  # fmt: skip
            raise GraderFailed(flag, f"{result.error.type}: {result.error.message}")
        return result

    async def _python(self, grader: Python, sample: dict[str, Any], item: Any) -> float:
        assert self._toolbox is not None
        program = (
            f"{grader.source}\n\nimport json as _json, sys as _sys\n"
            "_args = _json.loads(_sys.stdin.read())\n"
            "print('\\n' + _json.dumps(float(grade(_args['sample'], _args['item']))))\n"
        )
        stdin = json.dumps({"sample": sample, "item": item})
        result = await self._toolbox.call(
            "code_run", ToolCall(arguments={"code": program, "stdin": stdin})
        )
        if result.error is not None or result.output is None or result.output.data is None:
            details = result.error.message if result.error else "no output"
            raise GraderFailed("python_grader_server_error", details)
        run = result.output.data["run"]
        if run["status"] != "ok":
            raise GraderFailed("python_grader_runtime_error", f"{run['status']}: {run['stderr']}")
        try:
            return float(run["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise GraderFailed(
                "python_grader_runtime_error", "grade() returned no number"
            ) from None

    def _render(self, template: str, sample: dict[str, Any], item: Any) -> str:
        try:
            return self._templates.from_string(template).render(sample=sample, item=item)
        except TemplateError as exc:
            raise GraderFailed("invalid_variable_error", str(exc)) from None


def _string_check(text: str, reference: str, operation: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    pattern = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in reference)
    flags = re.IGNORECASE | re.DOTALL if operation == "ilike" else re.DOTALL
    return float(re.fullmatch(pattern, text, flags) is not None)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _text(content: str | list[dict[str, Any]] | dict[str, Any]) -> str:
    parts = content if isinstance(content, list) else [content]
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in parts)


def _tokens(result: ItemResult) -> int:
    return result.usage.prompt_tokens + result.usage.completion_tokens


def _similarity() -> Any:
    """The similarity verifier, imported on first use: a gateway without the verifiers extra
    serves every other grader."""
    try:
        from rmserve.models.verifiers.similarity import similarity
    except ImportError as exc:
        raise Unavailable(
            f"text_similarity graders need the verifiers extra (pip install 'rmserve[verifiers]'): "
            f"{exc}"
        ) from None
    return similarity
