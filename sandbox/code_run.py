"""Run untrusted Python (a judge's or a policy's code) under bubblewrap.

Isolation design
----------------
Every execution (the program alone, or the program plus one test) gets a fresh sandbox made by
bubblewrap: new user, mount, pid, network, ipc, uts and cgroup namespaces.

* Filesystem: the sandbox root is an empty tmpfs, remounted read-only once populated. Only /usr
  (with /bin, /sbin, /lib, /lib64 as the symlinks or read-only dirs they are on the host) and the
  *base* interpreter installation (``sys.base_prefix``, never the service's venv) are bound,
  read-only. Nothing else of the host exists inside: no /etc, /home, /work, host /tmp; /root holds
  only the directories leading to the interpreter when it lives there (pyenv). /proc is a fresh
  procfs of the sandbox's pid namespace; /dev is bwrap's minimal /dev, read-only; /tmp and /dev/shm
  are private tmpfs of ``file_size_mb`` each, the only writable places. The cwd is /tmp.
* Environment: ``--clearenv`` plus PATH/HOME/TMPDIR/LANG, and bwrap itself is started with a
  two-variable environment, so the service's variables (secrets) never reach the sandbox.
* Code delivery: program, test code and limits travel as one JSON job through an anonymous memfd
  passed as an inherited fd; the in-sandbox harness reads and closes it before any user code
  runs. There is no code file to modify and no other run's file to read.
* Network: a new network namespace holding only a loopback that is down: no egress, no host
  loopback.
* Processes: ``--unshare-pid`` with bwrap's reaper as pid 1. When the harness exits, pid 1 exits
  and the kernel kills everything left in the namespace (orphans, daemons, double forks).
  ``--die-with-parent`` plus killing bwrap's process group tear the whole sandbox down on
  timeouts, output floods and cancellation.
* Privileges: the sandboxed code has no capabilities, ``no_new_privs``, cannot create user
  namespaces (``--disable-userns``), and runs under ``python -I -B``.

Root vs non-root
----------------
RLIMIT_NPROC is not enforced for host root, so as root each concurrency slot runs its sandbox
under its own unprivileged uid ``sandbox_uid_base + slot`` (60000+): ``setpriv`` drops uid, gids
and the capability bounding set, then bwrap creates its user namespace unprivileged. An
unprivileged bwrap cannot bind a path it cannot traverse (e.g. /root/.pyenv under a 0700 /root;
--ro-bind-fd does not help, bwrap realpath()s sources), so at start-up root builds a *staging*
mount namespace once (a root bwrap: read-only view of /, a 0755 tmpfs over the first
non-traversable ancestor of the interpreter, the interpreter bound back into it), keeps it alive
by an fd, and each run enters it with ``nsenter`` (no fork) before setpriv. Only setpriv and bwrap
run there; the host's mounts never change.
Command line as root (non-root: from the second ``setpriv`` on)::

    nsenter --mount=/proc/<service pid>/fd/N -- setpriv --reuid=U --regid=U --clear-groups
      --bounding-set=-all --inh-caps=-all -- setpriv --pdeathsig=KILL -- bwrap <sandbox> --
      <base python> -I -B -c <harness> JOB_FD STATUS_FD

The service is bwrap's direct parent: if the service dies, the kernel SIGKILLs bwrap (the parent
death signal is set after the uid change, which would clear it, and is sent with the dying
parent's credentials - root or the same uid, so it is allowed), and bwrap's pid 1 dies with it.
In both modes RLIMIT_NPROC is set *inside* the sandbox's own user namespace, where the kernel
(>= 5.14, per-namespace ucounts) counts only that run's tasks: the limit is per run even when the
uid is shared with the service (non-root) or reused by another runner. Checked by the tests.

Harness and verdict
-------------------
Inside the sandbox a small supervisor (the functions named ``_sandbox_*`` below, shipped as
source via ``python -I -c``; never called in the service) applies the rlimits, forks the user
process and ``wait4()``s it, then reports its exit code or signal, CPU time and whether the test
code ran to completion on a private status pipe. The user process executes the program and then
the test code in one fresh ``__main__`` namespace, so asserts see the program's definitions.
The verdict comes only from that report, the exit status of bwrap and the captured output -
never from files the code writes.
A test with ``code`` also requires that its code actually ran to the end: the harness writes a
per-run nonce after it, so a program that calls ``sys.exit(0)`` / ``os._exit(0)`` before the
tests fails them. This is a guard against trivial exit hacks, not a proof: the test code shares
the interpreter with the program, so a program that deliberately introspects or patches the
interpreter (e.g. reads the nonce from the harness frame, ``sys.settrace``) can still subvert it.

Limits and how each is detected
-------------------------------
* ``wall_s``: asyncio timeout around the whole run; the bwrap process group is SIGKILLed, the
  sandbox dies with it -> ``timeout``.
* ``cpu_s``: RLIMIT_CPU, rounded up to whole seconds, hard limit one second later; SIGXCPU, or
  SIGKILL after the user process used at least the soft limit -> ``cpu_limit``. RLIMIT_CPU is per
  process: a run's processes together can use more, bounded by ``wall_s``.
* ``memory_mb``: RLIMIT_AS (per process, so ``processes x memory_mb`` is the aggregate bound; a
  cgroup would be needed for a tighter one). Detected honestly as what the limit produces: a
  nonzero exit whose stderr ends with ``MemoryError`` (the harness prints at least that line even
  when the traceback can't be formatted), or a SIGSEGV/SIGBUS/SIGABRT whose stderr mentions an
  allocation failure -> ``memory_limit``. A program may of course print that line itself; it only
  misreports its own failure.
* ``processes``: RLIMIT_NPROC (see above); the harness's two processes (bwrap's pid 1 and the
  supervisor) are added on top. Forks beyond it fail with EAGAIN; a fork bomb ends at ``wall_s``.
* ``file_size_mb``: RLIMIT_FSIZE (Python ignores SIGXFSZ: the write fails with EFBIG) and the
  size of /tmp and /dev/shm (ENOSPC). Core dumps are disabled (RLIMIT_CORE=0).
* ``output_bytes``: stdout and stderr are each kept up to this; reading continues (discarding)
  until a stream passes 16x this, then the sandbox is killed -> ``output_limit``. The service
  holds at most ``output_bytes`` plus a 4 KiB tail per stream.
* Per-request limits can only lower the runner's limits: each field is clamped to the runner's
  (build them with ``dataclasses.replace(runner.limits, ...)``: unset fields take the class
  defaults).
* Other statuses: ``error`` = nonzero exit (uncaught exception, ``sys.exit(n)``); ``killed`` =
  ended by another signal (SIGSEGV, its own SIGKILL...), or the supervisor was killed.
  Checked in this order: output_limit, timeout, cpu_limit, memory_limit, killed, ok/error.

Concurrency
-----------
At most ``max_concurrency`` sandboxes run at once (each owns a slot, hence a uid as root).
Executions waiting for a slot count as ``queued``; a request is refused with
``ToolError("busy")`` when all slots are taken and ``max_queued`` executions already wait. An
admitted request queues all its executions (one per test), so it can push ``queued`` above
``max_queued`` by its own size, bounded by ``max_tests``. A request's executions take slots one
at a time, so concurrent requests interleave fairly.

``CodeResult.run`` is the program alone with ``stdin`` when no tests are given, and ``None``
when tests are given (each test has its own run; a test with ``code=""`` is "the program exits
0"). A test without its own ``stdin`` gets the request's ``stdin``.

``allow_unsafe=True`` is a development fallback used only when bubblewrap does not work: the
harness runs directly, as the service's uid, with the same rlimits in a temporary directory - no
filesystem, network, pid or uid isolation; the process group is killed after each run but
daemons that left it survive; as root RLIMIT_NPROC is not enforced at all. It logs a loud
warning. Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import CodeTest

logger = logging.getLogger(__name__)

RunStatus = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "killed"]
_Mode = Literal["bwrap-root", "bwrap-user", "unsafe"]

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64")
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
_DEFAULT_UID_BASE = 60000
_HARNESS_PROCESSES = 2  # bwrap's pid 1 and the supervisor share the run's user namespace
_HARD_OUTPUT_FACTOR = 16
_READ_CHUNK = 65536
_STDERR_TAIL_BYTES = 4096
_STATUS_MAX_BYTES = 1 << 16
_EOF_GRACE_S = 1.0
_PROBE_TIMEOUT_S = 30.0
_MEMORY_HINTS = ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")
_MEMORY_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one execution (the program alone, or the program plus one test)."""

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
    __test__ = False  # not a pytest class

    name: str
    passed: bool
    run: RunResult


