"""Run untrusted Python (a judge's or a policy's code) under bubblewrap, and test it.

Who decides a test
------------------
A policy under RL optimisation is an adversary: whatever runs in its interpreter, it can
subvert. So tests are decided on the host wherever the format allows (`rmserve.sandbox.grading`):

* ``call`` tests (and ``code`` tests made only of plain asserts such as
  ``assert fib(10) == 55``, rewritten by `rmserve.sandbox.asserts`): all of a response's
  calls run in ONE sandbox, each with its own wall-clock limit; each value comes back typed
  (exact builtin types only: no ``__eq__``, ``__repr__`` or subclass of the program's runs on
  the host); the host compares it with the expected value, which never enters the sandbox. A
  call that hangs or kills its process fails alone: the supervisor restarts the program for the
  next call.
* ``stdin`` + ``expected_stdout`` tests: one sandbox each; the host compares the output.
* other ``code`` tests run in-process, after the program, in one sandbox each. The harness binds
  what it needs before the program runs, keeps the test code and completion nonce out of every
  Python object and of ``linecache`` until the program has run, and runs the test with Python's
  own builtins. But the program shares the process: it can read the descriptor that holds the
  test and the nonce, and code the test calls can inspect the test's frame or replace library
  functions. **Unsafe against an optimising policy**; refuse them with ``in_process="refuse"``.
A run that exits early (``sys.exit(0)``, ``os._exit(0)``) never passes a test.

Isolation (`rmserve.sandbox.launch`, `rmserve.sandbox.harness`)
---------------------------------------------------------------
Every run gets a fresh bubblewrap sandbox: new user, mount, pid, network, ipc, uts and cgroup
namespaces; an empty read-only root with /usr and the base interpreter bound read-only (never
the service's venv, never site-packages: ``python -I -B -S``); a fresh /proc, a minimal /dev;
/tmp and /dev/shm private tmpfs of ``file_size_mb`` each (the only writable places);
``--clearenv``; a network namespace with a loopback that is down; no capabilities,
``no_new_privs``, no new user namespaces; a seccomp filter denying ptrace, cross-process memory
access and kernel surface it has no use for (`rmserve.sandbox.seccomp`). The job travels
through an anonymous memfd. Only the job, status and (in-process tests) test descriptors reach
the sandbox: the service's are closed whatever event loop it runs.

The harness's supervisor is the sandbox's pid 1: signals from inside the namespace cannot kill
it, it is not dumpable, and its status pipe is held by no user process. When it exits, the
kernel kills every process left in the namespace; on timeouts, output floods, cancellation and
service death the host kills the whole run (its cgroup, or bwrap, whose death takes pid 1).

Limits and how each is detected
-------------------------------
All rlimits are set by ``prlimit`` before bwrap starts, so they bind every process of the run.

* ``wall_s``: per execution: the program alone, the program plus one test, or the program's
  start-up and then each call of a calls run. Exceeded -> ``timeout``.
* ``cpu_s``: RLIMIT_CPU per process, rounded up to whole seconds (a calls run's process gets
  ``cpu_s`` per call it may still run); SIGXCPU -> ``cpu_limit``.
* ``memory_mb``: with a per-run cgroup (`rmserve.sandbox.cgroups`; ``protections`` says
  whether there is one), the whole run's memory, tmpfs pages and kernel memory (inodes)
  included; plus RLIMIT_AS per process. Without a cgroup only RLIMIT_AS, so ``processes x
  memory_mb`` is the aggregate bound. ``MemoryError``, or an OOM kill -> ``memory_limit``.
* ``processes``: RLIMIT_NPROC in the run's user namespace (counts only that run's tasks), and
  the cgroup's pids.max; forks beyond fail with EAGAIN.
* ``file_size_mb``: RLIMIT_FSIZE and the size of /tmp and /dev/shm. No core dumps.
* ``output_bytes``: stdout and stderr are each kept up to this; past 16x the run is killed
  -> ``output_limit``.
Per-request limits can only lower the runner's.

Concurrency: at most ``max_concurrency`` sandboxes at once (as root each slot has its own uid);
a request is refused with ``ToolError("busy")`` when every slot is taken and ``max_queued``
executions wait.

``allow_unsafe=True`` is a development fallback when bubblewrap does not work: the harness runs
directly as the service's uid with the same rlimits in a temporary directory - no filesystem,
network, pid or uid isolation. It logs a loud warning. Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import secrets
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rmserve.sandbox import seccomp
from rmserve.sandbox.cgroups import CgroupSupport, RunCgroup, RunCgroups
from rmserve.sandbox.execution import (
    Observed,
    anonymous_file,
    kill_process_group,
    open_channels,
    run_process,
    status_records,
)
from rmserve.sandbox.grading import (
    VALUE_DEPTH,
    VALUE_ITEMS,
    InProcess,
    Plan,
    TestStatus,
    judge_calls,
    normalize_output,
    plan_tests,
    run_status,
)
from rmserve.sandbox.launch import (
    DEFAULT_UID_BASE,
    HOST_ENV,
    SANDBOX_PATH,
    Launcher,
    Spawn,
    bwrap_launcher,
    unsafe_launcher,
)
from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import CodeTest

logger = logging.getLogger(__name__)

RunStatus = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "killed"]
_JobMode = Literal["program", "calls", "test_code"]

_HARNESS_PROCESSES = 2  # bwrap (outside the pid namespace) and the supervisor (pid 1)
_HARNESS_MEMORY = 48 << 20  # bwrap and the supervisor, in the run's cgroup
_HARD_OUTPUT_FACTOR = 16
_PROBE_TIMEOUT_S = 30.0
_VALUE_DEPTH = VALUE_DEPTH
_VALUE_ITEMS = VALUE_ITEMS
_CLAIM_BYTES = 8 << 20
_MAX_CALLS = 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits of one execution (the program alone, with one test, or one call)."""

    cpu_s: float = 10.0
    wall_s: float = 20.0
    memory_mb: int = 512
    processes: int = 32
    file_size_mb: int = 16
    output_bytes: int = 65536

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")

    def clamped_to(self, ceiling: Limits) -> Limits:
        """These limits, lowered where they exceed ``ceiling``: a request never raises a limit."""
        return Limits(
            cpu_s=min(self.cpu_s, ceiling.cpu_s),
            wall_s=min(self.wall_s, ceiling.wall_s),
            memory_mb=min(self.memory_mb, ceiling.memory_mb),
            processes=min(self.processes, ceiling.processes),
            file_size_mb=min(self.file_size_mb, ceiling.file_size_mb),
            output_bytes=min(self.output_bytes, ceiling.output_bytes),
        )

    @property
    def cpu_rlimit_s(self) -> int:
        """RLIMIT_CPU counts whole seconds: ``cpu_s`` rounded up."""
        return max(1, math.ceil(self.cpu_s))

    @property
    def output_hard_cap(self) -> int:
        return self.output_bytes * _HARD_OUTPUT_FACTOR


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class RunResult:
    status: RunStatus
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float


