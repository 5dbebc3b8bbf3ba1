"""Per-run cgroups for code sandboxes: memory and process count bounded per run, one kill for all.

What is bounded where
---------------------
* cgroup v2 (``0::/path`` in /proc/self/cgroup, controllers in the unified hierarchy): one cgroup
  per run with ``memory.max`` (swap excluded: ``memory.swap.max`` = 0 when swap is accounted) and
  ``pids.max``. ``kill()`` writes ``cgroup.kill`` (kernel 5.14+), else SIGKILLs the listed pids
  until none is left. ``oom_killed()`` reads ``oom_kill`` in ``memory.events``, the peak is
  ``memory.peak`` (5.19+, else None).
* cgroup v1 (hybrid or legacy layout): one cgroup per run in the memory hierarchy
  (``memory.limit_in_bytes``, and ``memory.memsw.limit_in_bytes`` so swap cannot extend it), in
  the pids hierarchy (``pids.max``) and, when mounted, in the freezer hierarchy: ``kill()``
  freezes the run, SIGKILLs every process and thaws it, so nothing forks or exits (freeing its
  pid for reuse) in between. ``oom_killed()`` reads ``oom_kill`` in ``memory.oom_control``.
* Both: the memory limit covers user memory, tmpfs pages the run writes and kernel memory (slab:
  dentries, inodes, page tables, socket buffers) - v1 too, since kernel 4.6 unless booted with
  ``cgroup.memory=nokmem``. So creating many empty directories (or files) on a tmpfs is bounded
  by the memory limit even when the tmpfs has no inode limit: checked on 6.18, v1, by the tests -
  with 64 MB the run was OOM-killed after about 64,600 directories (~1 KB each) in 0.35 s, and
  the cgroup's peak usage was exactly the limit. The charge stays with the cgroup until the tmpfs
  is unmounted. The kernel OOM killer picks the largest process of the run; the others go on.
* None (``RunCgroups.detect()`` returns a ``CgroupSupport`` with ``version=None`` and the reason):
  no writable place, e.g. a container without cgroup delegation or a user without a delegated
  subtree. Callers then only have their per-process rlimits.

Where the runs live: ``<base>/rmserve-sandbox-<pid>-<random>/<name>``. ``<base>`` is the
configured parent (it must exist; a cgroup path as in /proc/self/cgroup, or its directory under a
cgroup mount) or else: v1, the service's own cgroup in each hierarchy (v1 allows children beside
processes); v2, the root when the service is in its (namespace's) root, else the parent of the
service's cgroup - a sibling, because v2 only enables controllers below cgroups without processes
("no internal processes"). That parent must offer memory and pids and be writable: root, or a
systemd ``Delegate=yes`` unit whose service moved itself into a leaf such as ``.../main``.

Joining: ``join_command()`` is a ``/bin/sh -c`` prefix that writes its own pid into each
``cgroup.procs`` and then execs the program (one fork+exec of sh, about a millisecond); if a
write fails sh exits with status 2 and the program never runs outside the cgroup. Put it first,
in the host's mount namespace and before dropping privileges: writing needs write access to the
``cgroup.procs`` files (v2: also to the common ancestor's). ``kill()`` and ``remove()`` block for
up to two seconds; call them from a thread in async code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from typing import Literal

Version = Literal["v1", "v2"]
_NEEDED = ("memory", "pids")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_KILL_WAIT_S = 2.0
_HINTS = {
    errno.EBUSY: "it holds processes: configure a delegated parent without any",
    errno.EACCES: "not delegated to this user: configure a writable parent",
    errno.EPERM: "not delegated to this user: configure a writable parent",
    errno.EROFS: "cgroupfs is read-only: a container without cgroup delegation",
}


@dataclass(frozen=True)
class CgroupSupport:
    version: Version | None  # None: per-run cgroups are not available here
    reason: str  # why not, or a one-line description of what is used

    def describe(self) -> str:
        if self.version is None:
            return f"per-run cgroups unavailable ({self.reason}): limits are per process only"
        return f"per-run cgroups: {self.version}, {self.reason}"


@dataclass(frozen=True)
class _Mount:
    point: str  # mount point
    root: str  # the cgroup path shown at the mount point (mountinfo field 4)
    version: Version
    options: frozenset[str]  # super options: v1 lists its controllers there

    def dir_of(self, cgroup: str) -> str | None:
        """The directory of a cgroup path (as in /proc/self/cgroup), None if not in this mount."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            return None
        rest = cgroup[len(root) :].strip("/")
        return f"{self.point}/{rest}" if rest else self.point


