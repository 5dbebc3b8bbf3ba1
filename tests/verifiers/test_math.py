"""Math answer equivalence (math-verify in a worker process), its timeouts and pool recovery."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rmserve.models.base import RequestOptions
from rmserve.models.spec import MathOptions, MathSpec
from rmserve.models.verifiers import math as math_verifier
from rmserve.models.verifiers.math import (
    MathVerdict,
    MathVerifyFailed,
    as_latex,
    call_in_pool,
    call_in_pool_async,
    shutdown_math_pool,
    verify_math,
    verify_math_async,
)
from rmserve.models.verifiers.rewards import MathVerifier
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory


@pytest.fixture(autouse=True, scope="module")
def _pool() -> Iterator[None]:
    yield
    shutdown_math_pool()


def stuck_check(answer: str, reference: str, step_timeout_s: int) -> MathVerdict:
    """Stands in for math-verify stuck where its alarm cannot stop it (runs in the worker)."""
    time.sleep(60)
    raise AssertionError("not reached")


def slow_parse(text: str, timeout_s: int) -> tuple[list[object], str]:
    """`_parse` with math-verify's extraction stuck in Python code (runs in the worker)."""
    from math_verify import parser  # type: ignore[import-untyped]

    original = parser.extract_target_from_pred
    parser.extract_target_from_pred = lambda *args, **kwargs: time.sleep(10)
    try:
        return math_verifier._parse(text, timeout_s)
    finally:
        parser.extract_target_from_pred = original


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether process `pid` has exited (zombies count) within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "$\\frac12$"),
    ("\\dfrac{1}{2}", "1/2"),
    ("$\\frac{1}{2}$", "0.5"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("1, 2", "2, 1"),
    ("[0, 1)", "[0,1)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("x=3", "3"),
    ("3", "x = 3"),
    ("2\\pi", "2\\pi"),
    ("3\\pi", "\\frac{6\\pi}{2}"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ("10^{100}", "10^{100}"),
    ("1,000", "1000"),
    ("2.0", "2"),
    ("50\\%", "50\\%"),
    ("50", "50\\%"),  # math-verify is lenient with percentages: 50 and 0.5 both match 50%
    ("0.5", "50\\%"),
    ("(x+1)^2", "x^2+2x+1"),
    ("The answer is \\boxed{3}.", "3"),  # a whole response: math-verify finds the box
    ("Therefore the answer is 7.", "7"),
]

NOT_EQUIVALENT = [
    ("4", "3"),
    ("-3", "3"),
    ("(0,1]", "[0,1)"),
    ("[0,1]", "[0,1)"),
    ("\\{1,2,3\\}", "\\{1,2\\}"),
    ("y=3", "x=3"),
    ("\\pi", "3.14159"),
    ("6.28318", "2\\pi"),
    ("123456789012345678901234567891", "123456789012345678901234567890"),
    ("10^{100}+1", "10^{100}"),
    ("\\frac{1}{3}", "0.5"),
    ("x^2", "2x"),
    ("The answer is \\boxed{4}.", "3"),
]


@pytest.mark.parametrize(("answer", "reference"), EQUIVALENT)
def test_equivalent(answer: str, reference: str) -> None:
    verdict = verify_math(answer, reference)
    assert verdict.correct, verdict.detail
    assert verdict.detail.startswith("parsed answer [")
    assert verdict.detail.endswith(": equivalent")


@pytest.mark.parametrize(("answer", "reference"), NOT_EQUIVALENT)
def test_not_equivalent(answer: str, reference: str) -> None:
    verdict = verify_math(answer, reference)
    assert not verdict.correct
    assert verdict.detail.endswith(": not equivalent"), verdict.detail


def test_detail_shows_both_parses() -> None:
    verdict = verify_math("0.5", "\\frac{1}{2}")
    assert verdict == MathVerdict(
        True, "parsed answer [1/2, \\frac{1}{2}] vs reference [1/2, \\frac{1}{2}]: equivalent"
    )


@pytest.mark.parametrize("answer", ["", "   \n"])
def test_empty_answer(answer: str) -> None:
    assert verify_math(answer, "3") == MathVerdict(False, "empty answer")


@pytest.mark.parametrize("answer", ["hello", "no idea", "Dunno.", "$$$"])
def test_answer_without_math(answer: str) -> None:
    verdict = verify_math(answer, "3")
    assert verdict == MathVerdict(
        False, f"the answer {answer!r} did not parse: no mathematical expression found"
    )


@pytest.mark.parametrize("answer", ["¯\\_(ツ)_/¯", "{1/2", "\\frac{", "x^^^2"])
def test_malformed_answer(answer: str) -> None:
    # What math-verify cannot parse it keeps as a string, equal only to the same string.
    assert not verify_math(answer, "3").correct
    assert verify_math(answer, answer).correct


def test_reference_that_does_not_parse() -> None:
    verdict = verify_math("3", "hello")
    assert verdict == MathVerdict(
        False, "the reference 'hello' did not parse: no mathematical expression found"
    )


def test_long_answers_are_clipped_in_the_detail() -> None:
    verdict = verify_math("word " * 200, "3")
    assert not verdict.correct
    assert len(verdict.detail) < 300
    assert "..." in verdict.detail


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\frac{1}{2}", "$\\frac{1}{2}$"),
        (" [0,1) ", "$[0,1)$"),
        ("x = 3", "$x = 3$"),
        ("sqrt(2)/2", "$sqrt(2)/2$"),
        ("$3$", "$3$"),  # delimited: unchanged
        ("\\(3\\)", "\\(3\\)"),
        ("\\boxed{3}", "\\boxed{3}"),
        ("The answer is 3", "The answer is 3"),  # prose: math-verify's own extraction
        ("3 apples", "3 apples"),
        ("", ""),
    ],
)
def test_as_latex(text: str, expected: str) -> None:
    assert as_latex(text) == expected


