"""One sandbox process seen from the host: start it, feed it, watch it, take it down.

Event-loop independent: the process is started by the standard library's ``subprocess.Popen``
with ``close_fds`` (uvloop's spawning ignores ``close_fds`` and would leak the service's
descriptors into every sandbox), its exit is awaited on a pidfd, and its output is read through
pipes of our own. On every way out (exit, wall clock, output flood, cancellation) the whole
run is killed from the host side: its cgroup when it has one, else bwrap's process group (whose
death takes pid 1 and with it the pid namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_READ_CHUNK = 65536
_TAIL_BYTES = 4096
_STATUS_MAX_BYTES = 1 << 24
_EOF_GRACE_S = 1.0


def anonymous_file(data: bytes, name: str) -> int:
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


class Capture(asyncio.Protocol):
    """One pipe: keep the first ``keep`` bytes and a short tail, count everything, call
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
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
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


async def open_capture(
    keep: int, hard_cap: int, cleanup: contextlib.ExitStack
) -> tuple[Capture, int]:
    """A pipe whose read end feeds a ``Capture``; returns it and the write end for the child."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    capture = Capture(keep, hard_cap)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: capture, os.fdopen(read_fd, "rb", buffering=0)
    )
    cleanup.callback(transport.close)
    return capture, write_fd


def status_records(data: bytes) -> list[dict[str, Any]]:
    """The JSON lines the supervisor wrote."""
    records = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


@dataclass(frozen=True)
class Observed:
    """What the host saw of one run."""

    returncode: int
    timed_out: bool
    stdout: Capture
    stderr: Capture
    status: Capture
    wall_s: float

    @property
    def output_overflowed(self) -> bool:
        return self.stdout.overflowed or self.stderr.overflowed

    def records(self) -> list[dict[str, Any]]:
        return status_records(bytes(self.status.kept))


@dataclass
class Channels:
    """The run's stdin, stdout, stderr and status pipes. The child's ends are closed here once
    the child has them (``close_child_ends``, exactly once: a descriptor number closed twice
    may by then belong to another run)."""

    stdin_fd: int
    stdout: Capture
    stdout_fd: int
    stderr: Capture
    stderr_fd: int
    status: Capture
    status_fd: int
    closed: bool = False

    def close_child_ends(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self.stdin_fd, self.stdout_fd, self.stderr_fd, self.status_fd):
                os.close(fd)


async def open_channels(
    stdin: bytes, output_bytes: int, hard_cap: int, cleanup: contextlib.ExitStack
) -> Channels:
    stdout, stdout_fd = await open_capture(output_bytes, hard_cap, cleanup)
    stderr, stderr_fd = await open_capture(output_bytes, hard_cap, cleanup)
    status, status_fd = await open_capture(_STATUS_MAX_BYTES, _STATUS_MAX_BYTES, cleanup)
    channels = Channels(anonymous_file(stdin, "stdin"), stdout, stdout_fd, stderr, stderr_fd,
                        status, status_fd)  # fmt: skip
    cleanup.callback(channels.close_child_ends)
    return channels


async def run_process(
    command: list[str],
    channels: Channels,
    pass_fds: tuple[int, ...],
    env: dict[str, str],
    wall_s: float,
    kill: Callable[[subprocess.Popen[bytes]], None],
    cwd: str | None = None,
) -> Observed:
    """Start ``command`` and wait for it within ``wall_s``; ``kill`` takes the whole run down
    (called on every way out: a normal exit too, for what the run left behind)."""
    started = time.monotonic()
    # The standard library's spawn on purpose (close_fds must hold whatever the event loop);
    # fork+exec takes about a millisecond, and the exit is awaited on a pidfd below.
    process = subprocess.Popen(  # noqa: ASYNC220
        command,
        stdin=channels.stdin_fd,
        stdout=channels.stdout_fd,
        stderr=channels.stderr_fd,
        pass_fds=pass_fds,
        close_fds=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    channels.close_child_ends()  # the child has them now; EOF comes when the run is gone

    def kill_if_running() -> None:
        if process.returncode is None:
            kill(process)

    channels.stdout.on_overflow = channels.stderr.on_overflow = kill_if_running
    timed_out = False
    try:
        async with asyncio.timeout(wall_s):
            await _exited(process)
    except TimeoutError:
        timed_out = True
    finally:
        kill(process)
        returncode = process.wait()
        wall = time.monotonic() - started
        captures = (channels.stdout, channels.stderr, channels.status)
        await asyncio.wait([capture.eof for capture in captures], timeout=_EOF_GRACE_S)
    return Observed(
        returncode, timed_out, channels.stdout, channels.stderr, channels.status, round(wall, 3)
    )


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Wait for the process's exit on a pidfd (no child watcher, no thread)."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(process.pid)
    exited = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    process.wait()


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL bwrap's process group; its pid-1 child dies with it and takes the pid namespace
    (every sandboxed process) along."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