@dataclass(frozen=True)
class TestResult:
    """One test. ``run`` is its own sandbox run; None for call tests, which share
    ``CodeResult.run``. ``status`` says how its execution ended ("ok" with ``passed`` False:
    it ran and was wrong); ``detail`` why it failed."""

    __test__ = False  # not a pytest class

    name: str
    passed: bool
    status: TestStatus
    detail: str
    run: RunResult | None


@dataclass(frozen=True)
class CodeResult:
    """``run``: the program alone (no tests), or the run that evaluated the call tests."""

    run: RunResult | None
    tests: list[TestResult]
    passed: int
    failed: int


@dataclass(frozen=True)
class _Job:
    mode: _JobMode
    program: str
    stdin: bytes
    calls: tuple[str, ...] = ()
    test_code: str | None = None
    nonce: str = ""


@dataclass(frozen=True)
class _Execution:
    observed: Observed
    records: list[dict[str, Any]]
    oom_killed: bool
    limits: Limits

    @property
    def final(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if "exit_code" in r), None)

    def result(self) -> RunResult:
        observed = self.observed
        tail = observed.stderr.tail.decode("utf-8", errors="replace")
        status, exit_code, sig = run_status(
            self.final,
            timed_out=observed.timed_out,
            output_overflowed=observed.output_overflowed,
            returncode=observed.returncode,
            cpu_rlimit_s=self.limits.cpu_rlimit_s,
            stderr_tail=tail,
            oom_killed=self.oom_killed,
        )
        assert status != "unserialisable"
        return self._run_result(status, exit_code, sig)

    def calls_result(self) -> RunResult:
        """A calls run as a whole: ok when the supervisor finished."""
        observed = self.observed
        status: RunStatus = "ok"
        if observed.output_overflowed:
            status = "output_limit"
        elif observed.timed_out:
            status = "timeout"
        elif not any(record.get("finished") for record in self.records):
            status = "memory_limit" if self.oom_killed else "killed"
        return self._run_result(status, None, None)

    def _run_result(self, status: RunStatus, exit_code: int | None, sig: int | None) -> RunResult:
        observed = self.observed
        return RunResult(
            status=status,
            exit_code=exit_code,
            signal=sig,
            stdout=observed.stdout.text(),
            stderr=observed.stderr.text(),
            stdout_truncated=observed.stdout.truncated,
            stderr_truncated=observed.stderr.truncated,
            wall_s=observed.wall_s,
        )


