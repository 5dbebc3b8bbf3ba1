"""Math answer equivalence with math-verify, run in worker processes.

math-verify bounds parsing and comparison with `signal.alarm`, which works only in a process's
main thread, and the service has threads (and vLLM state: no `fork`). So checks run in a lazily
created, module-level `ProcessPoolExecutor` whose workers come from a forkserver: a clean
process, with math-verify preloaded so that a new worker starts in milliseconds.

Timeouts, for a call with `timeout_s`:
- math-verify's own, per parse and per comparison: `max(1, int(timeout_s / 2))` whole seconds
  (`signal.alarm`); the worker survives them.
- an outer deadline of `timeout_s` on the whole call, for what the alarm cannot interrupt (a
  long C-level computation). When it passes, every worker of the pool is killed and the pool
  forgotten; the next call starts a new one. Calls in flight on the killed pool are retried
  once on the new pool.
Callers wait their turn before submitting (at most MAX_WORKERS calls at a time from threads,
and as many from each event loop), so the outer deadline does not count time spent queueing.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import select
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))
# A new pool's first worker: the forkserver's start (importing math-verify) on first use.
STARTUP_TIMEOUT_S = 120.0
_ATTEMPTS = 2
_DETAIL_CHARS = 200


class MathVerifyFailed(RuntimeError):
    """math-verify gave no verdict (it timed out, or its worker died). Not a wrong answer: a
    reward made up from it would teach the policy something false."""


@dataclass(frozen=True)
class MathVerdict:
    correct: bool
    detail: str


def verify_math(answer: str, reference: str, timeout_s: float = 5.0) -> MathVerdict:
    """Whether `answer` equals `reference` mathematically (math-verify), and why; raises
    `MathVerifyFailed` when math-verify gives no verdict."""
    args = (answer, reference, _step_timeout(timeout_s))
    if not answer.strip():
        return MathVerdict(False, "empty answer")
    try:
        return call_in_pool(_check, args, timeout_s)
    except TimeoutError:
        raise MathVerifyFailed(f"math-verify did not finish within {timeout_s:g} s") from None
    except BrokenProcessPool as exc:
        raise MathVerifyFailed(f"the math-verify worker died: {exc}") from None


async def verify_math_async(answer: str, reference: str, timeout_s: float = 5.0) -> MathVerdict:
    """`verify_math` for coroutines: the event loop waits, it does not block."""
    args = (answer, reference, _step_timeout(timeout_s))
    if not answer.strip():
        return MathVerdict(False, "empty answer")
    try:
        return await call_in_pool_async(_check, args, timeout_s)
    except TimeoutError:
        raise MathVerifyFailed(f"math-verify did not finish within {timeout_s:g} s") from None
    except BrokenProcessPool as exc:
        raise MathVerifyFailed(f"the math-verify worker died: {exc}") from None


def _step_timeout(timeout_s: float) -> int:
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s}")
    return max(1, int(timeout_s / 2))


# -- in the worker -------------------------------------------------------------------------------

_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_BARE_WORDS = frozenset({"sqrt", "inf"})


def as_latex(text: str) -> str:
    """`text` in `$...$` if it looks like a bare expression, else unchanged.

    math-verify reads LaTeX only between delimiters: bare `\\frac{1}{2}` or `[0,1)` would parse
    to nothing and `10^{100}` to 10. Text with delimiters or with words (three letters or more,
    other than `sqrt` and `inf`) is left to math-verify's own extraction ("the answer is 3").
    """
    stripped = text.strip()
    if not stripped or _DELIMITED.search(stripped):
        return text
    if any(word.lower() not in _BARE_WORDS for word in _WORD.findall(stripped)):
        return text
    return f"${stripped}$"


def _check(answer: str, reference: str, step_timeout_s: int) -> MathVerdict:
    """math-verify's verdict; runs in a worker (main thread: its alarms work)."""
    gold, why = _parse(reference, step_timeout_s)
    if not gold:
        return MathVerdict(False, f"the reference {_clip(repr(reference))} did not parse: {why}")
    target, why = _parse(answer, step_timeout_s)
    if not target:
        return MathVerdict(False, f"the answer {_clip(repr(answer))} did not parse: {why}")
    correct = bool(_math_verify().verify(gold, target, timeout_seconds=step_timeout_s))
    outcome = "equivalent" if correct else "not equivalent"
    return MathVerdict(
        correct, f"parsed answer {_show(target)} vs reference {_show(gold)}: {outcome}"
    )