@dataclass(frozen=True)
class CodeResult:
    run: RunResult | None
    tests: list[TestResult]
    passed: int
    failed: int


# ----------------------------------------------------------------------------------------------
# Inside the sandbox. These functions are shipped as source (`python -I -c`) and run there only.
# They must be self-contained: stdlib imports inside, no module globals but each other.
# ----------------------------------------------------------------------------------------------


def _sandbox_apply_limits(limits: dict[str, int]) -> None:
    """Set the run's rlimits on the supervisor (inherited by the user process); lower only."""
    import resource

    wanted = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),  # SIGXCPU, then SIGKILL
        resource.RLIMIT_AS: (limits["address_space_bytes"], limits["address_space_bytes"]),
        resource.RLIMIT_FSIZE: (limits["file_size_bytes"], limits["file_size_bytes"]),
        resource.RLIMIT_CORE: (0, 0),
    }
    if limits.get("processes") is not None:
        wanted[resource.RLIMIT_NPROC] = (limits["processes"], limits["processes"])
    for kind, (soft, hard) in wanted.items():
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _sandbox_report_exception(exc: BaseException) -> None:
    """Print the user's traceback without the harness frame; at least the exception's name."""
    import os
    import sys
    import traceback

    user_frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    try:
        traceback.print_exception(type(exc), exc, user_frames)
        sys.stderr.flush()
    except BaseException:  # e.g. no memory left to format it
        os.write(2, b"\n" + type(exc).__name__.encode() + b"\n")


