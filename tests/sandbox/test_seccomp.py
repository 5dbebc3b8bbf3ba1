"""sandbox.seccomp: the BPF program, checked by a small interpreter and under a real bwrap.

The bwrap cases run one Python program inside the sandbox twice, with and without the filter (the
"control" run shows that an EPERM comes from the filter, not from the namespaces or the host),
and assert on the JSON it prints. Two bwrap runs: the whole file takes about a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rmserve.sandbox import seccomp
from rmserve.sandbox.seccomp import DENIED_SYSCALLS, UnsupportedArchitecture, filter_program

MACHINES = ("x86_64", "aarch64")
X86_ONLY = {"iopl", "ioperm", "modify_ldt", "uselib"}
# include/uapi/linux/seccomp.h, audit.h
RET_ALLOW, RET_EPERM, RET_KILL_PROCESS = 0x7FFF0000, 0x00050001, 0x80000000
AUDIT_ARCH_I386, AUDIT_ARCH_ARM = 0x40000003, 0x40000028
# Syscalls Python needs, by machine: read, write, clone, clone3, execve, wait4, getpid, mmap.
NEEDED = {
    "x86_64": (0, 1, 56, 435, 59, 61, 39, 9),
    "aarch64": (63, 64, 220, 435, 221, 260, 172, 222),
}
ADDR_NO_RANDOMIZE = 0x0040000


# ----------------------------------------------------------------------------------------------
# The program itself, for both machines (no kernel needed).
# ----------------------------------------------------------------------------------------------


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    assert program and len(program) % 8 == 0
    return list(struct.iter_unpack("=HBBI", program))


def run_filter(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """Interpret `program` (the opcodes it may use) on one struct seccomp_data."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    code_of = instructions(program)
    pc = accumulator = 0
    while True:
        code, jt, jf, k = code_of[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += 1 + (jt if accumulator == k else jf)
        elif code == 0x45:  # BPF_JMP | BPF_JSET | BPF_K
            pc += 1 + (jt if accumulator & k else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x} at {pc}")


@pytest.mark.parametrize("machine", MACHINES)
def test_program_is_well_formed(machine: str) -> None:
    code = instructions(filter_program(machine))
    assert len(code) <= 4096  # BPF_MAXINSNS
    assert code[-1][0] == 0x06  # ends with a RET: no path falls off the end
    for pc, (opcode, jt, jf, k) in enumerate(code):
        assert opcode in (0x20, 0x15, 0x45, 0x06)
        if opcode in (0x15, 0x45):
            assert pc + 1 + max(jt, jf) < len(code)
        if opcode == 0x20:  # aligned loads inside struct seccomp_data (64 bytes)
            assert k % 4 == 0 and k < 64


@pytest.mark.parametrize("machine", MACHINES)
def test_policy(machine: str) -> None:
    program, numbers = filter_program(machine), seccomp.SYSCALL_NUMBERS[machine]
    arch = seccomp.AUDIT_ARCH[machine]
    for name in DENIED_SYSCALLS:
        if name in numbers:
            assert run_filter(program, numbers[name], arch) == RET_EPERM, name
    for nr in NEEDED[machine]:
        assert run_filter(program, nr, arch) == RET_ALLOW, nr
        foreign = AUDIT_ARCH_I386 if machine == "x86_64" else AUDIT_ARCH_ARM
        assert run_filter(program, nr, foreign) == RET_KILL_PROCESS
    personality = numbers["personality"]
    for persona in (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        assert run_filter(program, personality, arch, persona) == RET_ALLOW
    for persona in (ADDR_NO_RANDOMIZE, 0x0400000, 0x8):  # no ASLR, READ_IMPLIES_EXEC, LINUX32
        assert run_filter(program, personality, arch, persona) == RET_EPERM
    x32_getpid = 0x40000000 | 39
    expected = RET_EPERM if machine == "x86_64" else RET_ALLOW  # aarch64: just an unknown number
    assert run_filter(program, x32_getpid, arch) == expected


def test_tables_cover_the_deny_list() -> None:
    assert len(set(DENIED_SYSCALLS)) == len(DENIED_SYSCALLS)
    assert set(DENIED_SYSCALLS) <= set(seccomp.SYSCALL_NUMBERS["x86_64"])
    aarch64 = set(seccomp.SYSCALL_NUMBERS["aarch64"])
    assert set(DENIED_SYSCALLS) - X86_ONLY <= aarch64
    assert not X86_ONLY & aarch64
    assert {"clone", "clone3", "personality"}.isdisjoint(DENIED_SYSCALLS)


def header_numbers(*candidates: str) -> dict[str, int]:
    for candidate in candidates:
        if Path(candidate).is_file():
            text = Path(candidate).read_text()
            pattern = r"^#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$"
            return {name: int(nr) for name, nr in re.findall(pattern, text, re.MULTILINE)}
    pytest.skip(f"no kernel header among {candidates}")


@pytest.mark.parametrize(
    ("machine", "headers"),
    [
        (
            "x86_64",
            ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"),
        ),
        ("aarch64", ("/usr/include/asm-generic/unistd.h",)),
    ],
)
def test_numbers_match_the_kernel_headers(machine: str, headers: tuple[str, ...]) -> None:
    """The installed uapi headers; syscalls newer than the headers are skipped."""
    known = header_numbers(*headers)
    table = seccomp.SYSCALL_NUMBERS[machine]
    compared = {name: nr for name, nr in table.items() if name in known}
    assert compared == {name: known[name] for name in compared}
    assert len(compared) >= len(table) - 3


def test_unknown_machine() -> None:
    for machine in ("i686", "armv7l", "riscv64", "ppc64le", ""):
        with pytest.raises(UnsupportedArchitecture):
            filter_program(machine)
    assert issubclass(UnsupportedArchitecture, ValueError)


# ----------------------------------------------------------------------------------------------
# Under bwrap.
# ----------------------------------------------------------------------------------------------

# Runs inside the sandbox: argv[1] is "filtered" or "control", argv[2] the syscall table (JSON).
INSIDE = r"""
import ctypes, json, mmap, os, platform, subprocess, sys, threading
filtered, numbers = sys.argv[1] == "filtered", json.loads(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(arg) for arg in args))
    return [result, ctypes.get_errno() if result == -1 else 0]

def in_child(function):
    pid = os.fork()
    if pid == 0:
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no core dump if killed
        try:
            function()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]

out = {"unshare": call(numbers["unshare"], 0)}
out["io_uring_setup"] = call(numbers["io_uring_setup"], 1, 0)
if filtered:  # unfiltered, PTRACE_TRACEME would hand this process to pid 1
    denied = json.loads(sys.argv[3])
    out["denied"] = {name: call(numbers[name], 0, 0, 0, 0, 0, 0) for name in denied}
    out["ptrace_attach_1"] = call(numbers["ptrace"], 16, 1, 0, 0)
    out["process_vm_readv_1"] = call(numbers["process_vm_readv"], 1, 0, 0, 0, 0, 0)
    out["personality_query"] = call(numbers["personality"], 0xFFFFFFFF)
    out["personality_no_aslr"] = call(numbers["personality"], 0x0040000)
    out["fork"] = in_child(lambda: os._exit(7))
    results = []
    threads = [threading.Thread(target=results.append, args=(i * i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["threads"] = sorted(results)
    out["true"] = subprocess.run(["/bin/true"]).returncode
    with open("/tmp/data", "wb") as file:
        file.write(os.urandom(1 << 20))
    out["written"] = os.path.getsize("/tmp/data")
if platform.machine() == "x86_64":
    out["x32_getpid"] = call(0x40000000 | 39)
    code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(bytes.fromhex("b814000000" "cd80" "c3"))  # mov eax, 20 (i386 getpid); int 0x80; ret
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    int80_getpid = ctypes.CFUNCTYPE(ctypes.c_int)(address)
    out["int80"] = in_child(lambda: os._exit(0 if int80_getpid() == os.getpid() else 1))
print(json.dumps(out))
"""


def bwrap_command(bwrap: str, seccomp_fd: int | None, *argv: str) -> list[str]:
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    args += ["--die-with-parent"]
    args += ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    if not (prefix + "/").startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return [*args, "--", executable, "-I", "-c", INSIDE, *argv]


def run_inside(filtered: bool) -> dict[str, Any]:
    bwrap = shutil.which("bwrap")
    if bwrap is None or not seccomp.supported():
        pytest.skip("needs bwrap on x86_64 or aarch64 Linux")
    numbers = seccomp.SYSCALL_NUMBERS[os.uname().machine]
    argv = ["filtered" if filtered else "control", json.dumps(numbers)]
    argv += [json.dumps([name for name in DENIED_SYSCALLS if name in numbers])]
    memfd = os.memfd_create("seccomp-filter")
    try:
        os.write(memfd, filter_program())
        os.lseek(memfd, 0, os.SEEK_SET)
        command = bwrap_command(bwrap, memfd if filtered else None, *argv)
        done = subprocess.run(command, pass_fds=[memfd], capture_output=True, timeout=60)
    finally:
        os.close(memfd)
    if not filtered and done.returncode != 0:
        pytest.skip(f"bwrap cannot run here: {done.stderr.decode(errors='replace')[-500:]}")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def control() -> dict[str, Any]:
    return run_inside(filtered=False)


@pytest.fixture(scope="module")
def filtered(control: dict[str, Any]) -> dict[str, Any]:
    return run_inside(filtered=True)


EPERM = [-1, 1]


def test_denied_syscalls_fail_with_eperm(control: dict[str, Any], filtered: dict[str, Any]) -> None:
    assert control["unshare"] == [0, 0]  # the filter, not the namespaces, refuses
    assert control["io_uring_setup"] != EPERM
    assert filtered["unshare"] == filtered["io_uring_setup"] == EPERM
    assert filtered["denied"]["ptrace"] == EPERM  # PTRACE_TRACEME
    assert filtered["ptrace_attach_1"] == EPERM
    assert filtered["process_vm_readv_1"] == EPERM
    assert {name: EPERM for name in filtered["denied"]} == filtered["denied"]
    assert filtered["personality_query"][0] >= 0
    assert filtered["personality_no_aslr"] == EPERM


def test_normal_work_still_runs(filtered: dict[str, Any]) -> None:
    assert os.WIFEXITED(filtered["fork"]) and os.WEXITSTATUS(filtered["fork"]) == 7
    assert filtered["threads"] == [0, 1, 4, 9]
    assert filtered["true"] == 0
    assert filtered["written"] == 1 << 20


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 ABIs")
def test_foreign_abis(control: dict[str, Any], filtered: dict[str, Any]) -> None:
    assert control["x32_getpid"][0] != -1 or control["x32_getpid"][1] != 1
    assert filtered["x32_getpid"] == EPERM
    if not os.WIFEXITED(control["int80"]):
        pytest.skip("no IA32 emulation in this kernel: int 0x80 cannot reach seccomp")
    assert os.WEXITSTATUS(control["int80"]) == 0  # i386 getpid works without the filter
    assert os.WIFSIGNALED(filtered["int80"]) and os.WTERMSIG(filtered["int80"]) == signal.SIGSYS