def _parse(text: str, timeout_s: int) -> tuple[list[Any], str]:
    """math-verify's parse of `text` (LaTeX, then plain expressions) and, if empty, why."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    try:
        parsed = mv.parse(
            as_latex(text), extraction_config=config, parsing_timeout=timeout_s, raise_on_error=True
        )
    except mv.errors.TimeoutException:
        return [], f"parsing timed out after {timeout_s} s"
    except Exception as exc:
        return [], f"{type(exc).__name__}: {_clip(str(exc))}"
    return list(parsed), "" if parsed else "no mathematical expression found"


def _show(parsed: list[Any]) -> str:
    return _clip("[" + ", ".join(str(item) for item in parsed) + "]")


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _math_verify() -> Any:
    """The math_verify module: imported by workers only (it pulls in sympy)."""
    import math_verify  # type: ignore[import-untyped]

    return math_verify


def _init_worker(service_pid: int) -> None:
    _exit_with(service_pid)
    _math_verify()  # preloaded by the forkserver, normally: already imported
    # Timeouts and parse failures are reported in the verdict's detail, not on stderr.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _exit_with(pid: int) -> None:
    """Exit when process `pid` (the service) ends. A worker waiting for tasks holds both ends of
    its task pipe, so it would outlive a SIGKILLed service forever, and keep the forkserver and
    the resource tracker alive with it."""
    try:
        service = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)

    def wait() -> None:
        select.select([service], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=wait, name="exit-with-service", daemon=True).start()


def _ready() -> None:
    return None


# -- the pool ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    executor: ProcessPoolExecutor
    ready: Future[None]  # a no-op task: done once the forkserver and a first worker are up


_lock = threading.Lock()
_pool: _Pool | None = None
_thread_slots = threading.BoundedSemaphore(MAX_WORKERS)
_loop_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def call_in_pool(fn: Callable[..., T], args: tuple[Any, ...], timeout_s: float) -> T:
    """`fn(*args)` in a pool worker (`fn` must be picklable: a module-level function).

    TimeoutError after `timeout_s` (the pool is then killed and replaced); BrokenProcessPool
    if the workers died on both attempts; `fn`'s own exceptions as raised.
    """
    with _thread_slots:
        for attempt in range(_ATTEMPTS):
            pool = _current_pool()
            try:
                _wait_ready(pool)
                return _submit(pool, fn, args).result(timeout=timeout_s)
            except TimeoutError:
                _discard(pool)
                raise
            except BrokenProcessPool:
                _discard(pool)
                if attempt == _ATTEMPTS - 1:
                    raise
    raise AssertionError("unreachable")


async def call_in_pool_async(fn: Callable[..., T], args: tuple[Any, ...], timeout_s: float) -> T:
    """`call_in_pool` for coroutines, through `loop.run_in_executor` with the same pool."""
    loop = asyncio.get_running_loop()
    async with _async_slots(loop):
        for attempt in range(_ATTEMPTS):
            pool = _current_pool()
            try:
                ready = asyncio.shield(asyncio.wrap_future(pool.ready))
                await asyncio.wait_for(ready, STARTUP_TIMEOUT_S)
                future = _run_in_executor(loop, pool, fn, args)
                return await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                _discard(pool)
                raise
            except BrokenProcessPool:
                _discard(pool)
                if attempt == _ATTEMPTS - 1:
                    raise
    raise AssertionError("unreachable")


def shutdown_math_pool() -> None:
    """Kill the pool's workers, if any, and wait for its threads; the next call starts anew."""
    with _lock:
        pool = _pool
    if pool is not None:
        _discard(pool)
        pool.executor.shutdown(wait=True)


def _current_pool() -> _Pool:
    global _pool
    with _lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["__main__", "math_verify", __name__])
            executor = ProcessPoolExecutor(
                MAX_WORKERS,
                mp_context=context,
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
            _pool = _Pool(executor, executor.submit(_ready))
        return _pool


def _wait_ready(pool: _Pool) -> None:
    pool.ready.result(timeout=STARTUP_TIMEOUT_S)


def _submit(pool: _Pool, fn: Callable[..., T], args: tuple[Any, ...]) -> Future[T]:
    try:
        return pool.executor.submit(fn, *args)
    except RuntimeError as exc:  # shut down meanwhile, by another call's timeout
        raise BrokenProcessPool(str(exc)) from exc


def _run_in_executor(
    loop: asyncio.AbstractEventLoop, pool: _Pool, fn: Callable[..., T], args: tuple[Any, ...]
) -> asyncio.Future[T]:
    try:
        return loop.run_in_executor(pool.executor, fn, *args)
    except RuntimeError as exc:  # shut down meanwhile, by another call's timeout
        raise BrokenProcessPool(str(exc)) from exc


def _async_slots(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    with _lock:
        slots = _loop_slots.get(loop)
        if slots is None:
            slots = _loop_slots[loop] = asyncio.Semaphore(MAX_WORKERS)
        return slots


def _discard(pool: _Pool) -> None:
    """Forget `pool` and kill its workers: a stuck one would ignore anything gentler.

    Calls still running on it fail with BrokenProcessPool (and are retried by their caller).
    """
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
        processes = list((pool.executor._processes or {}).values())
    for process in processes:
        process.kill()
    pool.executor.shutdown(wait=False)
