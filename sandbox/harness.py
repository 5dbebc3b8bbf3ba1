"""The code that runs inside a code sandbox: a supervisor (pid 1) and the user processes it forks.

Nothing here runs in the service. ``harness_source()`` ships these functions as source text to
``python -I -B -S -c`` inside bubblewrap; they must stay self-contained (stdlib imports inside
the functions, no module globals but each other and ``sandbox_encode``).

The supervisor is the sandbox's pid 1 (``bwrap --as-pid-1``): the kernel ignores signals that
processes of the namespace send it, it makes itself non-dumpable (so /proc/1/mem, /proc/1/fd and
ptrace are closed to the user's processes, which the seccomp filter also denies ptrace), and when
it exits the kernel kills every process left in the namespace. It reads the job, applies the
rlimits to itself before anything else runs, then forks user processes and reports on
``status_fd``, which no user process holds.

Modes (``job["mode"]``):

* ``program``: one user process runs the program with the host's stdin; report how it ended.
* ``calls``: a user process runs the program, then evaluates each call expression in the
  program's namespace and writes each value, typed by ``sandbox_encode``, on its own claims
  pipe. The supervisor forwards each claim with the call's index, times each call against its
  own wall limit, and when a call hangs or kills its process it records that and starts a new
  user process from the next call. A claim is only what the candidate's process says it
  computed: expected values are never in the sandbox, and the host decides pass or fail.
* ``test_code``: in-process test code (unsafe for RL: it shares the candidate's interpreter).
  The user process runs the program, then reads the test code from the secret descriptor (it is
  in no Python object while the program runs, nor in ``linecache``), runs it with Python's own
  builtins, and only then reads the completion nonce from the same descriptor and writes it to
  its done pipe. The harness's exec/compile/os functions are bound before user code runs. This
  closes the harness's Python state to the program, not the process: a program that reads the
  secret descriptor itself (or its own memory) can forge completion. Nothing in-process can
  prevent that; call and output tests are the formats for untrusted code.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from rmserve.sandbox.values import sandbox_encode


def _sandbox_make_undumpable() -> None:
    """PR_SET_DUMPABLE 0: no ptrace-mode access to this process (/proc/PID/mem, fd, environ)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)


def _sandbox_add_site_builtins() -> None:
    """``exit()`` and ``quit()``, which ``site`` would add (the interpreter runs with -S)."""
    import builtins

    def leave(code: object = None) -> None:
        raise SystemExit(code)

    builtins.exit = builtins.quit = leave  # type: ignore[assignment]


