"""sandbox.cgroups: per-run cgroups bounding memory and processes, and killing a whole run.

Two parts:
* Real processes in real cgroups (need a writable hierarchy with memory and pids, e.g. root on a
  v1 or a delegated v2 machine; skipped with the reason otherwise).
* FAKE ROOT: the detection and file-writing logic (v2 above all, which this v1 test machine cannot
  run for real) on plain directories under tmp_path standing in for a cgroup mount. Plain files
  do not enforce anything; these tests only check which paths are chosen and what is written.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmserve.sandbox import cgroups
from rmserve.sandbox.cgroups import CgroupSupport, RunCgroup, RunCgroups

MB = 1 << 20
_names = itertools.count()


@pytest.fixture(scope="module")
def manager() -> Iterator[RunCgroups]:
    found = RunCgroups.detect()
    if isinstance(found, CgroupSupport):
        pytest.skip(f"per-run cgroups unavailable here: {found.reason}")
    yield found
    found.close()


@pytest.fixture
def cg(manager: RunCgroups) -> Iterator[RunCgroup]:
    run = manager.create(f"test-{next(_names)}", 64 * MB, 16)
    yield run
    run.remove()


def joined(run: RunCgroup, *argv: str, stdout: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*run.join_command(), *argv], text=True, stdout=stdout)


def cgroup_lines(pid: int) -> dict[str, str]:
    return cgroups._parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def gone(pid: int) -> bool:
    try:  # killed and reparented processes may stay zombies until their reaper runs
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


# --- real cgroups -------------------------------------------------------------------------------


def test_describe(manager: RunCgroups) -> None:
    assert manager.support.version in ("v1", "v2")
    assert manager.support.describe().startswith(f"per-run cgroups: {manager.support.version}")
    for d in manager.dirs.values():
        assert os.path.isdir(d) and "rmserve-sandbox-" in d


def test_join_puts_the_process_and_its_children_in_the_cgroup(cg: RunCgroup) -> None:
    proc = joined(cg, "sh", "-c", "sleep 30 & echo $!; wait", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert cg.pids() == {proc.pid, child}
    for pid in (proc.pid, child):
        lines = cgroup_lines(pid)
        for controller, directory in cg.dirs.items():
            key = "" if cg.version == "v2" else controller
            assert directory.endswith(lines[key]), (controller, lines)
    cg.remove()  # before wait(): the zombie shell does not keep the cgroup busy
    assert proc.wait() == -9
    assert not any(os.path.exists(d) for d in cg.dirs.values())


def test_join_costs_about_a_millisecond(cg: RunCgroup) -> None:
    def per_run(prefix: list[str]) -> float:
        start = time.perf_counter()
        for _ in range(40):
            subprocess.run([*prefix, "/bin/true"], check=True)
        return (time.perf_counter() - start) / 40

    extra_ms = (per_run(cg.join_command()) - per_run([])) * 1000
    print(f"join_command costs {extra_ms:.2f} ms per run")
    assert extra_ms < 10


def test_join_fails_closed(manager: RunCgroups, tmp_path: Path) -> None:
    run = manager.create(f"test-{next(_names)}", 64 * MB, 16)
    run.remove()
    run.remove()  # idempotent
    marker = tmp_path / "ran"
    result = subprocess.run(
        [*run.join_command(), "touch", str(marker)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "cgroup.procs" in result.stderr
    assert not marker.exists()


def test_memory_limit_oom_kills_the_run(cg: RunCgroup) -> None:
    fits = subprocess.run([*cg.join_command(), sys.executable, "-c", "b = bytearray(16 << 20)"])
    assert fits.returncode == 0 and not cg.oom_killed()
    code = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    start = time.monotonic()
    hog = subprocess.run([*cg.join_command(), sys.executable, "-c", code], timeout=10)
    assert hog.returncode == -9 and cg.oom_killed()
    peak = cg.peak_memory_bytes()
    print(f"OOM-killed after {time.monotonic() - start:.2f} s, peak {peak} bytes")
    assert peak is not None and 16 * MB < peak <= 64 * MB


def test_fork_loop_stops_at_pids_max(manager: RunCgroups) -> None:
    run = manager.create(f"test-{next(_names)}", 64 * MB, 8)
    code = (
        "import os, time\nn = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n    except OSError as e:\n"
        "        print(n, e.errno, flush=True); time.sleep(30)\n        break\n    n += 1"
    )
    proc = joined(run, sys.executable, "-c", code, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    forks, error = map(int, proc.stdout.readline().split())
    assert (forks, error) == (7, errno.EAGAIN)  # the python itself is the 8th
    assert len(run.pids()) == 8
    run.remove()
    assert proc.wait() == -9


def test_kill_reaches_a_daemonised_grandchild(cg: RunCgroup) -> None:
    code = """if True:
        import os, sys, time
        if os.fork() == 0:              # child
            if os.fork() == 0:          # grandchild: new session, then a double fork
                os.setsid()
                if os.fork() == 0:
                    print(os.getpid(), flush=True)
                    time.sleep(60)
                os._exit(0)
            time.sleep(60)
        time.sleep(60)
    """
    proc = joined(cg, sys.executable, "-c", code, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    daemon = int(proc.stdout.readline())
    deadline = time.monotonic() + 5
    while len(cg.pids()) != 3 and time.monotonic() < deadline:  # the middle one exits
        time.sleep(0.01)
    assert daemon in cg.pids() and len(cg.pids()) == 3
    assert os.getsid(daemon) != os.getsid(proc.pid)
    start = time.monotonic()
    cg.kill()
    print(f"kill() took {(time.monotonic() - start) * 1000:.1f} ms")
    assert cg.pids() == set() and gone(daemon)
    assert proc.wait() == -9


@pytest.mark.parametrize("freezer", [True, False], ids=["freezer-or-cgroup.kill", "pid-loop"])
def test_kill_ends_a_fork_bomb(manager: RunCgroups, freezer: bool) -> None:
    run = manager.create(f"test-{next(_names)}", 64 * MB, 12)
    # Every process forks again as soon as it can: pids.max stays full while kill() works.
    code = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"
    proc = joined(run, sys.executable, "-c", code)
    deadline = time.monotonic() + 5
    while len(run.pids()) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(run.pids()) == 12
    # Without a freezer (v1) or cgroup.kill (v2 before 5.14) kill() SIGKILLs the listed pids.
    dirs = run.dirs if freezer else {c: d for c, d in run.dirs.items() if c != "freezer"}
    view = RunCgroup("v1" if not freezer else run.version, dirs, None)
    start = time.monotonic()
    view.kill()
    print(f"fork bomb killed in {(time.monotonic() - start) * 1000:.1f} ms ({freezer=})")
    assert run.pids() == set() and proc.wait() == -9
    run.remove()


def test_v2_join_and_cgroup_kill_on_a_real_unified_hierarchy() -> None:
    """v2's join and kill (cgroup.kill) need no controller: tried on any writable cgroup2 mount
    (on a hybrid machine the empty /sys/fs/cgroup/unified). Limits are not tested here."""
    own = cgroups._parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get("", "/")
    mounts = cgroups._parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    base = next((m.dir_of(own) for m in mounts if m.version == "v2" and m.dir_of(own)), None)
    path = f"{base}/rmserve-test-{os.getpid()}"
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"no writable cgroup2 hierarchy: {e}")
    run = RunCgroup("v2", {"memory": path, "pids": path}, None)
    try:
        if not os.path.exists(f"{path}/cgroup.kill"):
            pytest.skip("kernel without cgroup.kill")
        proc = joined(run, "sh", "-c", "(setsid sleep 30 &) ; sleep 30")
        deadline = time.monotonic() + 5
        while len(run.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(run.pids()) >= 2
        assert path.endswith(cgroup_lines(proc.pid)[""])
        run.kill()
        assert run.pids() == set() and proc.wait() == -9
        assert not run.oom_killed() and run.peak_memory_bytes() is None  # no memory controller
    finally:
        run.remove()
    assert not os.path.exists(path)


def test_tmpfs_directories_are_charged_to_the_run(cg: RunCgroup, tmp_path: Path) -> None:
    """v1 charges dentries and inodes (kernel memory) to the memory cgroup: mkdir is bounded."""
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,nr_inodes=0", "rmserve-test", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    code = (
        "import os, sys\nn = 0\ntry:\n    while n < 1_000_000:\n"
        "        os.mkdir(f'{sys.argv[1]}/{n}'); n += 1\nexcept OSError as e:\n"
        "    print(n, e.errno); sys.exit(3)"
    )
    try:
        start = time.monotonic()
        result = subprocess.run(
            [*cg.join_command(), sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=15,
        )
        took = time.monotonic() - start
        made = len(os.listdir(tmp_path))
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)
    peak = cg.peak_memory_bytes()
    print(f"{made} dirs, exit {result.returncode} {result.stdout.strip()}, {took:.2f} s, {peak=}")
    ended_by_limit = result.returncode == -9 and cg.oom_killed()
    assert ended_by_limit or (result.returncode == 3 and int(result.stdout.split()[1]) in (12, 28))
    assert took < 5 and 10_000 < made < 1_000_000
    assert peak is not None and peak <= 64 * MB * 1.05


def test_create_remove_cycles_leak_nothing(manager: RunCgroups) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        run = manager.create(f"test-{next(_names)}", 32 * MB, 4)
        subprocess.run([*run.join_command(), "/bin/true"], check=True)
        run.remove()
    for d in manager.dirs.values():
        assert [e for e in os.scandir(d) if e.is_dir()] == []
    assert len(os.listdir("/proc/self/fd")) == fds


def test_close_kills_and_removes_everything() -> None:
    own = RunCgroups.detect()
    if isinstance(own, CgroupSupport):
        pytest.skip(own.reason)
    with own:
        run = own.create("busy", 64 * MB, 16)
        proc = joined(run, "sleep", "30")
        while not run.pids():
            time.sleep(0.005)
        os.mkdir(f"{own.dirs['pids']}/stray")  # e.g. left by a failed create
    assert proc.wait() == -9
    assert not any(os.path.exists(d) for d in own.dirs.values())
    own.close()  # idempotent


def test_impossible_parents_are_reported() -> None:
    for parent, words in [
        ("/rmserve-no-such-parent", "does not exist"),
        ("relative/path", "not an absolute cgroup path"),
        ("/a/../b", "not an absolute cgroup path"),
    ]:
        found = RunCgroups.detect(parent)
        assert isinstance(found, CgroupSupport) and found.version is None
        assert words in found.reason, found.reason
        assert found.describe().startswith("per-run cgroups unavailable (")


def test_configured_parent_v1(manager: RunCgroups) -> None:
    """A parent configured as a cgroup path, or as its directory under one cgroup mount."""
    if manager.version != "v1":
        pytest.skip("v2 configured parents are covered by the fake-root tests")
    mounts = cgroups._parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    tops = sorted(
        {
            max((m.point for m in mounts if d.startswith(m.point + "/")), key=len)
            for d in manager.dirs.values()
        }
    )
    name = f"rmserve-test-parent-{os.getpid()}"
    for top in tops:
        os.mkdir(f"{top}/{name}")
    try:
        for parent in (f"/{name}", f"{tops[0]}/{name}"):
            found = RunCgroups.detect(parent)
            assert isinstance(found, RunCgroups), found
            with found:
                assert len(found.dirs) == len(tops)
                assert all(
                    d.startswith(f"{t}/{name}/rmserve-sandbox-")
                    for t, d in zip(tops, sorted(found.dirs.values()), strict=True)
                )
    finally:
        for top in tops:
            os.rmdir(f"{top}/{name}")


# --- FAKE ROOT: parsing and the v2 logic on plain files ----------------------------------------


def test_parse_proc_cgroup() -> None:
    hybrid = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/\n"
    assert cgroups._parse_proc_cgroup(hybrid) == {
        "name=systemd": "/",
        "pids": "/",
        "memory": "/process_api/abc",
        "cpu": "/x",
        "cpuacct": "/x",
        "": "/",
    }
    assert cgroups._parse_proc_cgroup("0::/system.slice/rmserve.service\n") == {
        "": "/system.slice/rmserve.service"
    }


def test_parse_mountinfo_and_dir_of() -> None:
    text = (
        "23 1 0:21 / /sys rw - sysfs sysfs rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "36 31 0:33 / /mnt/my\\040cg rw - cgroup cgroup rw,pids,freezer\n"
    )
    v2, memory, spaced = cgroups._parse_mountinfo(text)
    assert (v2.point, v2.root, v2.version) == ("/sys/fs/cgroup", "/", "v2")
    assert v2.dir_of("/") == "/sys/fs/cgroup"
    assert v2.dir_of("/a/b") == "/sys/fs/cgroup/a/b"
    assert memory.version == "v1" and "memory" in memory.options
    assert memory.dir_of("/docker/abc/run") == "/sys/fs/cgroup/memory/run"
    assert memory.dir_of("/docker/abcd") is None and memory.dir_of("/other") is None
    assert spaced.point == "/mnt/my cg" and {"pids", "freezer"} <= spaced.options


def fake_v2(root: Path, own: str, controllers: str = "cpu memory pids") -> list[cgroups._Mount]:
    """Plain directories shaped like a v2 hierarchy; the service is in cgroup `own`."""
    for d in [root, *(root / own.strip("/")).parents, root / own.strip("/")]:
        if d == root or root in d.parents:
            d.mkdir(exist_ok=True)
            (d / "cgroup.controllers").write_text(controllers)
            (d / "cgroup.subtree_control").write_text("")
    return [cgroups._Mount(str(root), "/", "v2", frozenset({"rw"}))]


def test_fake_v2_sibling_of_the_services_cgroup(tmp_path: Path) -> None:
    mounts = fake_v2(tmp_path, "/svc/app")
    found = cgroups._setup(mounts, {"": "/svc/app"}, None)
    assert isinstance(found, RunCgroups) and found.version == "v2"
    (home,) = set(found.dirs.values())  # one directory serves both controllers
    assert Path(home).parent == tmp_path / "svc"  # beside app, which holds processes
    assert (tmp_path / "svc/cgroup.subtree_control").read_text() == "+memory +pids"
    assert Path(home, "cgroup.subtree_control").read_text() == "+memory +pids"
    run = found.create("run-1", 64 * MB, 32)
    assert run.procs_files == (f"{home}/run-1/cgroup.procs",)
    assert Path(home, "run-1/memory.max").read_text() == str(64 * MB)
    assert Path(home, "run-1/pids.max").read_text() == "32"
    assert not Path(home, "run-1/memory.swap.max").exists()  # only written where it exists
    # The pid written is the program's own: sh execs it.
    out = subprocess.run(
        [*run.join_command(), "sh", "-c", "echo $$"], capture_output=True, text=True, check=True
    )
    assert Path(run.procs_files[0]).read_text().strip() == out.stdout.strip()
    with pytest.raises(ValueError):
        found.create("../escape", MB, 1)
    with pytest.raises(FileExistsError):
        found.create("run-1", MB, 1)


def test_fake_v2_service_in_the_root(tmp_path: Path) -> None:
    mounts = fake_v2(tmp_path, "/")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids")  # already enabled: untouched
    found = cgroups._setup(mounts, {"": "/"}, None)
    assert isinstance(found, RunCgroups)
    assert Path(found.dirs["memory"]).parent == tmp_path
    assert (tmp_path / "cgroup.subtree_control").read_text() == "memory pids"


def test_fake_v2_configured_parent(tmp_path: Path) -> None:
    mounts = fake_v2(tmp_path, "/deleg/main")
    for parent in ("/deleg", str(tmp_path / "deleg")):  # cgroup path, or directory in the mount
        found = cgroups._setup(mounts, {"": "/other"}, parent)
        assert isinstance(found, RunCgroups)
        assert Path(found.dirs["pids"]).parent == tmp_path / "deleg"
    missing = cgroups._setup(mounts, {"": "/deleg/main"}, "/nope")
    assert isinstance(missing, CgroupSupport) and "does not exist" in missing.reason


def test_fake_v2_unavailable_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_pids = cgroups._setup(fake_v2(tmp_path / "a", "/svc/app", "memory"), {"": "/svc/app"}, None)
    assert isinstance(no_pids, CgroupSupport)  # v2 without pids and no v1 either
    assert "no cgroup hierarchy with the memory and pids controllers" in no_pids.reason

    mounts = fake_v2(tmp_path / "b", "/")
    real_write = cgroups._write

    def busy(path: str, value: str) -> None:
        if path.endswith("subtree_control"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", busy)
    found = cgroups._setup(mounts, {"": "/"}, None)  # a container's namespace root
    assert isinstance(found, CgroupSupport) and found.version is None
    assert "holds processes" in found.reason and "delegated parent" in found.reason


def test_fake_hybrid_falls_back_to_v1(tmp_path: Path) -> None:
    """A v2 mount without controllers (this machine's layout): the v1 hierarchies are used."""
    for sub in ("unified", "memory/svc", "pids"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "unified/cgroup.controllers").write_text("")
    mounts = [
        cgroups._Mount(str(tmp_path / "unified"), "/", "v2", frozenset({"rw"})),
        cgroups._Mount(str(tmp_path / "memory"), "/", "v1", frozenset({"rw", "memory"})),
        cgroups._Mount(str(tmp_path / "pids"), "/", "v1", frozenset({"rw", "pids"})),
    ]
    found = cgroups._setup(mounts, {"": "/", "memory": "/svc", "pids": "/"}, None)
    assert isinstance(found, RunCgroups) and found.version == "v1"
    assert set(found.dirs) == {"memory", "pids"}  # no freezer mounted: kill() loops instead
    assert Path(found.dirs["memory"]).parent == tmp_path / "memory/svc"
    run = found.create("r", 64 * MB, 8)
    assert Path(run.dirs["memory"], "memory.limit_in_bytes").read_text() == str(64 * MB)
    assert Path(run.dirs["pids"], "pids.max").read_text() == "8"
    assert len(run.procs_files) == 2