class CodeRunner:
    """Runs untrusted Python in fresh bubblewrap sandboxes, a bounded number at a time."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        max_concurrency: int = 4,
        max_queued: int = 64,
        bwrap: str = "bwrap",
        allow_unsafe: bool = False,
        *,
        max_tests: int = 64,
        sandbox_uid_base: int = DEFAULT_UID_BASE,
        mount_proc: bool = True,
        cgroup_parent: str | None = None,
    ) -> None:
        if max_concurrency < 1 or max_queued < 0 or max_tests < 1:
            raise ValueError("need max_concurrency >= 1, max_queued >= 0, max_tests >= 1")
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.max_tests = max_tests
        self._seccomp = seccomp.filter_program() if seccomp.supported() else None
        self._launcher = self._choose_launcher(bwrap, allow_unsafe, sandbox_uid_base, mount_proc)
        cgroups = RunCgroups.detect(cgroup_parent) if self._launcher.mode != "unsafe" else None
        self._cgroups = cgroups if isinstance(cgroups, RunCgroups) else None
        self._cgroup_support = (
            cgroups.support if isinstance(cgroups, RunCgroups) else cgroups
        ) or CgroupSupport(None, "unsafe mode: no per-run cgroup")
        self._release = weakref.finalize(self, _release, self._launcher, self._cgroups)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._free_slots = list(reversed(range(max_concurrency)))
        self._in_flight = 0
        self._queued = 0
        self._serial = 0
        logger.info("code sandbox protections: %s", json.dumps(self.protections))

    @staticmethod
    def available(bwrap: str = "bwrap", mount_proc: bool = True) -> str | None:
        """None if bubblewrap sandboxes work here (a trial run succeeded), else the reason."""
        launcher, problem = _working_launcher(bwrap, DEFAULT_UID_BASE, mount_proc, _filter())
        if launcher is not None:
            launcher.close()
        return problem

    def _choose_launcher(
        self, bwrap: str, allow_unsafe: bool, uid_base: int, mount_proc: bool
    ) -> Launcher:
        launcher, problem = _working_launcher(bwrap, uid_base, mount_proc, self._seccomp)
        if launcher is not None:
            return launcher
        if not allow_unsafe:
            raise ToolError("unavailable", problem or "bubblewrap does not work here")
        logger.warning(
            "UNSAFE CODE EXECUTION: bubblewrap does not work here (%s); allow_unsafe=True, so "
            "untrusted code runs WITHOUT filesystem, network, pid or uid isolation (only rlimits "
            "and a temp dir%s). Never use this outside development.",
            problem,
            "; running as root: no process limit at all" if os.geteuid() == 0 else "",
        )
        unsafe = unsafe_launcher()
        if isinstance(unsafe, str):
            raise ToolError("unavailable", f"{problem}; unsafe mode failed too: {unsafe}")
        unsafe_problem = _probe(unsafe, None)
        if unsafe_problem is not None:
            raise ToolError("unavailable", f"{problem}; unsafe mode failed too: {unsafe_problem}")
        return unsafe

    def close(self) -> None:
        """Release the staging namespace and the cgroup parent (also done when the runner is
        garbage-collected)."""
        self._release()

    @property
    def mode(self) -> str:
        """'bwrap-root', 'bwrap-user' or 'unsafe'."""
        return self._launcher.mode

    @property
    def protections(self) -> dict[str, str]:
        """What protects the host here, one line each (logged at start-up)."""
        mode = self._launcher.mode
        if mode == "unsafe":
            return {
                "isolation": "NONE (unsafe mode): rlimits and a temporary directory only",
                "cgroup": self._cgroup_support.reason,
            }
        cgroup = self._cgroup_support
        uids = self.slot_uids
        return {
            "isolation": "bubblewrap, "
            + (
                f"as root: each slot its own uid ({uids.start}-{uids.stop - 1})"
                if mode == "bwrap-root"
                else "unprivileged: the service's uid in a new user namespace"
            ),
            "supervisor": "pid 1 of the run's pid namespace, not dumpable; rlimits set "
            "before bwrap",
            "seccomp": "on: " + ", ".join(seccomp.DENIED_SYSCALLS)
            if self._seccomp is not None
            else "off: not supported on this architecture",
            "memory": f"per run ({cgroup.describe()}), and RLIMIT_AS per process"
            if cgroup.version is not None
            else f"per process only (RLIMIT_AS): no per-run cgroup ({cgroup.reason}); "
            "tmpfs inodes bounded only by the wall clock",
            "descriptors": "only the job's own reach the sandbox (closed at spawn and by "
            "the supervisor)",
            "proc": "a fresh /proc of the run" if self._launcher.mount_proc else "no /proc",
        }

    @property
    def slot_uids(self) -> range:
        """The uids its sandboxes run under (as root; empty otherwise)."""
        if self._launcher.mode != "bwrap-root":
            return range(0)
        base = self._launcher.uid_base
        return range(base, base + self.max_concurrency)

    @property
    def in_flight(self) -> int:
        """Sandboxes running now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Admitted executions waiting for a slot."""
        return self._queued

    async def run(
        self,
        code: str,
        stdin: str = "",
        tests: Sequence[CodeTest] = (),
        limits: Limits | None = None,
        in_process: InProcess = "allow",
    ) -> CodeResult:
        """Run ``code`` alone (no tests) or against ``tests``.

        ``limits`` can only lower the runner's limits (clamped field by field; build them with
        ``dataclasses.replace(runner.limits, ...)``). Raises ToolError("busy") when all slots
        are busy and ``max_queued`` executions already wait, ToolError("invalid_arguments")
        beyond ``max_tests`` tests or for test code that does not parse,
        ToolError("unsafe_test") for an in-process test when ``in_process`` is "refuse",
        ToolError("sandbox_failed") if a sandbox could not start.
        """
        effective = self.limits if limits is None else limits.clamped_to(self.limits)
        if len(tests) > self.max_tests:
            raise ToolError("invalid_arguments", f"at most {self.max_tests} tests per request")
        if not tests:
            job = _Job("program", code, stdin.encode())
            (execution,) = await self._execute_all([job], effective)
            return CodeResult(run=execution.result(), tests=[], passed=0, failed=0)
        plan = plan_tests(tests, in_process)
        if len(plan.calls) > _MAX_CALLS:
            raise ToolError("invalid_arguments", f"at most {_MAX_CALLS} call checks per request")
        separate = [_separate_job(code, stdin, tests[index]) for index in plan.separate]
        batched = (
            [_Job("calls", code, stdin.encode(), calls=plan.expressions)] if plan.calls else []
        )
        executions = await self._execute_all(batched + separate, effective)
        results = {
            index: _separate_result(tests[index], index, job, execution)
            for index, job, execution in zip(
                plan.separate, separate, executions[len(batched) :], strict=True
            )
        }
        batch = executions[0].calls_result() if batched else None
        if batch is not None:
            results |= _call_test_results(tests, plan, executions[0], batch)
        ordered = [results[index] for index in range(len(tests))]
        passed = sum(result.passed for result in ordered)
        return CodeResult(run=batch, tests=ordered, passed=passed, failed=len(ordered) - passed)

    def _admit(self, executions: int) -> None:
        if self._in_flight >= self.max_concurrency and self._queued >= self.max_queued:
            raise ToolError(
                "busy",
                f"code runner busy: {self._in_flight} runs going, {self._queued} waiting",
            )
        self._queued += executions

    async def _execute_all(self, jobs: list[_Job], limits: Limits) -> list[_Execution]:
        """Admit, then start each job as soon as it gets a slot; the slot is freed when its
        task ends, even if the task is cancelled before it starts."""
        self._admit(len(jobs))
        waiting = len(jobs)
        tasks: list[asyncio.Task[_Execution]] = []
        try:
            for job in jobs:
                await self._slots.acquire()
                slot = self._free_slots.pop()
                self._in_flight += 1
                self._queued -= 1
                waiting -= 1
                task = asyncio.create_task(self._execute(job, slot, limits))
                task.add_done_callback(functools.partial(self._release_slot, slot))
                tasks.append(task)
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._queued -= waiting

    def _release_slot(self, slot: int, _task: asyncio.Task[_Execution]) -> None:
        self._free_slots.append(slot)
        self._in_flight -= 1
        self._slots.release()

    async def _execute(self, job: _Job, slot: int, limits: Limits) -> _Execution:
        launcher = self._launcher
        self._serial += 1
        with contextlib.ExitStack() as cleanup:
            workdir = _unsafe_workdir(cleanup) if launcher.mode == "unsafe" else None
            calls = len(job.calls)
            channels = await open_channels(
                job.stdin, limits.output_bytes, limits.output_hard_cap, cleanup
            )
            cgroup = self._run_cgroup(slot, limits, cleanup)
            spawn = _spawn(job, limits, launcher, self._seccomp, cgroup, channels.status_fd)
            for fd in spawn.fds:
                if fd != channels.status_fd:
                    cleanup.callback(os.close, fd)
            wall = limits.wall_s * (1 + calls) + (2.0 if calls else 0.0)

            def kill(process: subprocess.Popen[bytes]) -> None:
                if cgroup is not None:
                    cgroup.kill()
                kill_process_group(process)

            observed = await run_process(
                launcher.command(slot, spawn),
                channels,
                spawn.fds,
                HOST_ENV if workdir is None else _unsafe_env(workdir),
                wall,
                kill,
                cwd=workdir,
            )
            records = observed.records()
            if not observed.timed_out and not any(r.get("started") for r in records):
                detail = observed.stderr.tail.decode("utf-8", errors="replace").strip()
                raise ToolError(
                    "sandbox_failed",
                    f"the sandbox did not start (exit {observed.returncode}): {detail[-1000:]}",
                )
            oom = cgroup.oom_killed() if cgroup is not None else False
            return _Execution(observed, records, oom, limits)

    def _run_cgroup(
        self, slot: int, limits: Limits, cleanup: contextlib.ExitStack
    ) -> RunCgroup | None:
        if self._cgroups is None:
            return None
        cgroup = self._cgroups.create(
            f"run-{slot}-{self._serial}",
            memory_bytes=limits.memory_mb * 1024 * 1024 + _HARNESS_MEMORY,
            max_processes=limits.processes + _HARNESS_PROCESSES,
        )
        cleanup.callback(cgroup.remove)
        return cgroup


def _release(launcher: Launcher, cgroups: RunCgroups | None) -> None:
    launcher.close()
    if cgroups is not None:
        cgroups.close()


def _filter() -> bytes | None:
    return seccomp.filter_program() if seccomp.supported() else None


def _working_launcher(
    bwrap: str, uid_base: int, mount_proc: bool, seccomp_filter: bytes | None
) -> tuple[Launcher | None, str | None]:
    """A launcher whose trial run worked, or why there is none."""
    launcher = bwrap_launcher(bwrap, uid_base, mount_proc)
    if isinstance(launcher, str):
        return None, launcher
    problem = _probe(launcher, seccomp_filter)
    if problem is None:
        return launcher, None
    launcher.close()
    if mount_proc and "mount proc" in problem:
        problem += (
            " (in a container, /proc is masked: turn mount_proc off, "
            "RMSERVE_SANDBOX_MOUNT_PROC=false)"
        )
    return None, problem


def _spawn(
    job: _Job,
    limits: Limits,
    launcher: Launcher,
    seccomp_filter: bytes | None,
    cgroup: RunCgroup | None,
    status_fd: int,
) -> Spawn:
    """The descriptors and limits of one run's command line (the caller closes the fds)."""
    calls = len(job.calls)
    run_cpu = limits.cpu_rlimit_s * (1 + calls)
    memory = limits.memory_mb * 1024 * 1024
    file_size = limits.file_size_mb * 1024 * 1024
    rlimits: dict[str, int | str] = {
        "cpu": f"{run_cpu}:{run_cpu + 1}",  # soft: SIGXCPU; hard: SIGKILL
        "as": memory,
        "fsize": file_size,
        "core": 0,
    }
    if launcher.counts_processes_per_slot:
        rlimits["nproc"] = limits.processes + _HARNESS_PROCESSES
    payload = {
        "mode": job.mode,
        "program": job.program,
        "calls": list(job.calls),
        "limits": {
            "cpu_s": limits.cpu_rlimit_s,
            "run_cpu_s": run_cpu,
            "address_space_bytes": memory,
            "file_size_bytes": file_size,
            "processes": _process_limit(launcher, limits),
            "wall_s": limits.wall_s,
            "call_wall_s": limits.wall_s,
            "value_depth": _VALUE_DEPTH,
            "value_items": _VALUE_ITEMS,
            "claim_bytes": _CLAIM_BYTES,
        },
    }
    secret_fd = -1
    if job.test_code is not None:
        source = job.test_code.encode()
        secret_fd = anonymous_file(f"{len(source):16d}".encode() + source + job.nonce.encode(), "t")
    return Spawn(
        job_fd=anonymous_file(json.dumps(payload).encode(), "job"),
        status_fd=status_fd,
        tmpfs_bytes=file_size,
        rlimits=rlimits,
        secret_fd=secret_fd,
        seccomp_fd=anonymous_file(seccomp_filter, "seccomp") if seccomp_filter else -1,
        cgroup_join=cgroup.join_command() if cgroup is not None else [],
    )