def _sandbox_keep_fds(keep: list[int]) -> None:
    """Close every descriptor but ``keep`` (whatever the spawning event loop leaked)."""
    import os

    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _sandbox_apply_limits(limits: dict[str, Any], cpu_s: int) -> None:
    """Lower the rlimits of this process (children inherit them); never raise one."""
    import resource

    wanted = {
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),  # SIGXCPU, then SIGKILL
        resource.RLIMIT_AS: (limits["address_space_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (limits["file_size_bytes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if limits.get("processes") is not None:
        wanted[resource.RLIMIT_NPROC] = (limits["processes"],) * 2
    for kind, (soft, hard) in wanted.items():
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _sandbox_kill_others(child: int) -> None:
    """Kill every process of the run but this one, and reap them. As pid 1 of the sandbox's
    namespace that is kill(-1); without a pid namespace (unsafe mode) the child's session."""
    import os
    import signal
    import time

    for _ in range(200):
        try:
            if os.getpid() == 1:
                os.kill(-1, signal.SIGKILL)
            else:
                os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


def _sandbox_report_exception(exc: BaseException) -> None:
    """Print the user's traceback without harness frames; at least the exception's name."""
    import os
    import sys
    import traceback

    frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    try:
        traceback.print_exception(type(exc), exc, frames)
        sys.stderr.flush()
    except BaseException:  # e.g. no memory left to format it
        os.write(2, b"\n" + type(exc).__name__.encode(errors="replace") + b"\n")


def _sandbox_flush() -> None:
    import contextlib
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _sandbox_exec_program(source: str, compile_: Any, exec_: Any) -> dict[str, Any]:
    """Run the program as a fresh ``__main__`` module; its namespace. An exception exits 1
    with the user's traceback; SystemExit leaves as it came."""
    import linecache
    import sys
    import types

    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv = ["<program>"]
    try:
        exec_(compile_(source, "<program>", "exec", dont_inherit=True), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        _sandbox_report_exception(exc)
        raise SystemExit(1) from None
    return module.__dict__


def _sandbox_child_calls(job: dict[str, Any], start: int, claims_fd: int) -> None:
    """User process of ``calls`` mode: the program, then calls ``start``... as claims."""
    import builtins
    import json
    import os

    compile_, eval_, exec_, write, type_ = compile, eval, exec, os.write, type
    dumps = json.JSONEncoder(check_circular=False).encode
    encode = sandbox_encode
    pristine = dict(builtins.__dict__)
    limits = job["limits"]
    codes = [compile_(call, "<call>", "eval", dont_inherit=True) for call in job["calls"]]
    try:
        namespace = _sandbox_exec_program(job["program"], compile_, exec_)
    except SystemExit as stop:
        _sandbox_flush()
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    _sandbox_flush()
    write(claims_fd, b'{"ready": true}\n')
    for index in range(start, len(codes)):
        scope = dict(namespace)
        scope["__builtins__"] = pristine
        for name in codes[index].co_names:  # a call's builtin names are Python's own
            if name in pristine:
                scope[name] = pristine[name]
        claim: dict[str, Any] = {"call": index}
        try:
            value = eval_(codes[index], scope)
        except BaseException as exc:
            try:
                claim["raised"] = type_(exc).__name__
            except BaseException:
                claim["raised"] = "exception"
            _sandbox_report_exception(exc)
        else:
            try:
                claim["value"] = encode(value, limits["value_depth"], limits["value_items"])
            except BaseException as exc:
                claim["unserialisable"] = str(exc.args[0]) if exc.args else "unserialisable"
        _sandbox_flush()
        line = (dumps(claim) + "\n").encode()
        if len(line) > limits["claim_bytes"]:
            line = (dumps({"call": index, "unserialisable": "the value is too large"})).encode()
            line += b"\n"
        view = memoryview(line)
        while view:
            view = view[write(claims_fd, view) :]
    os._exit(0)


def _sandbox_child_once(job: dict[str, Any], done_fd: int, secret_fd: int) -> None:
    """User process of ``program`` and ``test_code`` modes."""
    import builtins
    import os

    compile_, exec_, pread, write, close = compile, exec, os.pread, os.write, os.close
    pristine = dict(builtins.__dict__)
    if secret_fd < 0:
        close(done_fd)
    try:
        namespace = _sandbox_exec_program(job["program"], compile_, exec_)
        if secret_fd < 0:
            return
        length = int(pread(secret_fd, 16, 0))
        scope = dict(namespace)
        scope["__builtins__"] = pristine
        test = compile_(pread(secret_fd, length, 16).decode(), "<test>", "exec", dont_inherit=True)
        for name in test.co_names:
            if name in pristine:
                scope[name] = pristine[name]
        exec_(test, scope)
    except SystemExit:
        raise
    except BaseException as exc:
        _sandbox_report_exception(exc)
        raise SystemExit(1) from None
    _sandbox_flush()
    write(done_fd, pread(secret_fd, 64, 16 + length))
    close(done_fd)


def _sandbox_wait_exit(child: int) -> dict[str, Any]:
    import os

    _, status, usage = os.wait4(child, 0)
    return {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _sandbox_run_once(job: dict[str, Any], status_fd: int, secret_fd: int, report: Any) -> None:
    import os

    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        os.close(done_read)
        os.setsid()
        _sandbox_apply_limits(job["limits"], job["limits"]["cpu_s"])
        code = 0
        try:
            _sandbox_child_once(job, done_write, secret_fd)
        except SystemExit as stop:
            code = stop.code if type(stop.code) is int else (0 if stop.code is None else 1)
            if type(stop.code) is str:
                os.write(2, stop.code.encode(errors="replace") + b"\n")
        _sandbox_flush()
        os._exit(code)
    os.close(done_write)
    if secret_fd >= 0:
        os.close(secret_fd)
    record = _sandbox_wait_exit(child)
    _sandbox_kill_others(child)
    os.set_blocking(done_read, False)
    try:
        record["done"] = os.read(done_read, 256).decode(errors="replace")
    except BlockingIOError:
        record["done"] = ""
    report(record)


def _sandbox_watch_calls(
    child: int, claims: int, start: int, job: dict[str, Any], report: Any
) -> int:
    """Follow one user process of ``calls`` mode; the index of the next call to run."""
    import json
    import os
    import select
    import time

    limits, total = job["limits"], len(job["calls"])
    state: dict[str, Any] = {"ready": False, "current": start, "buffer": b""}

    def consume(data: bytes) -> bool:
        """Forward the complete claims in ``data``; False when they exceed the size bound."""
        state["buffer"] += data
        if len(state["buffer"]) > limits["claim_bytes"] + 64:
            return False
        *lines, state["buffer"] = state["buffer"].split(b"\n")
        for line in lines:
            try:
                claim = json.loads(line)
            except (ValueError, RecursionError):  # not a claim the harness wrote
                continue
            if not isinstance(claim, dict):
                continue
            if claim.get("ready") is True and not state["ready"]:
                state["ready"] = True
            elif state["ready"] and claim.get("call") == state["current"] < total:
                report({"call": state["current"], "claim": claim})
                state["current"] += 1
            else:
                continue
            state["deadline"] = time.monotonic() + limits["call_wall_s"]
        return True

    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(claims, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    state["deadline"] = time.monotonic() + limits["wall_s"]
    outcome: dict[str, Any] | None = None
    while outcome is None:
        left = state["deadline"] - time.monotonic()
        if left <= 0:
            outcome = {"status": "timeout"}
            break
        events = dict(poller.poll(left * 1000))
        if claims in events:
            data = os.read(claims, 65536)
            if not data:
                poller.unregister(claims)
            elif not consume(data):
                outcome = {"status": "value_limit"}
        if pidfd in events and outcome is None:
            outcome = _sandbox_wait_exit(child)
    _sandbox_kill_others(child)
    os.close(pidfd)
    if "status" not in outcome or outcome["status"] != "timeout":
        os.set_blocking(claims, False)
        try:
            while (data := os.read(claims, 65536)) and consume(data):
                pass
        except BlockingIOError:
            pass
    current: int = state["current"]
    if current >= total:
        return total
    if not state["ready"]:
        report({"program": outcome})
        return total
    report({"call": current, "status": "crashed", **outcome})
    return current + 1


def _sandbox_run_calls(job: dict[str, Any], status_fd: int, report: Any) -> None:
    import os

    index, total = 0, len(job["calls"])
    while index < total:
        claims_read, claims_write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(status_fd)
            os.close(claims_read)
            os.setsid()
            _sandbox_apply_limits(job["limits"], job["limits"]["cpu_s"] * (1 + total - index))
            try:
                _sandbox_child_calls(job, index, claims_write)
            finally:
                os._exit(1)
        os.close(claims_write)
        index = _sandbox_watch_calls(child, claims_read, index, job, report)
        os.close(claims_read)


def _sandbox_main(job_fd: int, status_fd: int, secret_fd: int) -> None:
    """pid 1: no dumps, only our descriptors, the job, the limits; then the mode's work."""
    import json
    import os

    _sandbox_make_undumpable()
    _sandbox_keep_fds([0, 1, 2, job_fd, status_fd, *([secret_fd] if secret_fd >= 0 else [])])
    with os.fdopen(job_fd, "rb") as job_file:
        job = json.loads(job_file.read())
    _sandbox_apply_limits(job["limits"], job["limits"]["run_cpu_s"])

    def report(record: dict[str, Any]) -> None:
        os.write(status_fd, (json.dumps(record) + "\n").encode())

    _sandbox_add_site_builtins()
    report({"started": True})
    if job["mode"] == "calls":
        _sandbox_run_calls(job, status_fd, report)
    else:
        _sandbox_run_once(job, status_fd, secret_fd, report)
    report({"finished": True})
    os._exit(0)


@functools.cache
def harness_source() -> str:
    """The harness as one ``python -c`` script taking JOB_FD STATUS_FD [SECRET_FD]."""
    functions = (
        sandbox_encode,
        _sandbox_make_undumpable,
        _sandbox_add_site_builtins,
        _sandbox_keep_fds,
        _sandbox_apply_limits,
        _sandbox_kill_others,
        _sandbox_report_exception,
        _sandbox_flush,
        _sandbox_exec_program,
        _sandbox_child_calls,
        _sandbox_child_once,
        _sandbox_wait_exit,
        _sandbox_run_once,
        _sandbox_watch_calls,
        _sandbox_run_calls,
        _sandbox_main,
    )
    body = "\n\n".join(inspect.getsource(function) for function in functions)
    return (
        "from __future__ import annotations\n"
        "\n"
        f"{body}\n\n"
        "import sys\n"
        "_sandbox_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))\n"
    )
