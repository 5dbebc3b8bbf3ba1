"""Verifier kinds as reward models: rule-based rewards that need no weights, so they serve on the
embedded default too. Each checks one part of the response (`extract`): the final assistant
message, the last `\\boxed{}` in it, its last fenced code block, or every assistant turn.

  math        1.0 if the answer equals the item's `reference` (math-verify), else 0.0
  code_tests  the share of the item's `tests` the code passes in the sandbox (or all-or-nothing)
  format      regex, required tags, JSON validity / schema: all checks, or the share passed
  similarity  exact, fuzzy, BLEU, chrF or ROUGE against the `reference`, in [0, 1]
  composite   a formula over other models' rewards, computed concurrently by their workers

The explanation goes to the result's `critique`; a response with nothing to check (no box, no
code block) scores 0.0 with that reason, as a wrong answer would.
"""

from __future__ import annotations

import asyncio
import time

from rmserve.models.base import PeerScorer, RequestOptions, Reward
from rmserve.models.formula import Formula
from rmserve.models.spec import (
    CodeTestsSpec,
    CompositeSpec,
    Extract,
    FormatSpec,
    MathSpec,
    SimilaritySpec,
)
from rmserve.models.verifiers.extract import extract
from rmserve.models.verifiers.format import check_format, compile_regex, compile_schema
from rmserve.models.verifiers.math import MathVerifyFailed, verify_math_async
from rmserve.models.verifiers.similarity import similarity
from rmserve.wire.errors import ItemError
from rmserve.wire.tools import Toolbox, ToolCall
from rmserve.wire.trajectory import AssistantMessage, Trajectory, text_of

# How long composite inputs may take when the request gives no deadline.
PEER_TIMEOUT_S = 300.0


def response_part(item: Trajectory, how: Extract) -> str | None:
    """The checked text; ItemError when the item has no assistant response."""
    if item.candidates:
        raise ItemError("unsupported_content", "verifiers score one response; drop `candidates`")
    turns = [text_of(m.content) for m in item.messages if isinstance(m, AssistantMessage)]
    if not turns:
        raise ItemError("no_response", "the item has no assistant message to check")
    return extract("\n\n".join(turns) if how == "full" else turns[-1], how)


def _reference(item: Trajectory, kind: str) -> str:
    if item.reference is None:
        raise ItemError(
            "missing_reference", f"{kind} verifiers compare with the item's `reference`"
        )
    return item.reference


def _nothing(how: Extract) -> Reward:
    what = {"boxed": "no \\boxed{} answer", "code_block": "no fenced code block"}.get(how, "")
    return Reward(score=0.0, critique=f"{what or 'nothing'} in the response")


class _Verifier:
    max_model_len = 0

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind

    def shutdown(self) -> None:
        return None


class MathVerifier(_Verifier):
    def __init__(self, spec: MathSpec) -> None:
        super().__init__(spec.name, spec.kind)
        self._options = spec.options

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        reference = _reference(item, "math")
        answer = response_part(item, self._options.extract)
        if answer is None:
            return _nothing(self._options.extract)
        try:
            verdict = await verify_math_async(answer, reference, self._options.timeout_s)
        except MathVerifyFailed as exc:
            raise ItemError("verifier_error", str(exc)) from None
        return Reward(score=1.0 if verdict.correct else 0.0, critique=verdict.detail)


class FormatVerifier(_Verifier):
    def __init__(self, spec: FormatSpec) -> None:
        super().__init__(spec.name, spec.kind)
        self._options = spec.options
        if spec.options.regex is not None:
            compile_regex(spec.options.regex)  # ValueError: refused at load time
        if spec.options.json_schema is not None:
            compile_schema(spec.options.json_schema)

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        text = response_part(item, self._options.extract)
        if text is None:
            return _nothing(self._options.extract)
        o = self._options
        checks = await asyncio.to_thread(
            check_format,
            text,
            regex=o.regex,
            regex_mode=o.regex_mode,
            required_tags=o.required_tags,
            json_valid=o.json_valid,
            json_schema=o.json_schema,
        )
        passed = sum(check.passed for check in checks)
        score = passed / len(checks) if o.reward == "fraction" else float(passed == len(checks))
        detail = "; ".join(f"{c.name}: {'ok' if c.passed else c.detail}" for c in checks)
        return Reward(score=score, scores=[float(c.passed) for c in checks], critique=detail)


class SimilarityVerifier(_Verifier):
    def __init__(self, spec: SimilaritySpec) -> None:
        super().__init__(spec.name, spec.kind)
        self._options = spec.options

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        reference = _reference(item, "similarity")
        text = response_part(item, self._options.extract)
        if text is None:
            return _nothing(self._options.extract)
        o = self._options
        value = await asyncio.to_thread(
            similarity,
            text,
            reference,
            o.metric,
            case_sensitive=o.case_sensitive,
            normalize_whitespace=o.normalize_whitespace,
        )
        return Reward(score=value, critique=f"{o.metric} similarity to the reference")


class CodeTestsVerifier(_Verifier):
    def __init__(self, spec: CodeTestsSpec, toolbox: Toolbox) -> None:
        super().__init__(spec.name, spec.kind)
        self._options, self._toolbox = spec.options, toolbox

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        if not item.tests:
            raise ItemError("missing_tests", "code_tests verifiers run the item's `tests`")
        code = response_part(item, self._options.extract)
        if code is None or not code.strip():
            return _nothing(self._options.extract)
        arguments: dict[str, object] = {
            "code": code,
            "tests": [test.model_dump(exclude_unset=True) for test in item.tests],
            "in_process_tests": self._options.in_process_tests,
        }
        if self._options.timeout_s is not None:
            arguments["timeout_s"] = self._options.timeout_s
        result = await self._toolbox.call("code_run", ToolCall(arguments=arguments))
        if result.error is not None:
            if result.error.type == "invalid_arguments":
                unsafe = result.error.message.startswith("unsafe_test")
                raise ItemError("unsafe_test" if unsafe else "invalid_tests", result.error.message)
            raise ItemError("sandbox_error", f"{result.error.type}: {result.error.message}")
        assert result.output is not None and result.output.data is not None
        tests = result.output.data["tests"]
        passed = [bool(test["passed"]) for test in tests]
        if self._options.reward == "all_pass":
            score = float(all(passed))
        else:
            score = sum(passed) / len(passed)
        return Reward(score=score, scores=[float(p) for p in passed], critique=result.output.text)


class CompositeReward(_Verifier):
    def __init__(self, spec: CompositeSpec, peers: PeerScorer) -> None:
        super().__init__(spec.name, spec.kind)
        self._formula = Formula(spec.options.formula)  # the registry checked it and its inputs
        self._inputs = {v: spec.options.inputs.get(v, v) for v in self._formula.variables}
        self._peers = peers

    async def score(self, item: Trajectory, options: RequestOptions) -> Reward:
        deadline = options.deadline or time.time() + PEER_TIMEOUT_S
        variables = list(self._inputs)
        scores = await asyncio.gather(
            *(self._peers.score(self._inputs[v], [item], deadline) for v in variables)
        )
        values = {variable: score for variable, (score,) in zip(variables, scores, strict=True)}
        try:
            total = self._formula.evaluate(values)
        except ValueError as exc:
            raise ItemError("formula_error", str(exc)) from None
        return Reward(score=total, components=values, critique=self._formula.text)
