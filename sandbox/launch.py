"""Command lines that start one code sandbox: bubblewrap, uids, rlimits, cgroup, seccomp.

The chain of one run, each element exec'ing the next (no extra process)::

    [sh: join the run's cgroup]  prlimit <run rlimits> --
    [root: nsenter --mount=<staging namespace> -- setpriv <slot uid, no capabilities> --]
    setpriv --pdeathsig=KILL -- bwrap <namespaces, mounts> --as-pid-1 [--seccomp FD] --
    <base python> -I -B -S -c <harness> JOB_FD STATUS_FD SECRET_FD

* The rlimits are set before bwrap starts, so they hold for every process of the run, bwrap's
  own included; as root RLIMIT_NPROC too, because the slot's uid runs nothing else. The
  supervisor (pid 1 inside) lowers them again and sets RLIMIT_NPROC in the run's own user
  namespace, where the kernel (>= 5.14) counts only that run's tasks.
* There is no bwrap reaper: the harness's supervisor is pid 1 (``--as-pid-1``), not dumpable,
  and the seccomp filter (`rmserve.sandbox.seccomp`) denies ptrace and cross-process memory
  access to every process of the run.
* Root: each concurrency slot has its own unprivileged uid (``uid_base + slot``). An
  unprivileged bwrap cannot bind a path it cannot traverse (e.g. /root/.pyenv under a 0700
  /root), so root builds a *staging* mount namespace once (a read-only view of /, a 0755 tmpfs
  over the first non-traversable ancestor of the interpreter, the interpreter bound back into
  it), keeps it alive by an fd, and each run enters it with ``nsenter`` before ``setpriv``. The
  host's mounts never change.
* The service is bwrap's direct parent: if it dies the kernel SIGKILLs bwrap (parent death
  signal, set after the uid change that would clear it), and bwrap's pid 1 dies with it
  (``--die-with-parent``), taking the pid namespace along.
* The interpreter runs with ``-S``: the standard library only, never the host's site-packages
  or its ``.pth`` start-up hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rmserve.sandbox.harness import harness_source

Mode = Literal["bwrap-root", "bwrap-user", "unsafe"]

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
DEFAULT_UID_BASE = 60000


@dataclass(frozen=True)
class Spawn:
    """What one run's command line carries besides the launcher's own settings."""

    job_fd: int
    status_fd: int
    tmpfs_bytes: int
    rlimits: dict[str, int | str]  # prlimit option -> value (or soft:hard): cpu, as, ...
    secret_fd: int = -1
    seccomp_fd: int = -1
    cgroup_join: list[str] = field(default_factory=list)

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors the run must inherit (everything else is closed)."""
        wanted = (self.job_fd, self.status_fd, self.secret_fd, self.seccomp_fd)
        return tuple(fd for fd in wanted if fd >= 0)


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


def _sandbox_args(bwrap: str, prefix: str, spawn: Spawn, mount_proc: bool) -> list[str]:
    """The sandboxing bwrap invocation (unprivileged), up to and including ``--``. Without
    `mount_proc` the sandbox has no /proc at all (container runtimes mask parts of theirs,
    and then the kernel refuses a fresh one)."""
    tmpfs_bytes = str(spawn.tmpfs_bytes)
    seccomp = ["--seccomp", str(spawn.seccomp_fd)] if spawn.seccomp_fd >= 0 else []
    return [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--as-pid-1",
        *seccomp,
        "--new-session",
        "--hostname", "sandbox",
        "--clearenv",
        "--setenv", "PATH", SANDBOX_PATH,
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
            env=HOST_ENV,
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


def _harness_args(executable: str, spawn: Spawn) -> list[str]:
    fds = (spawn.job_fd, spawn.status_fd, spawn.secret_fd)
    return [executable, "-I", "-B", "-S", "-c", harness_source(), *map(str, fds)]


def _prlimit_args(prlimit: str, rlimits: dict[str, int | str]) -> list[str]:
    return [prlimit, *(f"--{name}={value}" for name, value in rlimits.items()), "--"]


@dataclass(frozen=True)
class Launcher:
    """How to start one harness: mode, binaries, interpreter, uids, staging namespace."""

    mode: Mode
    bwrap: str
    setpriv: str
    nsenter: str
    prlimit: str
    prefix: str
    executable: str
    uid_base: int
    staging_fd: int | None = None  # bwrap-root only
    mount_proc: bool = True

    def command(self, slot: int, spawn: Spawn) -> list[str]:
        harness = _harness_args(self.executable, spawn)
        limited = [*spawn.cgroup_join, *_prlimit_args(self.prlimit, spawn.rlimits)]
        if self.mode == "unsafe":
            return [*limited, *harness]
        sandbox = [*_sandbox_args(self.bwrap, self.prefix, spawn, self.mount_proc), *harness]
        if self.mode == "bwrap-user":
            return [*_die_with_service_args(self.setpriv), *limited, *sandbox]
        assert self.staging_fd is not None
        return [
            *limited,
            *_enter_staging_args(self.nsenter, self.staging_fd),
            *_drop_to_uid_args(self.setpriv, self.uid_base + slot),
            *_die_with_service_args(self.setpriv),
            *sandbox,
        ]

    @property
    def counts_processes_per_slot(self) -> bool:
        """RLIMIT_NPROC can be set before bwrap: the slot's uid runs nothing but this run."""
        return self.mode == "bwrap-root"

    def close(self) -> None:
        if self.staging_fd is not None:
            os.close(self.staging_fd)


def bwrap_launcher(bwrap_name: str, uid_base: int, mount_proc: bool = True) -> Launcher | str:
    """A sandbox launcher (not yet tried), or why there can be none."""
    names = (bwrap_name, "setpriv", "nsenter", "prlimit")
    bwrap, setpriv, nsenter, prlimit = (shutil.which(name) for name in names)
    root = os.geteuid() == 0
    if bwrap is None:
        return f"bubblewrap ({bwrap_name!r}) is not installed or not on PATH"
    if setpriv is None or prlimit is None or (root and nsenter is None):
        return (
            "util-linux `setpriv`, `prlimit`"
            + (" and `nsenter` are" if root else " are")
            + (" needed")
        )
    prefix, executable = _base_interpreter()
    staging_fd = None
    if root:
        try:
            staging_fd = _open_staging_namespace(bwrap, prefix)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"could not create the staging mount namespace: {exc}"
    return Launcher(
        mode="bwrap-root" if root else "bwrap-user",
        bwrap=bwrap,
        setpriv=setpriv,
        nsenter=nsenter or "nsenter",
        prlimit=prlimit,
        prefix=prefix,
        executable=executable,
        uid_base=uid_base,
        staging_fd=staging_fd,
        mount_proc=mount_proc,
    )


def unsafe_launcher() -> Launcher | str:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return "util-linux `prlimit` is needed"
    prefix, executable = _base_interpreter()
    return Launcher("unsafe", "", "", "", prlimit, prefix, executable, uid_base=0)
