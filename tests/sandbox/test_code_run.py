"""sandbox.code_run: untrusted Python under bubblewrap - containment first, then correctness.

Every security case checks the status it must end with and that the same runner still serves
a normal run afterwards. Limits are small so the whole file stays well under a minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pydantic
import pytest

from rmserve.sandbox import launch
from rmserve.sandbox.code_run import CodeRunner, Limits, RunResult
from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import CodeTest

UNAVAILABLE = CodeRunner.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"bubblewrap: {UNAVAILABLE}")

SMALL = Limits(cpu_s=1, wall_s=5, memory_mb=256, processes=16, file_size_mb=4, output_bytes=4096)
IS_ROOT = os.geteuid() == 0
# As root, each runner of this file gets slot uids of its own (not the default 60000+, which other
# runners on the machine use), so "nothing is left" concerns exactly the runner under test.
_UID_BASES = itertools.count(61000 + 1000 * (os.getpid() % 50), 16)


def new_runner(limits: Limits = SMALL, **options: Any) -> CodeRunner:
    return CodeRunner(limits, sandbox_uid_base=next(_UID_BASES), **options)


@pytest.fixture
def runner() -> CodeRunner:
    return new_runner(max_concurrency=4, max_queued=64)


@pytest.fixture
def cpu_runner() -> CodeRunner:
    """Generous wall clock: CPU seconds accrue slower than wall seconds on a busy machine."""
    return new_runner(dataclasses.replace(SMALL, wall_s=30))


async def run_program(runner: CodeRunner, code: str, stdin: str = "", **limits: float) -> RunResult:
    result = await runner.run(code, stdin, limits=Limits(**limits) if limits else None)
    assert result.run is not None and result.tests == []
    return result.run


async def assert_still_serving(runner: CodeRunner) -> None:
    run = await run_program(runner, "print('alive')")
    assert (run.status, run.exit_code, run.stdout) == ("ok", 0, "alive\n")
    assert (runner.in_flight, runner.queued) == (0, 0)


def live_processes(predicate: str) -> list[psutil.Process]:
    """Host processes (not zombies) whose command line contains ``predicate``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if predicate in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def slot_uid_processes(uids: range) -> list[psutil.Process]:
    """Live host processes (not zombies) running under one of ``uids``."""
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        real = process.info["uids"]
        status = process.info["status"]
        if real is not None and real.real in uids and status != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            with process.oneshot():
                lines.append(
                    f"pid {process.pid} ppid {process.ppid()} uid {process.uids().real} "
                    f"{process.status()} age {time.time() - process.create_time():.1f}s "
                    f"{process.cmdline()}"
                )
        except psutil.Error as exc:
            lines.append(f"pid {process.pid}: {exc!r}")
    return "\n".join(lines)


def host_has(path: str) -> bool:
    return os.path.exists(path)


def host_can_fork() -> bool:
    return subprocess.run(["true"], check=False).returncode == 0


def leftovers(marker: str, uids: range) -> list[psutil.Process]:
    return live_processes(marker) + slot_uid_processes(uids)


async def assert_nothing_left(runner: CodeRunner, marker: str) -> None:
    """No process with ``marker`` in its command line and none under the runner's slot uids
    survives (killing is immediate; the wait is for the kernel's teardown)."""
    deadline = time.monotonic() + 5
    while found := leftovers(marker, runner.slot_uids):
        assert time.monotonic() < deadline, f"left running:\n{describe(found)}"
        await asyncio.sleep(0.05)


# --- network -----------------------------------------------------------------------------------


async def test_no_network_egress_nor_host_loopback(runner: CodeRunner) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"""
import socket
print(sorted(name for _, name in socket.if_nameindex()))
for address in [("1.1.1.1", 53), ("127.0.0.1", {port})]:
    sock = socket.socket()
    sock.settimeout(2)
    try:
        sock.connect(address)
        print("CONNECTED", address)
    except OSError as exc:
        print("blocked", type(exc).__name__)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("1.1.1.1", 53))
    print("SENT udp")
except OSError as exc:
    print("blocked", type(exc).__name__)
"""
        run = await run_program(runner, code)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's loopback listener
    assert run.status == "ok", run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "['lo']"
    assert len(lines) == 4 and all(line.startswith("blocked") for line in lines[1:]), run.stdout
    await assert_still_serving(runner)