def _process_limit(launcher: Launcher, limits: Limits) -> int | None:
    """RLIMIT_NPROC inside the run. In a sandbox the count is per user namespace (per run);
    unsafe mode counts the service's uid, so add what that uid already runs."""
    if launcher.mode != "unsafe":
        return limits.processes + 1  # the supervisor and the run's processes
    existing = _tasks_owned_by(os.getuid())
    return None if existing is None else existing + limits.processes + 1


def _tasks_owned_by(uid: int) -> int | None:
    """Tasks (threads) whose real uid is ``uid``, as RLIMIT_NPROC counts them; None if unknown."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    total = 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status_file:
                status = dict(line.split(":", 1) for line in status_file if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == uid:
            total += int(status["Threads"])
    return total


def _call_test_results(
    tests: Sequence[CodeTest], plan: Plan, execution: _Execution, batch: RunResult
) -> dict[int, TestResult]:
    """Each call test: passed when all of its checks passed; else the first failure's."""
    outcomes = judge_calls(
        plan.calls,
        execution.records,
        batch.status if batch.status != "ok" else "killed",
        execution.observed.stderr.tail.decode("utf-8", errors="replace"),
        execution.oom_killed,
    )
    results = {}
    for index in dict.fromkeys(plan.call_owner):
        mine = [outcomes[i] for i in plan.calls_of(index)]
        failure = next((outcome for outcome in mine if not outcome.passed), None)
        name = tests[index].name or f"test_{index}"
        if failure is None:
            results[index] = TestResult(name, True, "ok", "", None)
        else:
            results[index] = TestResult(name, False, failure.status, failure.detail, None)
    return results