def _sandbox_run_user_code(job: dict[str, Any], done_fd: int) -> None:
    """In the forked user process: the program, then the test code, in one fresh ``__main__``.

    Returns normally (the interpreter then shuts down as for any script) or raises SystemExit.
    The nonce goes to ``done_fd`` only after the test code ran to its end.
    """
    import contextlib
    import linecache
    import os
    import sys
    import types

    units = [("<program>", job["program"])]
    if job["test_code"] is not None:
        units.append(("<test>", job["test_code"]))
    else:
        os.close(done_fd)
    for filename, source in units:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv = ["<program>"]
    try:
        for filename, source in units:
            code = compile(source, filename, "exec", dont_inherit=True)  # not our __future__
            exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        _sandbox_report_exception(exc)
        raise SystemExit(1) from None
    if job["test_code"] is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.write(done_fd, job["nonce"].encode())
        os.close(done_fd)


def _sandbox_main(job_fd: int, status_fd: int) -> None:
    """Supervisor: read the job, apply limits, fork the user process, report how it ended."""
    import json
    import os

    with os.fdopen(job_fd, "rb") as job_file:
        job = json.loads(job_file.read())
    _sandbox_apply_limits(job["limits"])
    os.write(status_fd, b'{"started": true}\n')
    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        os.close(done_read)
        _sandbox_run_user_code(job, done_write)
        return
    os.close(done_write)
    _, wait_status, usage = os.wait4(child, 0)
    os.set_blocking(done_read, False)
    try:
        done = os.read(done_read, 256).decode(errors="replace")
    except BlockingIOError:
        done = ""
    record = {
        "exit_code": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
        "signal": os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "done": done,
    }
    os.write(status_fd, (json.dumps(record) + "\n").encode())
    os._exit(0)


@functools.cache
def _harness_source() -> str:
    functions = (
        _sandbox_apply_limits,
        _sandbox_report_exception,
        _sandbox_run_user_code,
        _sandbox_main,
    )
    body = "\n\n".join(inspect.getsource(function) for function in functions)
    return (
        "from __future__ import annotations\n\n"
        f"{body}\n\n"
        "import sys\n"
        "_sandbox_main(int(sys.argv[1]), int(sys.argv[2]))\n"
    )


# ----------------------------------------------------------------------------------------------
# Building the command line.
# ----------------------------------------------------------------------------------------------


