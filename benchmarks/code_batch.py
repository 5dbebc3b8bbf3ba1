"""The GRPO code batch and the runner-level code_run latency of benchmarks/tool_latency.py.

A batch is what one GRPO step asks of the `unit-tests` verifier: N responses (default 64) to
eight small problems (functions over ints and lists), each with T tests (default 10) written as
``assert f(x) == y``. Per 64 responses: 32 correct (four cosmetic variants of one solution per
problem), 24 wrong (two plausible bugs per problem and a hard-coded answer) and 8 that raise
(on some inputs, or at import: an ImportError, a NameError, a failing self-check). Expected
values come from reference implementations run here.

Every path runs the same batch at the same concurrency (sandboxes, or plain processes, at
once) under the same limits, and must give the same per-test verdicts:

  today      the runner of commit 53ffbbd (a sandbox per test), loaded from git
  after      the current CodeRunner: the asserts as ``CodeTest(code=...)`` (rewritten into call
             tests: one sandbox per response), and as ``CodeTest(call=..., expected=...)``
  verifier   CodeTestsVerifier (unit-tests: code_block, fraction) over an in-process
             LocalToolbox (embedded mode), Trajectory items scored with asyncio.gather
  plain      ``python -I -B -S -c`` without sandbox (the base interpreter, as the sandbox
             starts it): the response and its asserts in one process
             per response, and in one process per test (only the wall clock is limited)
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.abc
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from rmserve.models.base import RequestOptions
from rmserve.models.spec import CodeTestsSpec
from rmserve.models.verifiers.rewards import CodeTestsVerifier
from rmserve.sandbox.code_run import CodeRunner, Limits
from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.tools import LocalToolbox
from rmserve.wire.trajectory import AssistantMessage, CodeTest, Trajectory, UserMessage

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "53ffbbd"
OLD_PATH = "sandbox/code_run.py"
# The limits of every path (the verifier's timeout_s sets wall_s and cpu_s, as unit-tests does).
LIMITS = Limits(cpu_s=5, wall_s=5, memory_mb=512, processes=32, file_size_mb=16)
MAX_TESTS = 10
LATENCY_TARGET = 1.20  # new runner p50 / old runner p50, a program without tests
_PLAIN_MARK = "@@rmserve-bench verdicts@@ "


# ----------------------------------------------------------------------------------------------
# The batch.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    function: str
    reference: Callable[..., object]
    inputs: list[tuple[object, ...]]
    correct: str
    wrong: tuple[str, str]
    raising: str


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _max_subarray(xs: list[int]) -> int:
    best = current = xs[0]
    for x in xs[1:]:
        current = max(x, current + x)
        best = max(best, current)
    return best


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _rotate(xs: list[int], k: int) -> list[int]:
    if not xs:
        return []
    k %= len(xs)
    return xs[k:] + xs[:k]


def _dedupe(xs: list[int]) -> list[int]:
    return list(dict.fromkeys(xs))


PROBLEMS = [
    Problem(
        "fib",
        _fib,
        [(0,), (1,), (2,), (3,), (5,), (8,), (10,), (15,), (20,), (30,)],
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n",
        (
            "def fib(n):\n    a, b = 1, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
            "    return a\n",
            "def fib(n):\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n"
            "    return a\n",
        ),
        "_MEMO = [0, 1] + [0] * 14\n\n\ndef fib(n):\n    for i in range(2, n + 1):\n"
        "        _MEMO[i] = _MEMO[i - 1] + _MEMO[i - 2]\n    return _MEMO[n]\n",
    ),
    Problem(
        "sum_even",
        lambda xs: sum(x for x in xs if x % 2 == 0),
        [
            ([],),
            ([1, 2, 3, 4],),
            ([2, 2, 2],),
            ([-2, -3, 5],),
            ([7],),
            ([0],),
            (list(range(10)),),
            ([10, -10, 3],),
            ([1, 3, 5, 7],),
            ([100, 1, -4],),
        ],
        "def sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)\n",
        (
            "def sum_even(xs):\n    return sum(x for x in xs if x > 0 and x % 2 == 0)\n",
            "def sum_even(xs):\n    return sum(xs[::2])\n",
        ),
        "from functools import reduce\n\n\ndef sum_even(xs):\n"
        "    return reduce(lambda a, b: a + b, [x for x in xs if x % 2 == 0])\n",
    ),
    Problem(
        "max_subarray",
        _max_subarray,
        [
            ([1],),
            ([-1],),
            ([1, -2, 3, 4],),
            ([-3, -1, -2],),
            ([2, 2, -1, 2],),
            ([5, -9, 6],),
            ([0, 0],),
            ([-2, 1, -3, 4, -1, 2, 1, -5, 4],),
            ([3, -1, -1, 3],),
            ([-5],),
        ],
        "def max_subarray(xs):\n    best = current = xs[0]\n    for x in xs[1:]:\n"
        "        current = max(x, current + x)\n        best = max(best, current)\n"
        "    return best\n",
        (
            "def max_subarray(xs):\n    best = current = 0\n    for x in xs:\n"
            "        current = max(0, current + x)\n        best = max(best, current)\n"
            "    return best\n",
            "def max_subarray(xs):\n    return max(xs)\n",
        ),
        "def max_subarray(xs):\n    best = current = xs[0]\n    for x in xs[1:]:\n"
        "        current = max(x, current + x)\n        best = max(best, current)\n"
        "    return best\n\n\nprint(max_subarray(nums))\n",
    ),
    Problem(
        "is_prime",
        _is_prime,
        [(0,), (1,), (2,), (3,), (4,), (17,), (21,), (97,), (-7,), (7919,)],
        "import math\n\n\ndef is_prime(n):\n    if n < 2:\n        return False\n"
        "    return all(n % d for d in range(2, math.isqrt(n) + 1))\n",
        (
            "def is_prime(n):\n    if n < 1:\n        return False\n"
            "    for d in range(2, n):\n        if n % d == 0:\n            return False\n"
            "    return True\n",
            "def is_prime(n):\n    if n < 2:\n        return False\n"
            "    return all(n % d for d in range(2, int(n ** 0.5)))\n",
        ),
        "import math\n\n\ndef is_prime(n):\n    for d in range(2, math.isqrt(n) + 1):\n"
        "        if n % d == 0:\n            return False\n    return n > 1\n",
    ),
    Problem(
        "rotate",
        _rotate,
        [
            ([1, 2, 3, 4, 5], 2),
            ([1, 2, 3], 0),
            ([1, 2, 3], 3),
            ([1, 2, 3], 4),
            ([7], 5),
            ([], 3),
            ([1, 2], 1),
            ([4, 5, 6, 7], -1),
            ([1, 2, 3, 4, 5, 6], 10),
            ([9, 8, 7], 1),
        ],
        "def rotate(xs, k):\n    if not xs:\n        return []\n    k %= len(xs)\n"
        "    return xs[k:] + xs[:k]\n",
        (
            "def rotate(xs, k):\n    if not xs:\n        return []\n    k %= len(xs)\n"
            "    return xs[len(xs) - k:] + xs[:len(xs) - k]\n",
            "def rotate(xs, k):\n    return xs[k:] + xs[:k]\n",
        ),
        "def rotate(xs, k):\n    k %= len(xs)\n    return xs[k:] + xs[:k]\n",
    ),
    Problem(
        "digit_sum",
        lambda n: sum(int(c) for c in str(abs(n))),
        [(0,), (7,), (10,), (99,), (12345,), (-48,), (1000000,), (-1,), (987654321,), (5050,)],
        "def digit_sum(n):\n    return sum(int(c) for c in str(abs(n)))\n",
        (
            "def digit_sum(n):\n    return sum(int(c) for c in str(n))\n",
            "def digit_sum(n):\n    return n % 9\n",
        ),
        "from typing import override\n\n\ndef digit_sum(n):\n"
        "    return sum(int(c) for c in str(abs(n)))\n",
    ),
    Problem(
        "dedupe",
        _dedupe,
        [
            ([],),
            ([1, 1, 1],),
            ([1, 2, 1, 3, 2],),
            ([3, 2, 1],),
            ([5, 5, 4, 4, 3],),
            ([0, -1, 0, -1],),
            ([2],),
            ([1, 2, 3, 4],),
            ([9, 8, 9, 7, 8, 6],),
            ([4, 4, 1, 1, 4],),
        ],
        "def dedupe(xs):\n    seen = set()\n    out = []\n    for x in xs:\n"
        "        if x not in seen:\n            seen.add(x)\n            out.append(x)\n"
        "    return out\n",
        (
            "def dedupe(xs):\n    return sorted(set(xs))\n",
            "def dedupe(xs):\n"
            "    return [x for i, x in enumerate(xs) if i == 0 or x != xs[i - 1]]\n",
        ),
        "def dedupe(xs):\n    out = [xs[0]]\n    for x in xs[1:]:\n        if x not in out:\n"
        "            out.append(x)\n    return out\n",
    ),
    Problem(
        "gcd_list",
        lambda xs: reduce(math.gcd, xs, 0),
        [
            ([12, 18],),
            ([7],),
            ([0, 5],),
            ([100, 75, 50],),
            ([17, 34, 51],),
            ([9, 28],),
            ([-4, 6],),
            ([0, 0],),
            ([48, 180, 300],),
            ([2**20, 2**12],),
        ],
        "import math\nfrom functools import reduce\n\n\ndef gcd_list(xs):\n"
        "    return reduce(math.gcd, xs, 0)\n",
        (
            "def gcd_list(xs):\n    return min(xs)\n",
            "import math\n\n\ndef gcd_list(xs):\n    return math.gcd(xs[0], xs[1])\n",
        ),
        "import math\nfrom functools import reduce\n\n\ndef gcd_list(xs):\n"
        "    return reduce(math.gcd, xs)\n\n\nassert gcd_list([]) == 0\n",
    ),
]

# The eight variants of a problem's response; the batch walks the problem x variant grid.
VARIANTS = (
    "correct", "wrong-1", "correct-docstring", "raises", "correct-main", "wrong-2",
    "correct-import", "hard-coded",
)  # fmt: skip


@dataclass(frozen=True)
class Item:
    problem: str
    variant: str
    code: str
    asserts: list[str]
    calls: list[tuple[str, object]]  # (call, expected value)

    @property
    def response(self) -> str:
        """The policy's answer as a chat message: the code in a fenced block."""
        return (
            f"Here is `{self.problem}`:\n\n```python\n{self.code}```\n\n"
            "It handles the edge cases in the statement."
        )