def _separate_job(code: str, stdin: str, test: CodeTest) -> _Job:
    test_stdin = (test.stdin if test.stdin is not None else stdin).encode()
    if test.code is None:
        return _Job("program", code, test_stdin)
    return _Job("test_code", code, test_stdin, test_code=test.code, nonce=secrets.token_hex(16))


def _separate_result(test: CodeTest, index: int, job: _Job, execution: _Execution) -> TestResult:
    """A test with its own run: exit 0; with ``code``: the test code ran to its end; with
    ``expected_stdout``: untruncated stdout equal modulo trailing whitespace per line and at
    the end."""
    run = execution.result()
    name = test.name or f"test_{index}"
    if run.status != "ok":
        last = run.stderr.strip().splitlines()[-1:] or [f"exit code {run.exit_code}"]
        return TestResult(name, False, run.status, f"{run.status}: {last[0][:300]}", run)
    final = execution.final or {}
    if job.mode == "test_code" and final.get("done") != job.nonce:
        return TestResult(name, False, "ok", "the test code did not run to its end", run)
    if test.expected_stdout is not None:
        if run.stdout_truncated:
            return TestResult(name, False, "ok", "the output was truncated", run)
        if normalize_output(run.stdout) != normalize_output(test.expected_stdout):
            return TestResult(name, False, "ok", "the output differs from expected_stdout", run)
    return TestResult(name, True, "ok", "", run)