def _octal(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 8))


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            version: Version = "v2" if tail[0] == "cgroup2" else "v1"
            options = frozenset(tail[2].split(","))
            point, root = (re.sub(r"\\([0-7]{3})", _octal, f) for f in (fields[4], fields[3]))
            mounts.append(_Mount(point, root, version, options))
    return mounts


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller -> cgroup path from /proc/<pid>/cgroup; the v2 entry (``0::/path``) is ``""``."""
    paths = {}
    for line in text.splitlines():
        _, ok, rest = line.partition(":")
        controllers, ok2, path = rest.partition(":")
        if ok and ok2:
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _unique(dirs: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(dirs.values()))


class RunCgroup:
    """One run's cgroup(s): v1 one per hierarchy (memory, pids, freezer), v2 one."""

    def __init__(self, version: Version, dirs: dict[str, str], owner: RunCgroups | None) -> None:
        self.version = version
        self.dirs = dirs  # controller -> directory
        self.name = os.path.basename(_unique(dirs)[0])
        self.procs_files = tuple(f"{d}/cgroup.procs" for d in _unique(dirs))
        self._owner = owner
        self._removed = False

    def join_command(self) -> list[str]:
        """``[*join_command(), prog, *args]`` runs prog inside the cgroup(s)."""
        writes = "".join(f"echo $$ > {shlex.quote(f)} && " for f in self.procs_files)
        return ["/bin/sh", "-c", writes + 'exec "$@"', "rmserve-cgroup-join"]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in _read(path).split())
        return found

    def _signal(self, pids: set[int]) -> None:
        """SIGKILL through pidfds, only to pids still listed once pinned (no pid-reuse victim)."""
        fds: list[tuple[int, int]] = []
        try:
            for pid in pids:
                with contextlib.suppress(OSError):
                    fds.append((pid, os.pidfd_open(pid)))
            still = self.pids()
            for pid, fd in fds:
                if pid in still:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            for _, fd in fds:
                os.close(fd)

    def _freeze(self, state: str, deadline: float) -> None:
        path = f"{self.dirs['freezer']}/freezer.state"
        _write(path, state)
        while _read(path) != state and time.monotonic() < deadline:
            time.sleep(0.001)

    def kill(self) -> None:
        """SIGKILL every process of the run and wait until none is left (TimeoutError after 2 s)."""
        deadline = time.monotonic() + _KILL_WAIT_S
        kill_file = f"{self.dirs['memory']}/cgroup.kill"
        v2_kill = self.version == "v2" and os.path.exists(kill_file)
        left = self.pids()
        freezer = "freezer" in self.dirs and os.path.exists(f"{self.dirs['freezer']}/freezer.state")
        if left and freezer and not v2_kill:
            self._freeze("FROZEN", time.monotonic() + 0.5)
            try:
                self._signal(self.pids())
            finally:
                self._freeze("THAWED", deadline)
            left = self.pids()
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(left)} processes left in {self.procs_files[0]}")
            if v2_kill:
                _write(kill_file, "1")
            else:
                self._signal(left)
            time.sleep(0.002)
            left = self.pids()

    def oom_killed(self) -> bool:
        """The memory limit was hit and the kernel OOM-killed a process of the run."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        with contextlib.suppress(OSError):
            for line in _read(f"{self.dirs['memory']}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
        return False

    def peak_memory_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int(_read(f"{self.dirs['memory']}/{name}"))
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """kill(), then remove the directories (idempotent)."""
        if self._removed:
            return
        self.kill()
        for d in _unique(self.dirs):
            for attempt in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:  # a dying process may still be counted for a moment
                    if e.errno != errno.EBUSY or attempt == 49:
                        raise
                    time.sleep(0.002)
        self._removed = True
        if self._owner is not None:
            self._owner._forget(self)


class RunCgroups:
    """Creates per-run cgroups under one parent (made at construction, removed by close())."""

    def __init__(self, version: Version, dirs: dict[str, str]) -> None:
        self.version: Version = version
        self.dirs = dirs  # controller -> this manager's directory
        where = ", ".join(_unique(dirs))
        self.support = CgroupSupport(version, f"{'+'.join(dirs)} cgroup per run under {where}")
        self._runs: dict[str, RunCgroup] = {}
        self._lock = threading.Lock()

    @staticmethod
    def detect(parent: str | None = None) -> RunCgroups | CgroupSupport:
        """A manager, or why not (``support.version`` None). Never raises for the environment."""
        try:
            with open("/proc/self/mountinfo") as m, open("/proc/self/cgroup") as c:
                return _setup(_parse_mountinfo(m.read()), _parse_proc_cgroup(c.read()), parent)
        except (OSError, ValueError) as e:
            return CgroupSupport(None, f"cannot inspect cgroups: {e}")

    def create(self, name: str, memory_bytes: int, max_processes: int) -> RunCgroup:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad cgroup name {name!r}")
        if memory_bytes <= 0 or max_processes <= 0:
            raise ValueError("memory_bytes and max_processes must be positive")
        run = RunCgroup(self.version, {c: f"{d}/{name}" for c, d in self.dirs.items()}, self)
        made: list[str] = []
        try:
            for d in _unique(run.dirs):
                os.mkdir(d)
                made.append(d)
            mem = run.dirs["memory"]
            if self.version == "v1":
                _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
                if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                    _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
            else:
                _write(f"{mem}/memory.max", str(memory_bytes))
                if os.path.exists(f"{mem}/memory.swap.max"):
                    _write(f"{mem}/memory.swap.max", "0")
            _write(f"{run.dirs['pids']}/pids.max", str(max_processes))
        except BaseException:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        with self._lock:
            self._runs[name] = run
        return run

    def _forget(self, run: RunCgroup) -> None:
        with self._lock:
            self._runs = {n: r for n, r in self._runs.items() if r is not run}

    def close(self) -> None:
        """Remove every run (killing what is left), then the parent directory (idempotent)."""
        with self._lock:
            runs = list(self._runs.values())
        stray: set[str] = set()
        for d in _unique(self.dirs):
            with contextlib.suppress(FileNotFoundError), os.scandir(d) as entries:
                stray.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for name in stray - {r.name for r in runs}:
            runs.append(
                RunCgroup(self.version, {c: f"{d}/{name}" for c, d in self.dirs.items()}, None)
            )
        errors: list[OSError] = []
        for run in runs:
            try:
                run.remove()
            except OSError as e:  # try the others; the parent stays if one run is left
                errors.append(e)
        if errors:
            raise errors[0]
        for d in _unique(self.dirs):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)

    def __enter__(self) -> RunCgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _setup(
    mounts: list[_Mount], own: dict[str, str], parent: str | None
) -> RunCgroups | CgroupSupport:
    """Pick the hierarchy and the base, and make this manager's directory there."""
    if parent is not None:
        under = [m for m in mounts if parent == m.point or parent.startswith(m.point + "/")]
        if under:  # a directory under a cgroup mount: its cgroup path
            m = max(under, key=lambda m: len(m.point))
            parent = m.root.rstrip("/") + "/" + parent[len(m.point) :].strip("/")
        if not parent.startswith("/") or ".." in parent.split("/"):
            return CgroupSupport(None, f"parent {parent!r} is not an absolute cgroup path")
    name = f"rmserve-sandbox-{os.getpid()}-{secrets.token_hex(3)}"
    v2 = next((m for m in mounts if m.version == "v2" and m.dir_of(own.get("", "/"))), None)
    if v2 is not None:
        with contextlib.suppress(OSError):
            if set(_NEEDED) <= set(_read(f"{v2.point}/cgroup.controllers").split()):
                return _setup_v2(v2, own.get("", "/"), parent, name)
    found = {
        c: m
        for c in (*_NEEDED, "freezer")
        for m in reversed(mounts)  # the first mount of a hierarchy wins
        if m.version == "v1" and c in m.options and m.dir_of(own.get(c, "/")) is not None
    }
    if all(c in found for c in _NEEDED):
        return _setup_v1(found, own, parent, name)
    return CgroupSupport(None, "no cgroup hierarchy with the memory and pids controllers")