# --- reading the host --------------------------------------------------------------------------


async def test_service_environment_is_invisible(
    runner: CodeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = f"s3cret-{secrets.token_hex(8)}"
    monkeypatch.setenv("RMSERVE_SECRET_TEST", token)
    code = f"""
import os
leaks = [k for k, v in os.environ.items() if "{token}" in v or k == "RMSERVE_SECRET_TEST"]
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        if b"{token}" in open(f"/proc/{{pid}}/environ", "rb").read():
            leaks.append(pid)
    except OSError:
        pass
print(sorted(os.environ), leaks)
"""
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    assert run.stdout == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR'] []\n"
    assert token not in run.stdout + run.stderr
    await assert_still_serving(runner)


async def test_host_files_are_invisible(runner: CodeRunner, tmp_path: Path) -> None:
    secret_file = tmp_path / "service-secret.conf"
    secret_file.write_text("api_key = hunter2\n")
    paths = [str(secret_file), "/etc/shadow", "/etc/passwd", "/root/.bashrc", "/work", "/home"]
    code = f"""
import os
for path in {paths!r}:
    try:
        open(path).read() if os.path.isfile(path) else os.listdir(path)
        print("READ", path)
    except OSError as exc:
        print("blocked", type(exc).__name__)
print(sorted(set(os.listdir("/")) - {{"bin", "sbin", "lib", "lib64", "root"}}))
"""
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    lines = run.stdout.splitlines()
    assert lines[:-1] == ["blocked FileNotFoundError"] * len(paths), run.stdout
    assert lines[-1] == "['dev', 'proc', 'tmp', 'usr']"  # (/root: only the way to pyenv)
    assert "hunter2" not in run.stdout
    await assert_still_serving(runner)


async def test_proc_shows_only_the_sandbox(runner: CodeRunner) -> None:
    code = """
import os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
cmdlines = [open(f"/proc/{p}/cmdline", "rb").read() for p in pids]
print(len(pids), any(b"pytest" in c for c in cmdlines))
for secret in ("/proc/1/environ", "/proc/1/mem", "/proc/1/fd/3"):
    try:
        open(secret, "rb").read(1)
        print(secret, "readable")
    except OSError as exc:
        print(secret, type(exc).__name__)
"""
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    count, host_visible = run.stdout.splitlines()[0].split()
    assert int(count) <= 2 and host_visible == "False"  # the supervisor (pid 1), the program
    assert "readable" not in run.stdout, run.stdout  # pid 1 is not dumpable
    assert "RMSERVE" not in run.stdout and "pytest" not in run.stdout
    await assert_still_serving(runner)


async def test_without_proc_runs_work_and_limits_hold() -> None:
    """mount_proc=False (containers mask /proc): the code sees no /proc, runs and tests still
    work, and the limits still stop it."""
    runner = new_runner(mount_proc=False)
    code = "import os, subprocess, sys\nprint(os.path.exists('/proc'), 'proc' in os.listdir('/'))\n"
    code += "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True).stdout)"
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    assert run.stdout.splitlines() == ["False False", "b'7\\n'"]
    tested = await runner.run(
        "def f(x):\n    return 2 * x\n", tests=[CodeTest(code="assert f(2) == 4")]
    )
    assert [test.passed for test in tested.tests] == [True]
    assert (await run_program(runner, "while True: pass")).status in ("cpu_limit", "timeout")
    bomb = await run_program(runner, "import os\nwhile True: os.fork()")
    assert bomb.status != "ok"
    await assert_still_serving(runner)


async def test_the_code_is_not_reachable_from_the_program(runner: CodeRunner) -> None:
    code = """
import os
targets = []
for fd in os.listdir("/proc/self/fd"):
    try:
        targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass  # the listing's own fd, closed by now
print(sorted(targets))
"""
    run = await run_program(runner, code, stdin="data")
    assert run.status == "ok", run.stderr
    fds = eval(run.stdout)  # stdin (a memfd), stdout, stderr: nothing else is open
    assert len(fds) == 3 and "/memfd:stdin (deleted)" in fds, fds
    assert sum(target.startswith("pipe:") for target in fds) == 2
    assert not any("job" in target for target in fds)
    await assert_still_serving(runner)


async def test_runs_do_not_see_each_other(runner: CodeRunner) -> None:
    token = secrets.token_hex(8)
    writer = f"open('/tmp/{token}', 'w').write('mine'); import time; time.sleep(1.5)"
    reader = f"""
import os, time
time.sleep(0.5)
print(os.path.exists('/tmp/{token}'), os.listdir('/tmp'))
"""
    first, second = await asyncio.gather(run_program(runner, writer), run_program(runner, reader))
    assert first.status == "ok" and second.status == "ok", (first, second)
    assert second.stdout == "False []\n"
    assert not host_has(f"/tmp/{token}")  # the sandbox's /tmp is private
    await assert_still_serving(runner)


# --- writing -----------------------------------------------------------------------------------


async def test_only_tmp_is_writable(runner: CodeRunner) -> None:
    token = secrets.token_hex(8)
    targets = ["/usr/x", "/home/x", "/x", "/root/x", "/dev/x", "/proc/x", "/bin/x", "/etc/x"]
    code = f"""
for path in {targets!r}:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as exc:
        print("blocked", path)
open("/tmp/{token}", "w").write("ok")
open("/dev/shm/{token}", "w").write("ok")
print(open("/tmp/{token}").read(), open("/dev/shm/{token}").read())
"""
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    lines = run.stdout.splitlines()
    assert lines[:-1] == [f"blocked {path}" for path in targets]
    assert lines[-1] == "ok ok"
    assert not host_has(f"/tmp/{token}") and not host_has(f"/dev/shm/{token}")
    await assert_still_serving(runner)


async def test_file_size_and_tmp_space_are_limited(runner: CodeRunner) -> None:
    code = """
import os
try:
    open("/tmp/big", "wb").write(b"x" * (5 << 20))
except OSError as exc:
    print("big file:", exc.strerror)
for i in range(10):
    try:
        open(f"/tmp/part{i}", "wb").write(b"x" * (3 << 20))
    except OSError as exc:
        print("tmp full:", exc.strerror)
        break
"""
    run = await run_program(runner, code)  # file_size_mb=4: per file and per tmpfs
    assert run.status == "ok", run.stderr
    assert run.stdout.splitlines() == [
        "big file: File too large",
        "tmp full: No space left on device",
    ]
    await assert_still_serving(runner)


# --- processes ---------------------------------------------------------------------------------


async def test_runs_under_a_slot_uid_when_root(runner: CodeRunner) -> None:
    run = await run_program(runner, "import os; print(os.getuid(), os.getgid(), os.getgroups())")
    assert run.status == "ok", run.stderr
    uid, gid, groups = run.stdout.split(" ", 2)
    if IS_ROOT:
        assert int(uid) in runner.slot_uids and gid == uid
        assert runner.mode == "bwrap-root"
    else:
        assert int(uid) == os.getuid()
    assert groups.strip() in ("[]", f"[{gid}]")


async def test_process_limit_counts_only_this_run(runner: CodeRunner) -> None:
    code = """
import os, time
started = 0
for _ in range({n}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(0.5)
        os._exit(0)
    started += 1
print(started)
"""
    few, many = await asyncio.gather(
        run_program(runner, code.format(n=10)), run_program(runner, code.format(n=100))
    )
    assert (few.status, few.stdout) == ("ok", "10\n")
    # processes=16: the program itself plus 15 children, concurrent runs not counted
    assert (many.status, many.stdout) == ("ok", "15\n")
    await assert_still_serving(runner)


async def test_fork_bomb_is_contained(runner: CodeRunner) -> None:
    marker = f"bomb{secrets.token_hex(6)}"
    code = f"""
import os, sys
sys.argv[0] = "{marker}"
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    peak = 0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            if IS_ROOT:
                peak = max(peak, len(slot_uid_processes(runner.slot_uids)))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    run = await run_program(runner, code, wall_s=2)
    elapsed = time.monotonic() - started
    done = True
    await sampler
    assert run.status in ("timeout", "cpu_limit"), run
    assert elapsed < 4
    if IS_ROOT:
        # at most 16 user tasks + pid 1 + supervisor + bwrap outside the namespace at any
        # instant (exact count: test_process_limit_counts_only_this_run); scanning /proc is not
        # atomic while the bomb forks and dies, hence the slack - unbounded would be hundreds
        assert 0 < peak <= 2 * (SMALL.processes + 3)
    await assert_nothing_left(runner, marker)
    assert host_can_fork()
    await assert_still_serving(runner)


async def test_children_left_running_are_killed(runner: CodeRunner) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"  # a unique `sleep` argument
    code = f"""
import os, subprocess
subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
if os.fork() == 0:  # double fork + setsid: a daemon
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", "{marker}"])
    os._exit(0)
print("parent exits")
"""
    run = await run_program(runner, code)
    assert (run.status, run.stdout) == ("ok", "parent exits\n")
    await assert_nothing_left(runner, f"sleep {marker}")
    await assert_still_serving(runner)


async def test_children_of_a_timed_out_run_are_killed(runner: CodeRunner) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"
    code = f"""
import subprocess, time
subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
time.sleep(60)
"""
    run = await run_program(runner, code, wall_s=1)
    assert run.status == "timeout"
    await assert_nothing_left(runner, f"sleep {marker}")
    await assert_still_serving(runner)


def test_service_crash_kills_its_sandboxes() -> None:
    """SIGKILL the service mid-run: the kernel kills bwrap (parent death signal), and with it
    every process of the sandbox."""
    marker = f"{secrets.randbelow(10**6) + 10**6}.125"
    uid_base = next(_UID_BASES)
    script = f"""
import asyncio
from rmserve.sandbox.code_run import CodeRunner, Limits
async def main():
    runner = CodeRunner(Limits(wall_s=60), sandbox_uid_base={uid_base})
    await runner.run("import subprocess; subprocess.run(['sleep', '{marker}'])")
asyncio.run(main())
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen([sys.executable, "-c", script], env=env) as service:
        try:
            deadline = time.monotonic() + 10
            while not live_processes(f"sleep {marker}"):
                assert time.monotonic() < deadline and service.poll() is None
                time.sleep(0.05)
        finally:
            service.kill()
    uids = range(uid_base, uid_base + 4) if IS_ROOT else range(0)
    deadline = time.monotonic() + 5
    while found := leftovers(f"sleep {marker}", uids):
        assert time.monotonic() < deadline, f"left running:\n{describe(found)}"
        time.sleep(0.05)


async def test_cancelled_run_kills_its_sandbox(runner: CodeRunner) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.75"
    code = f"import subprocess; subprocess.run(['sleep', '{marker}'])"
    task = asyncio.create_task(run_program(runner, code))
    deadline = time.monotonic() + 3
    while not live_processes(f"sleep {marker}"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_left(runner, f"sleep {marker}")
    await assert_still_serving(runner)


# --- resource limits ---------------------------------------------------------------------------


async def test_memory_bomb(runner: CodeRunner) -> None:
    growing = "hog = []\nwhile True:\n    hog.append(bytearray(10**7))"
    run = await run_program(runner, growing, memory_mb=128)
    assert run.status == "memory_limit", run
    assert run.exit_code == 1 and run.stderr.rstrip().endswith("MemoryError")
    huge = await run_program(runner, "x = bytearray(10**11)")
    assert huge.status == "memory_limit", huge
    await assert_still_serving(runner)


async def test_cpu_spin(cpu_runner: CodeRunner) -> None:
    runner = cpu_runner
    started = time.monotonic()
    run = await run_program(runner, "while True:\n    pass")
    assert (run.status, run.signal, run.exit_code) == ("cpu_limit", 24, None)  # SIGXCPU
    stubborn = await run_program(
        runner,
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
    )
    assert (stubborn.status, stubborn.signal) == ("cpu_limit", 9)  # the hard limit's SIGKILL
    assert time.monotonic() - started < 20
    await assert_still_serving(runner)


async def test_sleep_past_wall_clock(runner: CodeRunner) -> None:
    code = "import time\nprint('before', flush=True)\ntime.sleep(60)"
    run = await run_program(runner, code, wall_s=1)
    assert (run.status, run.exit_code, run.signal) == ("timeout", None, 9)
    assert run.stdout == "before\n"
    assert 1 <= run.wall_s < 2
    await assert_still_serving(runner)


async def test_output_flood_is_cut_quickly_with_bounded_memory(runner: CodeRunner) -> None:
    rss_before = psutil.Process().memory_info().rss
    started = time.monotonic()
    run = await run_program(runner, "while True:\n    print('x' * 10000)", wall_s=5)
    assert time.monotonic() - started < 2
    assert (run.status, run.signal) == ("output_limit", 9)
    assert run.stdout == "x" * SMALL.output_bytes and run.stdout_truncated
    errors = await run_program(runner, "import sys\nwhile True:\n    sys.stderr.write('e' * 999)")
    assert errors.status == "output_limit" and errors.stderr_truncated
    assert len(errors.stderr) == SMALL.output_bytes
    assert psutil.Process().memory_info().rss - rss_before < 20 << 20
    await assert_still_serving(runner)


async def test_output_over_the_kept_size_but_under_the_cap_is_truncated_only(
    runner: CodeRunner,
) -> None:
    run = await run_program(runner, "print('y' * 10000)")
    assert (run.status, run.stdout_truncated, len(run.stdout)) == ("ok", True, 4096)


async def test_request_limits_are_clamped_to_the_runners(cpu_runner: CodeRunner) -> None:
    runner = cpu_runner
    started = time.monotonic()
    raised = await run_program(runner, "while True:\n    pass", cpu_s=60, wall_s=600)
    assert raised.status == "cpu_limit" and time.monotonic() - started < 20
    lowered = await run_program(runner, "import time\ntime.sleep(3)", wall_s=0.5)
    assert lowered.status == "timeout" and lowered.wall_s < 1.5
    assert Limits(cpu_s=60, output_bytes=10).clamped_to(SMALL) == Limits(
        cpu_s=1, wall_s=5, memory_mb=256, processes=16, file_size_mb=4, output_bytes=10
    )


# --- concurrency -------------------------------------------------------------------------------


async def test_fifty_concurrent_runs_complete_correctly() -> None:
    runner = new_runner(max_concurrency=4, max_queued=64)
    peak_in_flight = 0

    async def watch() -> None:
        nonlocal peak_in_flight
        while True:
            peak_in_flight = max(peak_in_flight, runner.in_flight)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    code = "import sys\nn = int(sys.stdin.read())\nprint(n * n)"
    runs = await asyncio.gather(*(run_program(runner, code, str(i)) for i in range(50)))
    watcher.cancel()
    assert [(run.status, run.stdout) for run in runs] == [("ok", f"{i * i}\n") for i in range(50)]
    assert peak_in_flight == 4
    await assert_still_serving(runner)


async def test_excess_requests_are_refused_busy() -> None:
    runner = new_runner(max_concurrency=1, max_queued=2)
    outcomes = await asyncio.gather(
        *(run_program(runner, "import time; time.sleep(0.3)") for _ in range(6)),
        return_exceptions=True,
    )
    busy = [o for o in outcomes if isinstance(o, ToolError)]
    assert [o.code for o in busy] == ["busy"] * 3
    assert [o.status for o in outcomes if isinstance(o, RunResult)] == ["ok"] * 3
    # a request with tests queues all its executions
    first = asyncio.create_task(run_program(runner, "import time; time.sleep(0.3)"))
    await asyncio.sleep(0.05)
    with_tests = asyncio.create_task(runner.run("x = 1", tests=[CodeTest(code="")] * 3))
    await asyncio.sleep(0.05)
    assert runner.queued == 3
    with pytest.raises(ToolError) as refused:
        await runner.run("print(1)")
    assert refused.value.code == "busy"
    await first
    assert (await with_tests).passed == 3
    await assert_still_serving(runner)


# --- correctness -------------------------------------------------------------------------------


async def test_stdin_stdout_round_trip(runner: CodeRunner) -> None:
    run = await run_program(
        runner, "import sys\nsys.stdout.write(sys.stdin.read().upper())", "héllo\n"
    )
    assert (run.status, run.exit_code, run.stdout, run.stderr) == ("ok", 0, "HÉLLO\n", "")
    big = await run_program(runner, "import sys\nprint(len(sys.stdin.read()))", "z" * (1 << 20))
    assert big.stdout == f"{1 << 20}\n"


async def test_program_runs_as_a_plain_main_module(runner: CodeRunner) -> None:
    code = """
import dataclasses, inspect, multiprocessing, sys

@dataclasses.dataclass
class Point:
    x: int

def square(a: int) -> int:
    return a * a

if __name__ == "__main__":
    print(square.__annotations__["a"] is int, Point(1))  # no __future__ leaks from the harness
    print(inspect.getsource(square).splitlines()[0], sys.argv, sys.flags.isolated)
    with multiprocessing.Pool(2) as pool:  # semaphores in /dev/shm, fork, pickling __main__
        print(pool.map(square, range(4)))
"""
    run = await run_program(runner, code)
    assert run.status == "ok", run.stderr
    assert run.stdout.splitlines() == [
        "True Point(x=1)",
        "def square(a: int) -> int: ['<program>'] 1",
        "[0, 1, 4, 9]",
    ]


async def test_exit_codes(runner: CodeRunner) -> None:
    three = await run_program(runner, "import sys\nsys.exit(3)")
    assert (three.status, three.exit_code, three.signal) == ("error", 3, None)
    zero = await run_program(runner, "print('bye')\nexit(0)")
    assert (zero.status, zero.exit_code) == ("ok", 0)
    message = await run_program(runner, "raise SystemExit('giving up')")
    assert (message.status, message.exit_code, message.stderr) == ("error", 1, "giving up\n")
    killed = await run_program(runner, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert (killed.status, killed.signal, killed.exit_code) == ("killed", 15, None)


async def test_exception_is_an_error_with_the_users_traceback(runner: CodeRunner) -> None:
    run = await run_program(runner, "def f():\n    return 1 / 0\nprint('partial')\nf()")
    assert (run.status, run.exit_code, run.stdout) == ("error", 1, "partial\n")
    assert run.stderr.startswith("Traceback (most recent call last):\n")
    assert 'File "<program>", line 4, in <module>' in run.stderr
    assert 'File "<program>", line 2, in f\n    return 1 / 0' in run.stderr
    assert run.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "_sandbox" not in run.stderr and "<string>" not in run.stderr
    syntax = await run_program(runner, "def broken(:\n    pass")
    assert syntax.status == "error" and "SyntaxError" in syntax.stderr


async def test_tests_pass_and_fail(runner: CodeRunner) -> None:
    program = "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(2, 3))"
    tests = [
        CodeTest(name="assert ok", code="assert add(1, 2) == 3"),
        CodeTest(name="assert wrong", code="assert add(1, 2) == 4, 'nope'"),
        CodeTest(name="stdout ok", expected_stdout="5   \n\n\n"),
        CodeTest(name="stdout wrong", expected_stdout="6"),
        CodeTest(name="both", code="print(add(1, 1))", expected_stdout="5\n2"),
        CodeTest(name="raises", code="add(1, None)"),
        CodeTest(name="times out", code="import time\ntime.sleep(60)"),
        CodeTest(code="import sys\nassert sys.stdin.read() == 'per-test'", stdin="per-test"),
        CodeTest(code="import sys\nassert sys.stdin.read() == 'shared'"),
    ]
    result = await runner.run(program, "shared", tests, limits=Limits(wall_s=1.5))
    verdicts = {test.name: (test.passed, test.status) for test in result.tests}
    assert verdicts == {
        "assert ok": (True, "ok"),
        "assert wrong": (False, "ok"),
        "stdout ok": (True, "ok"),
        "stdout wrong": (False, "ok"),
        "both": (True, "ok"),
        "raises": (False, "error"),
        "times out": (False, "timeout"),
        "test_7": (True, "ok"),
        "test_8": (True, "ok"),
    }
    assert (result.passed, result.failed) == (5, 4)
    assert result.run is not None and result.run.status == "ok"  # the run of the call tests
    assert [test.run is None for test in result.tests[:3]] == [True, True, False]
    assert result.tests[1].detail.endswith(": got 3")
    raises = result.tests[5].run
    assert raises is not None and "TypeError" in raises.stderr
    assert 'File "<test>", line 1' in raises.stderr
    await assert_still_serving(runner)


async def test_exiting_early_does_not_pass_assert_tests(runner: CodeRunner) -> None:
    tests = [CodeTest(code="assert False"), CodeTest(code="")]
    for hack in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()"):
        result = await runner.run(hack, tests=tests)
        assert result.passed == 0, (hack, result.tests)
    honest = await runner.run("x = 1", tests=tests)
    assert [test.passed for test in honest.tests] == [False, True]


def test_code_test_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="needs `call`"):
        CodeTest(name="nothing to check")
    with pytest.raises(pydantic.ValidationError, match="extra"):
        CodeTest.model_validate({"code": "pass", "timeout": 3})
    assert CodeTest(expected_stdout="").code is None
    with pytest.raises(ValueError, match="positive"):
        Limits(wall_s=0)


async def test_too_many_tests_are_refused() -> None:
    runner = new_runner(max_tests=2)
    with pytest.raises(ToolError) as refused:
        await runner.run("pass", tests=[CodeTest(code="")] * 3)
    assert refused.value.code == "invalid_arguments"


# --- availability ------------------------------------------------------------------------------


def test_available_reports_a_reason() -> None:
    assert CodeRunner.available() is None
    reason = CodeRunner.available("no-such-bwrap")
    assert reason is not None and "no-such-bwrap" in reason
    with pytest.raises(ToolError) as refused:
        CodeRunner(bwrap="no-such-bwrap")
    assert refused.value.code == "unavailable"


async def test_unsafe_fallback_warns_and_still_applies_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="rmserve.sandbox.code_run"):
        runner = CodeRunner(SMALL, bwrap="no-such-bwrap", allow_unsafe=True)
    assert runner.mode == "unsafe"
    assert "UNSAFE CODE EXECUTION" in caplog.text
    run = await run_program(runner, "import os\nprint(os.getcwd().startswith('/tmp/rmserve'))")
    assert (run.status, run.stdout) == ("ok", "True\n")
    spin = await run_program(runner, "while True:\n    pass")
    assert spin.status == "cpu_limit"


@pytest.mark.skipif(not IS_ROOT, reason="the non-root mode is what this whole file runs then")
def test_non_root_service_mode() -> None:
    """A service running as an ordinary uid (60100, with 40 other processes of its own) gets
    bwrap-user mode, a per-run process limit and a contained fork bomb."""
    script = """
import asyncio, os, subprocess
from rmserve.sandbox.code_run import CodeRunner, Limits

FORKS = '''
import os, time
started = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(0.5)
        os._exit(0)
    started += 1
print(started)
'''

BOMB = "import os\\nwhile True:\\n    try: os.fork()\\n    except OSError: pass"

async def main():
    neighbours = [subprocess.Popen(["sleep", "20"]) for _ in range(40)]
    runner = CodeRunner(Limits(cpu_s=1, wall_s=2, processes=8))
    who = await runner.run("import os; print(os.getuid())")
    forks = await runner.run(FORKS)
    bomb = await runner.run(BOMB)
    after = await runner.run("print('alive')")
    for process in neighbours:
        process.kill()
        process.wait()
    print(runner.mode, who.run.stdout.strip(), forks.run.stdout.strip(), bomb.run.status,
          after.run.stdout.strip())

asyncio.run(main())
"""
    prefix, _ = launch._base_interpreter()
    root = Path(__file__).resolve().parents[2]
    command = [
        *("bwrap", "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--bind", "/proc", "/proc"),
        *launch._expose_interpreter_args(prefix),  # the service's uid must reach its python
        *("--die-with-parent", "--", "setpriv", "--reuid=60100", "--regid=60100", "--clear-groups"),
        "env",
        f"PYTHONPATH={root}",
        sys.executable,
        "-c",
        script,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["bwrap-user", "60100", "7", "timeout", "alive"]