def _base_interpreter() -> tuple[str, str]:
    """(installation prefix, executable) of the base interpreter, not the venv's."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(sys.base_prefix), os.path.realpath(executable)


def _system_mount_args() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _is_within(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _interpreter_mount_args(prefix: str) -> list[str]:
    system_dirs = [os.path.realpath(path) for path in _SYSTEM_DIRS if os.path.isdir(path)]
    return [] if _is_within(prefix, system_dirs) else ["--ro-bind", prefix, prefix]


def _sandbox_args(bwrap: str, prefix: str, limits: Limits, mount_proc: bool) -> list[str]:
    """The sandboxing bwrap invocation (unprivileged), up to and including ``--``. Without
    `mount_proc` the sandbox has no /proc at all (container runtimes mask parts of theirs,
    and then the kernel refuses a fresh one)."""
    tmpfs_bytes = str(limits.file_size_mb * 1024 * 1024)
    return [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname", "sandbox",
        "--clearenv",
        "--setenv", "PATH", _SANDBOX_PATH,
        "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        *_system_mount_args(),
        *_interpreter_mount_args(prefix),
        *(["--proc", "/proc"] if mount_proc else []),
        "--dev", "/dev",
        "--size", tmpfs_bytes, "--tmpfs", "/tmp",
        "--size", tmpfs_bytes, "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", "/tmp",
        "--",
    ]  # fmt: skip


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (proper ancestors, without '/')."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: index + 1]) for index in range(len(parts))]


def _expose_interpreter_args(prefix: str) -> list[str]:
    """Staging mounts making ``prefix`` reachable for an unprivileged uid, if it is not."""
    ancestors = _ancestors(prefix)
    for index, directory in enumerate(ancestors):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            args = ["--perms", "0755", "--tmpfs", directory]
            for inner in ancestors[index + 1 :]:
                args += ["--perms", "0755", "--dir", inner]
            return [*args, "--ro-bind", prefix, prefix]
    return []


def _staging_args(bwrap: str, prefix: str, info_fd: int) -> list[str]:
    """Root only: a private mount namespace (read-only view of the host) in which an
    unprivileged uid can reach the interpreter. Nothing but setpriv and bwrap runs in it."""
    return [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev-bind", "/dev", "/dev",
        "--bind", "/proc", "/proc",
        *_expose_interpreter_args(prefix),
        "--die-with-parent",
        "--info-fd", str(info_fd),
        "--",
    ]  # fmt: skip


def _open_staging_namespace(bwrap: str, prefix: str) -> int:
    """Create the staging mount namespace; return an fd that keeps it alive (for nsenter).

    A short-lived root bwrap builds it around ``cat``. bwrap reports the child's pid before the
    child has built its mounts, so wait for ``cat`` to echo a line (setup done), then open the
    child's namespace and let it exit. The host's own mounts never change."""
    info_read, info_write = os.pipe()
    try:
        with subprocess.Popen(
            [*_staging_args(bwrap, prefix, info_write), "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(info_write,),
            env=_HOST_ENV,
        ) as holder:
            os.close(info_write)
            info_write = -1
            try:
                return _namespace_of_ready_holder(holder, _read_json_object(info_read))
            finally:
                holder.kill()
    finally:
        os.close(info_read)
        if info_write >= 0:
            os.close(info_write)


def _namespace_of_ready_holder(holder: subprocess.Popen[bytes], info: dict[str, Any] | None) -> int:
    assert holder.stdin is not None and holder.stdout is not None
    if info is None or not isinstance(info.get("child-pid"), int):
        raise OSError(f"bwrap did not start: {holder.communicate(timeout=5)[1]!r}")
    holder.stdin.write(b"ready\n")
    holder.stdin.flush()
    if holder.stdout.readline() != b"ready\n":
        raise OSError(f"bwrap did not start: {holder.communicate(timeout=5)[1]!r}")
    return os.open(f"/proc/{info['child-pid']}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


def _read_json_object(fd: int) -> dict[str, Any] | None:
    """bwrap's --info-fd document (the fd may stay open after it: stop at the object's end)."""
    data = b""
    while not data.rstrip().endswith(b"}") and (chunk := os.read(fd, 4096)):
        data += chunk
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _enter_staging_args(nsenter: str, namespace_fd: int) -> list[str]:
    """Enter the staging namespace without forking: the service stays bwrap's parent. nsenter
    opens the namespace through the service's own fd table, so the fd is never inherited."""
    return [nsenter, f"--mount=/proc/{os.getpid()}/fd/{namespace_fd}", "--"]


def _drop_to_uid_args(setpriv: str, uid: int) -> list[str]:
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
    ]


def _die_with_service_args(setpriv: str) -> list[str]:
    """SIGKILL bwrap when the service dies. Set after any uid change (a credential change
    clears it); the service is bwrap's parent and, root or same uid, may signal it."""
    return [setpriv, "--pdeathsig=KILL", "--"]


def _harness_args(executable: str, job_fd: int, status_fd: int) -> list[str]:
    return [executable, "-I", "-B", "-c", _harness_source(), str(job_fd), str(status_fd)]


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