def _call(function: str, args: tuple[object, ...]) -> str:
    return f"{function}({', '.join(repr(arg) for arg in args)})"


def _variant_code(problem: Problem, variant: str) -> str:
    first = _call(problem.function, problem.inputs[0])
    match variant:
        case "correct":
            return problem.correct
        case "correct-docstring":
            return f'"""Solution to `{problem.function}`."""\n\n' + problem.correct
        case "correct-main":
            return problem.correct + f'\n\nif __name__ == "__main__":\n    print({first})\n'
        case "correct-import":
            return "import sys\n\nsys.setrecursionlimit(10_000)\n\n" + problem.correct
        case "wrong-1":
            return problem.wrong[0]
        case "wrong-2":
            return problem.wrong[1]
        case "raises":
            return problem.raising
        case "hard-coded":
            answer = problem.reference(*problem.inputs[0])
            return f"def {problem.function}(*args):\n    return {answer!r}\n"
    raise ValueError(variant)


def batch(responses: int, tests: int) -> list[Item]:
    """``responses`` items over the problem x variant grid (64: each pair once); fewer than
    ten tests are spread over each problem's inputs."""
    if not 1 <= tests <= MAX_TESTS:
        raise ValueError(f"1 to {MAX_TESTS} tests per response")
    items = []
    for index in range(responses):
        problem = PROBLEMS[index % len(PROBLEMS)]
        variant = VARIANTS[(index + index // len(PROBLEMS)) % len(VARIANTS)]
        spread = [problem.inputs[i * len(problem.inputs) // tests] for i in range(tests)]
        calls = [(_call(problem.function, args), problem.reference(*args)) for args in spread]
        asserts = [f"assert {call} == {expected!r}" for call, expected in calls]
        items.append(
            Item(problem.function, variant, _variant_code(problem, variant), asserts, calls)
        )
    return items


def describe(items: Sequence[Item]) -> str:
    kinds = [item.variant.split("-")[0] for item in items]
    wrong = kinds.count("wrong") + kinds.count("hard")
    return f"{kinds.count('correct')} correct, {wrong} wrong, {kinds.count('raises')} raising"


# ----------------------------------------------------------------------------------------------
# The runner of commit 53ffbbd.
# ----------------------------------------------------------------------------------------------


class _GitSourceLoader(importlib.abc.InspectLoader):
    """Serves one module's source held in memory; inspect.getsource works on its functions (the
    old runner ships its in-sandbox harness as their source)."""

    def __init__(self, source: str, filename: str) -> None:
        self._source, self._filename = source, filename

    def get_source(self, fullname: str) -> str:
        return self._source

    def get_code(self, fullname: str) -> CodeType:
        return compile(self._source, self._filename, "exec", dont_inherit=True)

    def is_package(self, fullname: str) -> bool:
        return False


def load_old_runner() -> ModuleType | str:
    """``sandbox/code_run.py`` of commit 53ffbbd as a module, or why it is unavailable."""
    try:
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:{OLD_PATH}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"git is not available ({exc})"
    if shown.returncode != 0:
        return f"git show {OLD_COMMIT}:{OLD_PATH} failed: {shown.stderr.strip()[:300]}"
    name = f"rmserve_benchmark_code_run_{OLD_COMMIT}"
    loader = _GitSourceLoader(shown.stdout, f"git-{OLD_COMMIT}/{OLD_PATH}")
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        return f"the runner of {OLD_COMMIT} does not import: {type(exc).__name__}: {exc}"
    return module


def old_runner(old: ModuleType, concurrency: int, max_queued: int) -> Any:
    limits = old.Limits(**dataclasses.asdict(LIMITS))
    return old.CodeRunner(limits, max_concurrency=concurrency, max_queued=max_queued)


# ----------------------------------------------------------------------------------------------
# The paths. Each returns every item's per-test verdicts.
# ----------------------------------------------------------------------------------------------

Verdicts = list[list[bool]]


@dataclass(frozen=True)
class Outcome:
    label: str
    seconds: float
    verdicts: Verdicts


async def _timed(label: str, work: Awaitable[Verdicts]) -> Outcome:
    started = time.perf_counter()
    verdicts = await work
    return Outcome(label, time.perf_counter() - started, verdicts)


async def _old_path(runner: Any, items: Sequence[Item]) -> Verdicts:
    async def one(item: Item) -> list[bool]:
        result = await runner.run(item.code, tests=[CodeTest(code=a) for a in item.asserts])
        return [bool(test.passed) for test in result.tests]

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _new_path(runner: CodeRunner, items: Sequence[Item], form: str) -> Verdicts:
    async def one(item: Item) -> list[bool]:
        if form == "code":
            tests = [CodeTest(code=a) for a in item.asserts]
        else:
            tests = [CodeTest(call=call, expected=value) for call, value in item.calls]
        # refuse: every assert must have become a call test (none runs in-process)
        result = await runner.run(item.code, tests=tests, in_process="refuse")
        return [test.passed for test in result.tests]

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _verifier_path(verifier: CodeTestsVerifier, items: Sequence[Item]) -> Verdicts:
    trajectories = [
        Trajectory(
            messages=[
                UserMessage(role="user", content=f"Write `{item.problem}` in Python."),
                AssistantMessage(role="assistant", content=item.response),
            ],
            tests=[CodeTest(code=a) for a in item.asserts],
        )
        for item in items
    ]
    rewards = await asyncio.gather(
        *(verifier.score(trajectory, RequestOptions()) for trajectory in trajectories)
    )
    verdicts = []
    for item, reward in zip(items, rewards, strict=True):
        scores = reward.scores or [0.0] * len(item.asserts)
        verdicts.append([score == 1.0 for score in scores])
        assert math.isclose(reward.score, sum(verdicts[-1]) / len(scores)), reward
    return verdicts


def _plain_script(item: Item) -> str:
    """The response, then each assert in turn (a failure does not stop the others), then one
    line of verdicts; a program that fails before it prints none."""
    return (
        item.code
        + "\n\ndef __bench_tests():\n    import sys\n    marks = ''\n"
        + f"    for source in {item.asserts!r}:\n"
        + "        try:\n            exec(source, globals())\n            marks += '1'\n"
        + "        except BaseException:\n            marks += '0'\n"
        + f"    sys.stdout.write({_PLAIN_MARK!r} + marks + '\\n')\n\n\n__bench_tests()\n"
    )


async def _plain(script: str, slots: asyncio.Semaphore, wall_s: float) -> tuple[int, bytes]:
    """(exit code, stdout) of ``python -I -B -S -c script`` with the base interpreter, as the
    sandbox starts it (no venv, no site: the same start-up cost); exit -9 past ``wall_s``."""
    async with slots:
        process = await asyncio.create_subprocess_exec(
            PLAIN_PYTHON,
            "-I",
            "-B",
            "-S",
            "-c",
            script,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), wall_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            return -9, b""
        assert process.returncode is not None
        return process.returncode, stdout


async def _plain_per_response(items: Sequence[Item], concurrency: int) -> Verdicts:
    slots = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> list[bool]:
        wall = LIMITS.wall_s * (1 + len(item.asserts))
        _, stdout = await _plain(_plain_script(item), slots, wall)
        marks = [
            line[len(_PLAIN_MARK) :]
            for line in stdout.decode(errors="replace").splitlines()
            if line.startswith(_PLAIN_MARK)
        ]
        if not marks:
            return [False] * len(item.asserts)
        return [mark == "1" for mark in marks[-1]]

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _plain_per_test(items: Sequence[Item], concurrency: int) -> Verdicts:
    slots = asyncio.Semaphore(concurrency)

    async def one(item: Item, test: str) -> bool:
        returncode, _ = await _plain(f"{item.code}\n\n{test}\n", slots, LIMITS.wall_s)
        return returncode == 0

    async def per_item(item: Item) -> list[bool]:
        return list(await asyncio.gather(*(one(item, test) for test in item.asserts)))

    return list(await asyncio.gather(*(per_item(item) for item in items)))


# ----------------------------------------------------------------------------------------------
# The section.
# ----------------------------------------------------------------------------------------------

TODAY = "today  old runner (53ffbbd), a sandbox per test"
AFTER_CODE = "after  CodeRunner, assert tests (rewritten)"
AFTER_CALL = "after  CodeRunner, call tests"
AFTER_VERIFIER = "after  unit-tests verifier, LocalToolbox"
PLAIN_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
PLAIN_ONE = "plain  python -I -S -c, a process per response"
PLAIN_EACH = "plain  python -I -S -c, a process per test"


async def code_batch(old: ModuleType | str, responses: int, tests: int, concurrency: int) -> bool:
    """Run and print the section; False if the paths disagree on any verdict."""
    items = batch(responses, tests)
    total_tests = sum(len(item.asserts) for item in items)
    max_queued = total_tests + len(items)
    print(
        f"\ncode batch (GRPO step): {len(items)} responses x {tests} tests ({describe(items)}); "
        f"{concurrency} at once; limits wall {LIMITS.wall_s:g} s, cpu {LIMITS.cpu_s:g} s, "
        f"memory {LIMITS.memory_mb} MB"
    )
    outcomes: list[Outcome] = []
    warm = items[:1]
    if isinstance(old, str):
        print(f"{TODAY}: baseline unavailable ({old}); skipped")
    else:
        runner = old_runner(old, concurrency, max_queued)
        try:
            await _old_path(runner, warm)
            outcomes.append(await _timed(TODAY, _old_path(runner, items)))
        finally:
            runner.close()
    new = CodeRunner(LIMITS, max_concurrency=concurrency, max_queued=max_queued)
    try:
        print(f"       new runner: {new.mode}; memory {new.protections['memory']}")
        await _new_path(new, warm, "code")
        outcomes.append(await _timed(AFTER_CODE, _new_path(new, items, "code")))
        outcomes.append(await _timed(AFTER_CALL, _new_path(new, items, "call")))
    finally:
        new.close()
    settings = SandboxSettings(
        tools=["code_run"],
        code_concurrency=concurrency,
        code_max_queued=max_queued,
        code_cpu_s=LIMITS.cpu_s,
        code_wall_s=LIMITS.wall_s,
        code_memory_mb=LIMITS.memory_mb,
        code_processes=LIMITS.processes,
        code_file_size_mb=LIMITS.file_size_mb,
        code_output_bytes=LIMITS.output_bytes,
    )
    toolbox = LocalToolbox(settings)
    try:
        spec = CodeTestsSpec.model_validate(
            {
                "name": "unit-tests",
                "kind": "code_tests",
                "options": {"extract": "code_block", "reward": "fraction",
                            "timeout_s": LIMITS.wall_s},
            }
        )  # fmt: skip
        verifier = CodeTestsVerifier(spec, toolbox)
        await _verifier_path(verifier, warm)
        outcomes.append(await _timed(AFTER_VERIFIER, _verifier_path(verifier, items)))
    finally:
        assert toolbox.code is not None
        toolbox.code.close()
    await _plain_per_response(warm, concurrency)
    outcomes.append(await _timed(PLAIN_ONE, _plain_per_response(items, concurrency)))
    outcomes.append(await _timed(PLAIN_EACH, _plain_per_test(items, concurrency)))

    for outcome in outcomes:
        print(
            f"{outcome.label:<48} {len(items) / outcome.seconds:7.1f} items/s "
            f"{total_tests / outcome.seconds:8.1f} tests/s  ({outcome.seconds:6.2f} s)"
        )
    _print_ratios(outcomes)
    return _same_verdicts(items, outcomes)


def _print_ratios(outcomes: Sequence[Outcome]) -> None:
    seconds = {outcome.label: outcome.seconds for outcome in outcomes}
    afters = [
        (AFTER_CODE, "assert tests"),
        (AFTER_CALL, "call tests"),
        (AFTER_VERIFIER, "verifier"),
    ]
    print("(every path runs the same tests: items/s and tests/s ratios are the same)")
    for baseline, what in [
        (TODAY, "after/today        "),
        (PLAIN_ONE, "after/unsandboxed  "),
        (PLAIN_EACH, "after/unsandboxed  "),
    ]:
        against = baseline.split(maxsplit=1)[1]
        if baseline not in seconds:
            print(f"ratio {what} n/a: baseline unavailable ({against})")
            continue
        ratios = "  ".join(
            f"{name} {seconds[baseline] / seconds[label]:5.2f}x" for label, name in afters
        )
        print(f"ratio {what} {ratios}   (vs {against})")


def _same_verdicts(items: Sequence[Item], outcomes: Sequence[Outcome]) -> bool:
    first = outcomes[0]
    differ = [o for o in outcomes[1:] if o.verdicts != first.verdicts]
    rewards = [sum(v) / len(v) for v in first.verdicts]
    if not differ:
        full, zero = rewards.count(1.0), rewards.count(0.0)
        print(
            f"rewards: identical per item and per test on all {len(outcomes)} paths; mean "
            f"{statistics.fmean(rewards):.3f} ({full} at 1, {zero} at 0, "
            f"{len(rewards) - full - zero} partial)"
        )
        return True
    print("!" * 100)
    print("REWARD MISMATCH: the paths disagree (a faster wrong answer is worthless)")
    for index, item in enumerate(items):
        seen = {o.label: o.verdicts[index] for o in outcomes}
        if len({tuple(v) for v in seen.values()}) > 1:
            print(f"  item {index} ({item.problem}, {item.variant}):")
            for label, verdicts in seen.items():
                marks = "".join("1" if v else "0" for v in verdicts)
                print(f"    {label:<48} {marks}  reward {sum(verdicts) / len(verdicts):.2f}")
    print("!" * 100)
    return False


# ----------------------------------------------------------------------------------------------
# Single-run latency, runner level (no HTTP).
# ----------------------------------------------------------------------------------------------


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _line(name: str, ours: list[float], base: list[float], what: str) -> tuple[float, float]:
    o50, o99 = _percentiles(ours)
    b50, b99 = _percentiles(base)
    print(
        f"{name:<10} p50 {o50 * 1e3:8.2f} ms  p99 {o99 * 1e3:8.2f} ms | {what:<20} "
        f"p50 {b50 * 1e3:8.2f} ms  p99 {b99 * 1e3:8.2f} ms | ratio p50 {o50 / b50:5.2f}x  "
        f"p99 {o99 / b99:5.2f}x"
    )
    return o50 / b50, o99 / b99


async def runner_latency(old: ModuleType | str, program: str, runs: int) -> None:
    """Sequential runs of ``program`` (no tests), old runner, new runner and plain python
    interleaved round by round, so background load falls on all three alike."""
    slots = asyncio.Semaphore(1)
    returncode, stdout = await _plain(program, slots, LIMITS.wall_s)
    assert returncode == 0, stdout
    expected = stdout.decode()
    new = CodeRunner(LIMITS, max_concurrency=1)
    previous = old_runner(old, 1, 64) if not isinstance(old, str) else None

    async def timed(run: Callable[[], Awaitable[str]], into: list[float]) -> None:
        started = time.perf_counter()
        stdout = await run()
        into.append(time.perf_counter() - started)
        assert stdout == expected, stdout

    async def with_new() -> str:
        result = await new.run(program)
        assert result.run is not None and result.run.status == "ok", result
        return result.run.stdout

    async def with_old() -> str:
        assert previous is not None
        result = await previous.run(program)
        assert result.run.status == "ok", result
        return str(result.run.stdout)

    async def with_plain() -> str:
        returncode, stdout = await _plain(program, slots, LIMITS.wall_s)
        assert returncode == 0
        return stdout.decode()

    samples: dict[str, list[float]] = {"new": [], "old": [], "plain": []}
    try:
        for round_ in range(runs + 5):  # the first 5: warm-up
            keep = round_ >= 5
            await timed(with_new, samples["new"] if keep else [])
            if previous is not None:
                await timed(with_old, samples["old"] if keep else [])
            await timed(with_plain, samples["plain"] if keep else [])
    finally:
        new.close()
        if previous is not None:
            previous.close()
    print(
        f"\nrunner latency: code_run of the short program, no tests, no HTTP; {runs} sequential "
        "runs each, interleaved"
    )
    if previous is None:
        print(f"new runner vs old runner: baseline unavailable ({old}); skipped")
    else:
        p50, _ = _line("new runner", samples["new"], samples["old"], f"old runner {OLD_COMMIT}")
        verdict = "met" if p50 <= LATENCY_TARGET else "NOT met"
        print(f"ratio new/old p50 {p50:.2f}x (target <= {LATENCY_TARGET:.2f}: {verdict})")
    _line("new runner", samples["new"], samples["plain"], "plain python")
    if previous is not None:
        _line("old runner", samples["old"], samples["plain"], "plain python")


def default_concurrency() -> int:
    """The machine's cores (this process's CPU affinity: what `nproc` says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