def test_works_from_a_thread_that_is_not_main() -> None:
    # math-verify's signal.alarm would fail here; the check runs in a worker's main thread.
    verdicts: list[MathVerdict] = []
    thread = threading.Thread(target=lambda: verdicts.append(verify_math("0.5", "1/2")))
    thread.start()
    thread.join(timeout=30)
    assert [v.correct for v in verdicts] == [True]


async def test_async() -> None:
    verdicts = await asyncio.gather(
        verify_math_async("0.5", "\\frac{1}{2}"),
        verify_math_async("\\{2,1\\}", "\\{1,2\\}"),
        verify_math_async("4", "3"),
        verify_math_async("", "3"),
        verify_math_async("hello", "3"),
    )
    assert [v.correct for v in verdicts] == [True, True, False, False, False]


def test_workers_come_from_a_forkserver() -> None:
    # Neither forked nor spawned by this process: their parent is the forkserver.
    assert call_in_pool(os.getppid, (), timeout_s=10) != os.getpid()


def test_the_pool_ends_with_a_killed_service() -> None:
    """SIGKILL the service: its workers exit, and the forkserver and resource tracker with them."""
    script = "from rmserve.models.verifiers.math import verify_math"
    script += "; print(verify_math('2', '2').correct)"
    script += "; import time; time.sleep(60)"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", script]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as service:
        assert service.stdout is not None and service.stdout.readline() == "True\n"
        helpers = psutil.Process(service.pid).children(recursive=True)
        assert any(helper.ppid() != service.pid for helper in helpers)  # a worker
        service.kill()
    _, alive = psutil.wait_procs(helpers, timeout=10)
    assert alive == [], [helper.cmdline() for helper in alive]


def test_math_verify_parsing_timeout_is_reported() -> None:
    parsed = call_in_pool(slow_parse, ("1", 1), timeout_s=10)
    assert parsed == ([], "parsing timed out after 1 s")
    assert verify_math("1", "1").correct  # the worker survived, unpatched


def test_worker_exceptions_propagate() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        call_in_pool(int, ("not a number",), timeout_s=10)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_timeout_must_be_positive(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        verify_math("1", "1", timeout_s=timeout_s)
    with pytest.raises(ValueError, match="positive"):
        verify_math("", "1", timeout_s=timeout_s)


async def test_async_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        await verify_math_async("1", "1", timeout_s=0)


def test_timeout_kills_the_stuck_worker_and_the_pool_recovers() -> None:
    worker = call_in_pool(os.getpid, (), timeout_s=10)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call_in_pool(time.sleep, (60,), timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert _gone(worker)
    assert call_in_pool(os.getpid, (), timeout_s=10) != worker
    assert verify_math("0.5", "1/2").correct


def test_verify_math_timeout_is_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout is not a wrong answer: it raises, and the verifier reports an item error."""
    monkeypatch.setattr(math_verifier, "_check", stuck_check)
    with pytest.raises(MathVerifyFailed, match=r"did not finish within 0\.5 s"):
        verify_math("1", "1", timeout_s=0.5)
    monkeypatch.undo()
    assert verify_math("1", "1").correct


async def test_async_timeout_is_no_verdict_and_the_pool_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(math_verifier, "_check", stuck_check)
    with pytest.raises(MathVerifyFailed, match=r"did not finish within 0\.5 s"):
        await verify_math_async("1", "1", timeout_s=0.5)
    monkeypatch.undo()
    assert (await verify_math_async("1", "1")).correct


async def test_calls_in_flight_when_the_pool_is_killed_are_retried() -> None:
    stuck = call_in_pool_async(time.sleep, (60,), 0.5)
    slow = call_in_pool_async(time.sleep, (1.5,), 10)  # running when the pool is killed
    results = await asyncio.gather(stuck, slow, return_exceptions=True)
    assert isinstance(results[0], TimeoutError)
    assert results[1] is None


def test_shutdown_then_use_again() -> None:
    assert verify_math("2", "2").correct
    shutdown_math_pool()
    shutdown_math_pool()  # idempotent
    assert verify_math("2", "2").correct


async def test_the_math_verifier_gives_no_reward_without_a_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """math-verify timing out is an item error (`verifier_error`), never a reward of 0.0."""
    verifier = MathVerifier(MathSpec(name="math", kind="math", options=MathOptions(timeout_s=0.5)))
    item = Trajectory.model_validate(
        {"messages": [{"role": "assistant", "content": "\\boxed{1}"}], "reference": "1"}
    )
    assert (await verifier.score(item, RequestOptions())).score == 1.0
    monkeypatch.setattr(math_verifier, "_check", stuck_check)
    with pytest.raises(ItemError) as raised:
        await verifier.score(item, RequestOptions())
    assert raised.value.code == "verifier_error" and "did not finish" in raised.value.message