@dataclass(frozen=True)
class _Launcher:
    """How to start one harness: mode, binaries, interpreter, uids, staging namespace."""

    mode: _Mode
    bwrap: str
    setpriv: str
    nsenter: str
    prefix: str
    executable: str
    uid_base: int
    staging_fd: int | None = None  # bwrap-root only
    mount_proc: bool = True

    def command(self, slot: int, limits: Limits, job_fd: int, status_fd: int) -> list[str]:
        harness = _harness_args(self.executable, job_fd, status_fd)
        if self.mode == "unsafe":
            return harness
        sandbox = [*_sandbox_args(self.bwrap, self.prefix, limits, self.mount_proc), *harness]
        if self.mode == "bwrap-user":
            return [*_die_with_service_args(self.setpriv), *sandbox]
        assert self.staging_fd is not None
        return [
            *_enter_staging_args(self.nsenter, self.staging_fd),
            *_drop_to_uid_args(self.setpriv, self.uid_base + slot),
            *_die_with_service_args(self.setpriv),
            *sandbox,
        ]

    def process_limit(self, limits: Limits) -> int | None:
        """RLIMIT_NPROC for the run. In a sandbox the count is per user namespace (per run);
        unsafe mode counts the service's uid, so add what that uid already runs."""
        if self.mode != "unsafe":
            return limits.processes + _HARNESS_PROCESSES
        existing = _tasks_owned_by(os.getuid())
        return None if existing is None else existing + limits.processes + 1

    def close(self) -> None:
        if self.staging_fd is not None:
            os.close(self.staging_fd)


def _bwrap_launcher(
    bwrap_name: str, uid_base: int, mount_proc: bool = True
) -> tuple[_Launcher | None, str | None]:
    """A working sandbox launcher, or why there is none (after a trial run)."""
    bwrap, setpriv, nsenter = (shutil.which(name) for name in (bwrap_name, "setpriv", "nsenter"))
    root = os.geteuid() == 0
    if bwrap is None:
        return None, f"bubblewrap ({bwrap_name!r}) is not installed or not on PATH"
    if setpriv is None or (root and nsenter is None):
        return None, "util-linux `setpriv`" + (" and `nsenter` are" if root else " is") + " needed"
    prefix, executable = _base_interpreter()
    staging_fd = None
    if root:
        try:
            staging_fd = _open_staging_namespace(bwrap, prefix)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"could not create the staging mount namespace: {exc}"
    launcher = _Launcher(
        mode="bwrap-root" if root else "bwrap-user",
        bwrap=bwrap,
        setpriv=setpriv,
        nsenter=nsenter or "nsenter",
        prefix=prefix,
        executable=executable,
        uid_base=uid_base,
        staging_fd=staging_fd,
        mount_proc=mount_proc,
    )
    problem = _probe(launcher)
    if problem is None:
        return launcher, None
    launcher.close()
    if mount_proc and "mount proc" in problem:
        problem += (
            " (in a container, /proc is masked: turn mount_proc off, "
            "RMSERVE_SANDBOX_MOUNT_PROC=false)"
        )
    return None, problem


def _unsafe_launcher() -> _Launcher:
    prefix, executable = _base_interpreter()
    return _Launcher("unsafe", "", "", "", prefix, executable, uid_base=0)


# ----------------------------------------------------------------------------------------------
# One execution: job channel, process, output, verdict.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    program: str
    test_code: str | None
    stdin: bytes
    nonce: str


@dataclass(frozen=True)
class _Execution:
    result: RunResult
    test_code_completed: bool


def _job_payload(job: _Job, limits: Limits, processes: int | None) -> bytes:
    rlimits = {
        "cpu_s": limits.cpu_rlimit_s,
        "address_space_bytes": limits.memory_mb * 1024 * 1024,
        "file_size_bytes": limits.file_size_mb * 1024 * 1024,
    }
    if processes is not None:
        rlimits["processes"] = processes
    payload = {
        "program": job.program,
        "test_code": job.test_code,
        "nonce": job.nonce,
        "limits": rlimits,
    }
    return json.dumps(payload).encode()


