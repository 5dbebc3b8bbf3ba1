"""The tools, run in this process: argument checking, dispatch, evidence, metrics.

`LocalToolbox` is what the sidecar serves over HTTP, and what embedded mode calls directly.
Quick tools (calculator, instruction checks, crop, search) run in worker threads with a time
bound; code runs only inside bubblewrap (`sandbox.code_run`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rmserve.sandbox.calculator import CalculatorArguments, calculate, format_result
from rmserve.sandbox.checks import CheckArguments, run_check
from rmserve.sandbox.code_run import CodeResult, CodeRunner, Limits
from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.crop import CropArguments, crop, image_from_data_url, image_to_data_url
from rmserve.sandbox.grading import plan_tests
from rmserve.sandbox.metrics import SandboxMetrics
from rmserve.sandbox.search import SearchArguments, SearchIndex
from rmserve.wire.errors import ToolError
from rmserve.wire.tools import (
    ToolCall,
    ToolContext,
    ToolErrorBody,
    ToolOutput,
    ToolResult,
    ToolSpec,
)
from rmserve.wire.trajectory import CodeTest, Document

log = logging.getLogger(__name__)

TOOL_NAMES = ("crop", "search", "code_run", "calculator", "instruction_check")


class CodeRunArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=100_000, description="a Python 3 program")
    language: Literal["python"] = "python"
    stdin: str = Field(default="", max_length=1_000_000, description="the program's input")
    tests: list[CodeTest] = Field(
        default_factory=list,
        max_length=100,
        description="`call` with `expected` (all calls run in one sandbox; values compared on "
        "the host), `stdin` with `expected_stdout` (compared on the host), or `code` run after "
        "the program (plain asserts of calls are rewritten into call tests; other code runs "
        "in the program's interpreter, which the program can subvert)",
    )
    in_process_tests: Literal["allow", "refuse"] = Field(
        default="allow",
        description="refuse: reject `code` tests that would run in the program's interpreter "
        "(422), for code written by an optimising policy",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="wall-clock seconds per run, and per call"
    )
    memory_mb: int | None = Field(
        default=None, ge=16, description="memory of the run (per process without a cgroup)"
    )


Handler = Callable[[Any, ToolContext], Awaitable[ToolOutput]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    arguments: type[BaseModel]
    handler: Handler

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.name,
            description=self.description,
            parameters=self.arguments.model_json_schema(),
        )


class LocalToolbox:
    def __init__(self, settings: SandboxSettings, metrics: SandboxMetrics | None = None) -> None:
        unknown = sorted(set(settings.tools) - set(TOOL_NAMES))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {', '.join(TOOL_NAMES)}")
        self._settings = settings
        self.metrics = metrics or SandboxMetrics()
        self.code: CodeRunner | None = None
        if "code_run" in settings.tools:
            self.code = CodeRunner(
                Limits(
                    cpu_s=settings.code_cpu_s,
                    wall_s=settings.code_wall_s,
                    memory_mb=settings.code_memory_mb,
                    processes=settings.code_processes,
                    file_size_mb=settings.code_file_size_mb,
                    output_bytes=settings.code_output_bytes,
                ),
                max_concurrency=settings.code_concurrency,
                max_queued=settings.code_max_queued,
                bwrap=settings.bwrap,
                allow_unsafe=settings.allow_unsafe_code,
                mount_proc=settings.mount_proc,
                cgroup_parent=settings.cgroup_parent,
            )
            self.metrics.watch(self.code)
        self._corpus = _load_corpus(settings.corpus) if settings.corpus else None
        every = {
            "crop": Tool(
                "crop",
                "Zoom into a region of an image to check small details. Returns the region, "
                "upscaled, as a new image. bbox_2d is [x1, y1, x2, y2] in 0-1000 coordinates "
                "relative to the image's width and height.",
                CropArguments,
                self._crop,
            ),
            "search": Tool(
                "search",
                "Search the documents supplied with the conversation (BM25). Returns the best "
                "passages with their ids.",
                SearchArguments,
                self._search,
            ),
            "code_run": Tool(
                "code_run",
                "Run a Python program in an isolated sandbox (no network, time and memory "
                "limits), optionally with tests. Returns exit status, stdout, stderr and per-test "
                "pass/fail.",
                CodeRunArguments,
                self._code_run,
            ),
            "calculator": Tool(
                "calculator",
                "Evaluate an arithmetic expression exactly: + - * / // % ** (or ^), "
                "parentheses, sqrt, log, exp, trigonometry, factorial, comb, gcd, pi, e.",
                CalculatorArguments,
                self._calculate,
            ),
            "instruction_check": Tool(
                "instruction_check",
                "Check text against an instruction: word_count, paragraph_count, json_valid or "
                "regex_match.",
                CheckArguments,
                self._check,
            ),
        }
        self._tools = {name: every[name] for name in TOOL_NAMES if name in settings.tools}

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    async def specs(self) -> list[ToolSpec]:
        return [tool.spec() for tool in self._tools.values()]

    def parse(self, name: str, arguments: dict[str, Any]) -> BaseModel:
        """The tool's checked arguments; ToolError not_found / invalid_arguments."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            raise ToolError("not_found", f"no tool named {name!r} (tools: {known})")
        try:
            parsed = tool.arguments.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ToolError("invalid_arguments", problems) from None
        if isinstance(parsed, CodeRunArguments) and parsed.tests:
            try:  # refused in-process tests and test code that does not parse: bad input
                plan_tests(parsed.tests, parsed.in_process_tests)
            except ToolError as exc:
                raise ToolError("invalid_arguments", f"{exc.code}: {exc.message}") from None
        return parsed

    async def call(self, name: str, call: ToolCall) -> ToolResult:
        started = time.perf_counter()
        try:
            arguments = self.parse(name, call.arguments)
            output = await self._tools[name].handler(arguments, call.context)
        except ToolError as exc:
            result = ToolResult(tool=name, error=ToolErrorBody(type=exc.code, message=exc.message))
        except Exception as exc:  # a bug in a tool is that call's error, not the sidecar's
            log.exception("tool %s failed", name)
            error = ToolErrorBody(type="internal_error", message=f"{type(exc).__name__}: {exc}")
            result = ToolResult(tool=name, error=error)
        else:
            result = ToolResult(tool=name, output=output)
        result.elapsed_s = time.perf_counter() - started
        self.metrics.observe(result, known=name in self._tools)
        return result

    # -- tools -----------------------------------------------------------------------------

    async def _crop(self, arguments: CropArguments, context: ToolContext) -> ToolOutput:
        images = context.images
        if not 0 <= arguments.image < len(images):
            raise ToolError(
                "invalid_arguments",
                f"image: {arguments.image} is not an available image (0 to {len(images) - 1})"
                if images
                else "image: the conversation has no images to crop",
            )

        def work() -> ToolOutput:
            source = image_from_data_url(images[arguments.image], self._settings.max_image_pixels)
            region = crop(source, arguments.bbox_2d)
            return ToolOutput(
                text=f"crop of image {arguments.image} at {list(arguments.bbox_2d)}: "
                f"{region.width}x{region.height} pixels",
                images=[image_to_data_url(region)],
            )

        return await asyncio.to_thread(work)

    async def _search(self, arguments: SearchArguments, context: ToolContext) -> ToolOutput:
        def work() -> ToolOutput:
            index = SearchIndex(context.documents) if context.documents else self._corpus
            if index is None:
                raise ToolError(
                    "not_found",
                    "no documents to search: give the item `documents` (or configure a corpus)",
                )
            passages = index.search(arguments.query, arguments.top_k)
            text = "\n\n".join(f"[{p.id}] {p.text}" for p in passages) or "no passage matches"
            return ToolOutput(text=text, data={"passages": [asdict(p) for p in passages]})

        return await asyncio.to_thread(work)

    async def _code_run(self, arguments: CodeRunArguments, _: ToolContext) -> ToolOutput:
        if self.code is None:
            raise ToolError("not_found", "code_run is not enabled")
        limits = self.code.limits  # the runner clamps what a call asks for to its own limits
        limits = replace(
            limits,
            wall_s=arguments.timeout_s or limits.wall_s,
            cpu_s=arguments.timeout_s or limits.cpu_s,
            memory_mb=arguments.memory_mb or limits.memory_mb,
        )
        result = await self.code.run(
            arguments.code, arguments.stdin, arguments.tests, limits, arguments.in_process_tests
        )
        self.metrics.count_kills(result)
        return ToolOutput(text=code_summary(result), data=asdict(result))

    async def _calculate(self, arguments: CalculatorArguments, _: ToolContext) -> ToolOutput:
        value = await self._quick(lambda: calculate(arguments.expression))
        return ToolOutput(text=format_result(value), data={"value": value})

    async def _check(self, arguments: CheckArguments, _: ToolContext) -> ToolOutput:
        result = await self._quick(lambda: run_check(arguments))
        verdict = "passed" if result.passed else "failed"
        return ToolOutput(text=f"{verdict}: {result.detail}", data=asdict(result))

    async def _quick(self, work: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(work), self._settings.quick_tool_timeout_s
            )
        except TimeoutError:
            raise ToolError(
                "timeout", f"gave up after {self._settings.quick_tool_timeout_s:g} s"
            ) from None


def code_summary(result: CodeResult) -> str:
    """What the judge reads of a code run: status, output excerpts, tests passed."""
    lines = []
    if result.run is not None:
        run = result.run
        lines.append(f"status: {run.status} (exit code {run.exit_code}, {run.wall_s:.2f} s)")
        if run.stdout:
            lines.append(f"stdout:\n{run.stdout}")
        if run.stderr:
            lines.append(f"stderr:\n{run.stderr}")
    if result.tests:
        lines.append(f"tests: {result.passed} passed, {result.failed} failed")
        for test in result.tests:
            mark = "PASS" if test.passed else f"FAIL ({test.status}) {test.detail}".rstrip()
            lines.append(f"- {test.name}: {mark}")
    return "\n".join(lines)


def _load_corpus(path: Path) -> SearchIndex:
    documents = TypeAdapter(list[Document]).validate_python(
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    )
    return SearchIndex(documents)
