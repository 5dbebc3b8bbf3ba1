"""How tests become sandbox runs, and how the host judges what came back.

A request's tests are planned into:

* **one calls run** holding every call check of every test: ``call`` tests, and ``code`` tests
  that `rmserve.sandbox.asserts` rewrote into call checks. The sandbox returns each value
  typed; the host decodes it (`rmserve.sandbox.values.decode`) and applies the check. A test
  passes when all of its checks pass.
* **one run per other test**: ``stdin``/``expected_stdout`` tests (output compared here) and
  in-process ``code`` tests (unsafe for RL; refused when ``in_process`` is ``"refuse"``).

Nothing the sandbox says is trusted beyond being a claim of what the program computed: the
expected values never enter the sandbox, and every comparison runs here on plain values.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rmserve.sandbox.asserts import CallCheck, Equals, rewrite_asserts
from rmserve.sandbox.values import decode, parse_literal
from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import CodeTest

InProcess = Literal["allow", "refuse"]
TestStatus = Literal[
    "ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "killed",
    "unserialisable",
]  # fmt: skip

_MEMORY_HINTS = ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")
_MEMORY_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
_VALUE_PREVIEW = 200
# A returned value's bounds: the sandbox refuses to encode more, the host to decode more.
VALUE_DEPTH = 100
VALUE_ITEMS = 100_000


@dataclass(frozen=True)
class CallOutcome:
    """What became of one call check."""

    status: TestStatus
    passed: bool
    detail: str


@dataclass
class Plan:
    calls: list[CallCheck] = field(default_factory=list)
    call_owner: list[int] = field(default_factory=list)  # test index of each call check
    separate: list[int] = field(default_factory=list)  # tests that get a run of their own

    @property
    def expressions(self) -> tuple[str, ...]:
        return tuple(check.expression for check in self.calls)

    def calls_of(self, test_index: int) -> list[int]:
        return [i for i, owner in enumerate(self.call_owner) if owner == test_index]


def plan_tests(tests: Sequence[CodeTest], in_process: InProcess) -> Plan:
    """Sort the tests into call checks and separate runs; ToolError("unsafe_test") for an
    in-process test when they are refused, ToolError("invalid_arguments") for test code that
    does not parse."""
    plan = Plan()
    for index, test in enumerate(tests):
        checks = _call_checks(index, test)
        if checks is not None:
            plan.calls += checks
            plan.call_owner += [index] * len(checks)
            continue
        if test.code is not None and test.code.strip() and in_process == "refuse":
            raise ToolError(
                "unsafe_test",
                f"tests[{index}] ({test.name or f'test_{index}'}): its `code` is not a plain "
                "assert of a call against a literal, so it would run in the program's own "
                "interpreter, where the program can forge it. Give it as "
                '{"call": ..., "expected": ...} or stdin/expected_stdout, or allow in-process '
                "tests (in_process_tests: allow) where the code is not an optimising policy's.",
            )
        plan.separate.append(index)
    return plan


def _call_checks(index: int, test: CodeTest) -> list[CallCheck] | None:
    if test.call is not None:
        if test.expected_literal is not None:
            expected, json_expected = parse_literal(test.expected_literal), False
        else:
            expected, json_expected = test.expected, True
        check = Equals(expected, json_expected, test.abs_tol, test.rel_tol)
        return [CallCheck(test.call, check, test.call)]
    if test.code is None or test.expected_stdout is not None or test.stdin is not None:
        return None
    try:
        checks = rewrite_asserts(test.code)
    except ValueError as exc:
        raise ToolError("invalid_arguments", f"tests[{index}].code: {exc}") from None
    return checks or None  # no assert at all: "the program runs to its end", in its own run


def judge_calls(
    calls: Sequence[CallCheck],
    records: Sequence[dict[str, Any]],
    fallback: TestStatus,
    stderr_tail: str,
    oom_killed: bool,
) -> list[CallOutcome]:
    """Each call check's outcome from the supervisor's records; ``fallback`` for calls the run
    never reached (it was killed from the host: wall clock, output flood)."""
    outcomes: dict[int, CallOutcome] = {}
    program: dict[str, Any] | None = None
    for record in records:
        index = record.get("call")
        if isinstance(index, int) and 0 <= index < len(calls) and index not in outcomes:
            outcomes[index] = _call_outcome(calls[index], record, oom_killed)
        elif isinstance(record.get("program"), dict) and program is None:
            program = record["program"]
    if program is not None:
        failed = _program_failure(program, stderr_tail, oom_killed)
    else:
        failed = CallOutcome(fallback, False, f"the run ended ({fallback}) before this call")
    return [outcomes.get(index, failed) for index in range(len(calls))]


def _call_outcome(check: CallCheck, record: dict[str, Any], oom_killed: bool) -> CallOutcome:
    claim = record.get("claim")
    if isinstance(claim, dict):
        if "value" in claim:
            try:
                value = decode(claim["value"], max_depth=VALUE_DEPTH, max_items=VALUE_ITEMS)
            except ValueError as exc:
                return CallOutcome("unserialisable", False, f"{check.source}: {exc}")
            passed = check.check.passed(value)
            detail = "" if passed else f"{check.source}: got {_preview(value)}"
            return CallOutcome("ok", passed, detail)
        if "unserialisable" in claim:
            return CallOutcome(
                "unserialisable", False, f"{check.source}: {claim['unserialisable']}"
            )
        raised = str(claim.get("raised", "an exception"))[:200]
        status: TestStatus = "memory_limit" if raised == "MemoryError" else "error"
        return CallOutcome(status, False, f"{check.source}: raised {raised}")
    status_text = record.get("status")
    if status_text == "timeout":
        return CallOutcome("timeout", False, f"{check.source}: timed out")
    if status_text == "value_limit":
        return CallOutcome("output_limit", False, f"{check.source}: the value is too large")
    sig, exit_code = _optional_int(record.get("signal")), _optional_int(record.get("exit_code"))
    status = _crash_status(sig, exit_code, oom_killed)
    return CallOutcome(status, False, f"{check.source}: the process ended ({_ending(record)})")


def _program_failure(program: dict[str, Any], stderr_tail: str, oom_killed: bool) -> CallOutcome:
    if program.get("status") == "timeout":
        return CallOutcome("timeout", False, "the program timed out before the tests")
    sig, exit_code = _optional_int(program.get("signal")), _optional_int(program.get("exit_code"))
    if exit_code == 0:
        return CallOutcome("error", False, "the program exited before the tests ran")
    if sig is None and _ran_out_of_memory(exit_code, sig, stderr_tail):
        return CallOutcome("memory_limit", False, "the program ran out of memory")
    status = _crash_status(sig, exit_code, oom_killed)
    last = stderr_tail.strip().splitlines()[-1:] or [_ending(program)]
    return CallOutcome(status, False, f"the program failed before the tests: {last[0][:300]}")


def _crash_status(sig: int | None, exit_code: int | None, oom_killed: bool) -> TestStatus:
    if sig == signal.SIGXCPU:
        return "cpu_limit"
    if sig == signal.SIGKILL and oom_killed:
        return "memory_limit"
    if sig is not None:
        return "killed"
    return "error" if exit_code != 0 else "ok"


def _ending(record: dict[str, Any]) -> str:
    if record.get("signal") is not None:
        return f"signal {record['signal']}"
    return f"exit code {record.get('exit_code')}"


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_PREVIEW else text[:_VALUE_PREVIEW] + "..."


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def signal_from_returncode(returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    return returncode - 128 if returncode > 128 else None


def _ran_out_of_memory(exit_code: int | None, sig: int | None, stderr_tail: str) -> bool:
    lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
    last_line = lines[-1] if lines else ""
    if exit_code not in (None, 0) and (
        last_line == "MemoryError" or last_line.startswith("MemoryError:")
    ):
        return True
    return sig in _MEMORY_SIGNALS and any(hint in stderr_tail for hint in _MEMORY_HINTS)


def run_status(
    final: dict[str, Any] | None,
    *,
    timed_out: bool,
    output_overflowed: bool,
    returncode: int,
    cpu_rlimit_s: int,
    stderr_tail: str,
    oom_killed: bool,
) -> tuple[TestStatus, int | None, int | None]:
    """(status, exit_code, signal) of a program run from the supervisor's final record.
    Checked in this order: output_limit, timeout, killed supervisor, cpu_limit, memory_limit,
    killed, ok/error."""
    killed = int(signal.SIGKILL)
    if output_overflowed:
        return "output_limit", None, killed
    if timed_out:
        return "timeout", None, killed
    if final is None:  # the supervisor itself was killed (the run's OOM killer may pick it)
        return (
            ("memory_limit" if oom_killed else "killed"),
            None,
            signal_from_returncode(returncode),
        )
    exit_code, sig = _optional_int(final.get("exit_code")), _optional_int(final.get("signal"))
    cpu_s = final.get("cpu_s")
    used_cpu = float(cpu_s) if isinstance(cpu_s, int | float) else 0.0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and used_cpu >= cpu_rlimit_s):
        return "cpu_limit", None, sig
    if _ran_out_of_memory(exit_code, sig, stderr_tail) or (sig == killed and oom_killed):
        return "memory_limit", exit_code, sig
    if sig is not None:
        return "killed", None, sig
    return ("ok" if exit_code == 0 else "error"), exit_code, None


def normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()