def _anonymous_file(data: bytes, name: str) -> int:
    """A readable fd holding ``data`` at offset 0, with no name anywhere in a filesystem."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as unnamed:
            fd = os.dup(unnamed.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_status_records(fd: int) -> list[dict[str, Any]]:
    """The JSON lines the supervisor wrote (it is dead by now; read without blocking)."""
    os.set_blocking(fd, False)
    data = bytearray()
    with contextlib.suppress(BlockingIOError):
        while len(data) < _STATUS_MAX_BYTES and (chunk := os.read(fd, _READ_CHUNK)):
            data += chunk
    records = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


class _Capture(asyncio.Protocol):
    """One output pipe: keep the first ``keep`` bytes and a short tail, count everything, call
    ``on_overflow`` once past ``hard_cap``. Reads to EOF whatever happens (discarding), so
    memory stays bounded and the pipe never stalls the sandbox's teardown."""

    def __init__(self, keep: int, hard_cap: int) -> None:
        self.keep = keep
        self.hard_cap = hard_cap
        self.on_overflow: Callable[[], None] = lambda: None
        self.kept = bytearray()
        self.tail = b""
        self.total = 0
        self.overflowed = False
        self.eof: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        self.tail = (self.tail + data)[-_STDERR_TAIL_BYTES:]
        if self.total > self.hard_cap and not self.overflowed:
            self.overflowed = True
            self.on_overflow()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    @property
    def truncated(self) -> bool:
        return self.total > self.keep

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


async def _open_capture(limits: Limits, cleanup: contextlib.ExitStack) -> tuple[_Capture, int]:
    """A pipe whose read end feeds a ``_Capture``; returns it and the write end for the child."""
    read_fd, write_fd = os.pipe()
    capture = _Capture(limits.output_bytes, limits.output_hard_cap)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: capture, os.fdopen(read_fd, "rb", buffering=0)
    )
    cleanup.callback(transport.close)
    return capture, write_fd


@dataclass(frozen=True)
class _Observed:
    """What the host saw of one execution."""

    returncode: int
    timed_out: bool
    stdout: _Capture
    stderr: _Capture
    wall_s: float

    @property
    def output_overflowed(self) -> bool:
        return self.stdout.overflowed or self.stderr.overflowed


def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL bwrap's process group; its pid-1 child dies with it and takes the pid namespace
    (every sandboxed process) along."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _watch(
    process: asyncio.subprocess.Process,
    stdout: _Capture,
    stderr: _Capture,
    limits: Limits,
    started: float,
    reap_group: bool,
) -> _Observed:
    """Enforce the wall clock and the output cap until the sandbox is gone. ``reap_group``:
    also kill the process group after a normal exit (unsafe mode has no pid namespace)."""

    def kill_if_running() -> None:
        if process.returncode is None:
            _kill_process_group(process)

    stdout.on_overflow = stderr.on_overflow = kill_if_running
    timed_out = False
    try:
        async with asyncio.timeout(limits.wall_s):
            await process.wait()
    except TimeoutError:
        timed_out = True
    finally:
        kill_if_running()  # timeout or cancellation: take the whole sandbox down
        returncode = await process.wait()
        wall_s = time.monotonic() - started
        if reap_group:
            _kill_process_group(process)
        # EOF is immediate once the sandbox is gone; only unsafe-mode escapees can hold it
        await asyncio.wait([stdout.eof, stderr.eof], timeout=_EOF_GRACE_S)
    return _Observed(returncode, timed_out, stdout, stderr, round(wall_s, 3))


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _signal_from_returncode(returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    return returncode - 128 if returncode > 128 else None


def _ran_out_of_memory(exit_code: int | None, sig: int | None, stderr_tail: bytes) -> bool:
    text = stderr_tail.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last_line = lines[-1] if lines else ""
    if exit_code not in (None, 0) and (
        last_line == "MemoryError" or last_line.startswith("MemoryError:")
    ):
        return True
    return sig in _MEMORY_SIGNALS and any(hint in text for hint in _MEMORY_HINTS)


def _classify(
    observed: _Observed, final: dict[str, Any] | None, limits: Limits
) -> tuple[RunStatus, int | None, int | None]:
    """(status, exit_code, signal) of an execution."""
    killed = int(signal.SIGKILL)
    if observed.output_overflowed:
        return "output_limit", None, killed
    if observed.timed_out:
        return "timeout", None, killed
    if final is None:  # the supervisor itself was killed (by the user's code)
        return "killed", None, _signal_from_returncode(observed.returncode)
    exit_code, sig = _optional_int(final.get("exit_code")), _optional_int(final.get("signal"))
    cpu_s = final.get("cpu_s")
    used_cpu = float(cpu_s) if isinstance(cpu_s, int | float) else 0.0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and used_cpu >= limits.cpu_rlimit_s):
        return "cpu_limit", None, sig
    if _ran_out_of_memory(exit_code, sig, observed.stderr.tail):
        return "memory_limit", exit_code, sig
    if sig is not None:
        return "killed", None, sig
    return ("ok" if exit_code == 0 else "error"), exit_code, None