# ----------------------------------------------------------------------------------------------
# Availability probe and unsafe mode.
# ----------------------------------------------------------------------------------------------


def _probe(launcher: Launcher, seccomp_filter: bytes | None) -> str | None:
    """Run ``print(6 * 7)`` the way real runs go; None if it worked, else why not."""
    job = _Job("program", "print(6 * 7)", b"")
    limits = Limits(cpu_s=5, wall_s=_PROBE_TIMEOUT_S)
    status_read, status_write = os.pipe()
    spawn = _spawn(job, limits, launcher, seccomp_filter, None, status_write)
    try:
        completed = subprocess.run(
            launcher.command(0, spawn),
            input=b"",
            capture_output=True,
            pass_fds=spawn.fds,
            env=HOST_ENV,
            timeout=_PROBE_TIMEOUT_S,
            start_new_session=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the sandbox could not be started: {exc}"
    finally:
        for fd in spawn.fds:
            os.close(fd)
    records: list[dict[str, Any]] = []
    try:
        os.set_blocking(status_read, False)
        with contextlib.suppress(BlockingIOError):
            records = status_records(os.read(status_read, 1 << 16))
    finally:
        os.close(status_read)
    final = next((record for record in records if "exit_code" in record), None)
    if completed.stdout == b"42\n" and final is not None and final.get("exit_code") == 0:
        return None
    detail = completed.stderr.decode("utf-8", errors="replace").strip()[-1000:]
    return f"a trial sandboxed run failed (exit {completed.returncode}): {detail or 'no output'}"


def _unsafe_workdir(cleanup: contextlib.ExitStack) -> str:
    workdir = tempfile.mkdtemp(prefix="rmserve-unsafe-run-")
    cleanup.callback(shutil.rmtree, workdir, True)
    return workdir


def _unsafe_env(workdir: str) -> dict[str, str]:
    return {"PATH": SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