def _failed(step: str, e: OSError) -> CgroupSupport:
    hint = _HINTS.get(e.errno or 0)
    return CgroupSupport(
        None, f"{step}: {e.strerror}: {e.filename}" + (f" ({hint})" if hint else "")
    )


def _setup_v2(mount: _Mount, own: str, parent: str | None, name: str) -> RunCgroups | CgroupSupport:
    if parent is None:  # own cgroup holds processes: only the root may have children then
        parent = own if mount.dir_of(own) == mount.point else os.path.dirname(own)
    base = mount.dir_of(parent)
    if base is None or not os.path.isdir(base):
        return CgroupSupport(None, f"v2: parent cgroup {parent} does not exist")
    made = False
    try:
        offered = _read(f"{base}/cgroup.controllers").split()
        if not set(_NEEDED) <= set(offered):
            return CgroupSupport(None, f"v2: {base} offers only {offered}, needs memory and pids")
        if not set(_NEEDED) <= set(_read(f"{base}/cgroup.subtree_control").split()):
            _write(f"{base}/cgroup.subtree_control", "+memory +pids")
        os.mkdir(f"{base}/{name}")
        made = True
        _write(f"{base}/{name}/cgroup.subtree_control", "+memory +pids")
    except OSError as e:
        if made:
            os.rmdir(f"{base}/{name}")
        return _failed("v2: cannot set up memory and pids cgroups", e)
    return RunCgroups("v2", {c: f"{base}/{name}" for c in _NEEDED})


def _setup_v1(
    mounts: dict[str, _Mount], own: dict[str, str], parent: str | None, name: str
) -> RunCgroups | CgroupSupport:
    dirs: dict[str, str] = {}
    for controller, mount in mounts.items():
        base = mount.dir_of(parent if parent is not None else own.get(controller, "/"))
        path = f"{base}/{name}"
        try:
            if path not in dirs.values():  # co-mounted controllers share a directory
                if base is None or not os.path.isdir(base):
                    raise FileNotFoundError(errno.ENOENT, "parent cgroup does not exist", base)
                os.mkdir(path)
            dirs[controller] = path
        except OSError as e:
            if controller == "freezer":  # optional: kill() then loops instead of freezing
                continue
            for d in _unique(dirs):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            return _failed(f"v1: cannot create a {controller} cgroup", e)
    return RunCgroups("v1", dirs)