def _judge_execution(
    observed: _Observed, records: list[dict[str, Any]], limits: Limits, nonce: str
) -> _Execution:
    if not observed.timed_out and not any(record.get("started") for record in records):
        detail = observed.stderr.tail.decode("utf-8", errors="replace").strip()
        raise ToolError(
            "sandbox_failed",
            f"the sandbox did not start (exit {observed.returncode}): {detail[-1000:]}",
        )
    final = next((record for record in reversed(records) if "exit_code" in record), None)
    status, exit_code, sig = _classify(observed, final, limits)
    result = RunResult(
        status=status,
        exit_code=exit_code,
        signal=sig,
        stdout=observed.stdout.text(),
        stderr=observed.stderr.text(),
        stdout_truncated=observed.stdout.truncated,
        stderr_truncated=observed.stderr.truncated,
        wall_s=observed.wall_s,
    )
    completed = final is not None and final.get("done") == nonce
    return _Execution(result, completed)


def _normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()


def _test_passed(test: CodeTest, execution: _Execution) -> bool:
    """Exit 0 (status "ok"); with ``code``: the test code ran to its end; with
    ``expected_stdout``: untruncated stdout equal modulo trailing whitespace per line and at
    the end."""
    run = execution.result
    if run.status != "ok":
        return False
    if test.code is not None and not execution.test_code_completed:
        return False
    if test.expected_stdout is not None:
        if run.stdout_truncated:
            return False
        return _normalize_output(run.stdout) == _normalize_output(test.expected_stdout)
    return True


# ----------------------------------------------------------------------------------------------
# Availability probe.
# ----------------------------------------------------------------------------------------------


def _probe(launcher: _Launcher) -> str | None:
    """Run ``print(6 * 7)`` the way real runs go; None if it worked, else why not."""
    job = _Job(program="print(6 * 7)", test_code=None, stdin=b"", nonce="probe")
    limits = Limits(cpu_s=5, wall_s=_PROBE_TIMEOUT_S)
    job_fd = _anonymous_file(_job_payload(job, limits, launcher.process_limit(limits)), "job")
    status_read, status_write = os.pipe()
    try:
        completed = subprocess.run(
            launcher.command(0, limits, job_fd, status_write),
            input=b"",
            capture_output=True,
            pass_fds=(job_fd, status_write),
            env=_HOST_ENV,
            timeout=_PROBE_TIMEOUT_S,
            start_new_session=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the sandbox could not be started: {exc}"
    finally:
        os.close(job_fd)
        os.close(status_write)
    try:
        records = _read_status_records(status_read)
    finally:
        os.close(status_read)
    final = next((record for record in records if "exit_code" in record), None)
    if completed.stdout == b"42\n" and final is not None and final.get("exit_code") == 0:
        return None
    detail = completed.stderr.decode("utf-8", errors="replace").strip()[-1000:]
    return f"a trial sandboxed run failed (exit {completed.returncode}): {detail or 'no output'}"


# ----------------------------------------------------------------------------------------------
# The runner.
# ----------------------------------------------------------------------------------------------


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
        sandbox_uid_base: int = _DEFAULT_UID_BASE,
        mount_proc: bool = True,
    ) -> None:
        if max_concurrency < 1 or max_queued < 0 or max_tests < 1:
            raise ValueError("need max_concurrency >= 1, max_queued >= 0, max_tests >= 1")
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.max_tests = max_tests
        self._launcher = self._choose_launcher(bwrap, allow_unsafe, sandbox_uid_base, mount_proc)
        self._release_launcher = weakref.finalize(self, self._launcher.close)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._free_slots = list(reversed(range(max_concurrency)))
        self._in_flight = 0
        self._queued = 0

    @staticmethod
    def available(bwrap: str = "bwrap", mount_proc: bool = True) -> str | None:
        """None if bubblewrap sandboxes work here (a trial run succeeded), else the reason."""
        launcher, problem = _bwrap_launcher(bwrap, _DEFAULT_UID_BASE, mount_proc)
        if launcher is not None:
            launcher.close()
        return problem

    @staticmethod
    def _choose_launcher(
        bwrap: str, allow_unsafe: bool, uid_base: int, mount_proc: bool
    ) -> _Launcher:
        launcher, problem = _bwrap_launcher(bwrap, uid_base, mount_proc)
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
        unsafe = _unsafe_launcher()
        unsafe_problem = _probe(unsafe)
        if unsafe_problem is not None:
            raise ToolError("unavailable", f"{problem}; unsafe mode failed too: {unsafe_problem}")
        return unsafe

    def close(self) -> None:
        """Release the staging namespace (also done when the runner is garbage-collected)."""
        self._release_launcher()

    @property
    def mode(self) -> str:
        """'bwrap-root', 'bwrap-user' or 'unsafe'."""
        return self._launcher.mode

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
    ) -> CodeResult:
        """Run ``code`` alone (no tests) or once per test, each in its own fresh sandbox.

        ``limits`` can only lower the runner's limits (clamped field by field; build them with
        ``dataclasses.replace(runner.limits, ...)``). Raises
        ToolError("busy") when all slots are busy and ``max_queued`` executions already wait,
        ToolError("invalid_arguments") beyond ``max_tests`` tests, ToolError("sandbox_failed")
        if a sandbox could not start.
        """
        effective = self.limits if limits is None else limits.clamped_to(self.limits)
        if len(tests) > self.max_tests:
            raise ToolError("invalid_arguments", f"at most {self.max_tests} tests per request")
        if not tests:
            (execution,) = await self._execute_all([_program_job(code, stdin)], effective)
            return CodeResult(run=execution.result, tests=[], passed=0, failed=0)
        jobs = [_test_job(code, stdin, test) for test in tests]
        executions = await self._execute_all(jobs, effective)
        results = [
            TestResult(
                name=test.name or f"test_{index}",
                passed=_test_passed(test, execution),
                run=execution.result,
            )
            for index, (test, execution) in enumerate(zip(tests, executions, strict=True))
        ]
        passed = sum(result.passed for result in results)
        return CodeResult(run=None, tests=results, passed=passed, failed=len(results) - passed)

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
        payload = _job_payload(job, limits, launcher.process_limit(limits))
        with contextlib.ExitStack() as cleanup:
            workdir = _unsafe_workdir(cleanup) if launcher.mode == "unsafe" else None
            stdout, stdout_write = await _open_capture(limits, cleanup)
            stderr, stderr_write = await _open_capture(limits, cleanup)
            status_read, status_write = os.pipe()
            cleanup.callback(os.close, status_read)
            with contextlib.ExitStack() as child_ends:  # closed as soon as the child has them
                for fd in (stdout_write, stderr_write, status_write):
                    child_ends.callback(os.close, fd)
                job_fd = _anonymous_file(payload, "job")
                child_ends.callback(os.close, job_fd)
                stdin_fd = _anonymous_file(job.stdin, "stdin")
                child_ends.callback(os.close, stdin_fd)
                started = time.monotonic()
                process = await asyncio.create_subprocess_exec(
                    *launcher.command(slot, limits, job_fd, status_write),
                    stdin=stdin_fd,
                    stdout=stdout_write,
                    stderr=stderr_write,
                    pass_fds=(job_fd, status_write),
                    env=_HOST_ENV if workdir is None else _unsafe_env(workdir),
                    cwd=workdir,
                    start_new_session=True,
                )
            observed = await _watch(
                process, stdout, stderr, limits, started, reap_group=launcher.mode == "unsafe"
            )
            return _judge_execution(observed, _read_status_records(status_read), limits, job.nonce)


def _unsafe_workdir(cleanup: contextlib.ExitStack) -> str:
    workdir = tempfile.mkdtemp(prefix="rmserve-unsafe-run-")
    cleanup.callback(shutil.rmtree, workdir, True)
    return workdir


def _unsafe_env(workdir: str) -> dict[str, str]:
    return {"PATH": _SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _program_job(code: str, stdin: str) -> _Job:
    return _Job(program=code, test_code=None, stdin=stdin.encode(), nonce=secrets.token_hex(16))


def _test_job(code: str, stdin: str, test: CodeTest) -> _Job:
    test_stdin = test.stdin if test.stdin is not None else stdin
    return _Job(
        program=code,
        test_code=test.code,
        stdin=test_stdin.encode(),
        nonce=secrets.token_hex(16),
    )
