"""The seccomp filter of the code sandbox: a classic-BPF program bwrap loads with ``--seccomp FD``.

Untrusted code in the code sandbox must not trace, or read and write the memory of, another
process of its run - e.g. take over pid 1 (the run's supervisor) with PTRACE_ATTACH, a published
escape against this project - and must not reach kernel attack surface it has no use for:
io_uring, eBPF, perf, userfaultfd (a favourite for winning kernel races), keyrings, module
loading, the mount API, namespaces. Namespaces, capabilities and ``no_new_privs`` already make
most of these fail; the filter removes the code paths themselves, on every kernel.

Policy: default ALLOW. The ``DENIED_SYSCALLS`` fail with EPERM (SECCOMP_RET_ERRNO), so Python sees
``PermissionError`` and a test can report it instead of dying. A syscall made with a foreign
audit arch (i386 ``int 0x80`` on x86_64, AArch32 on aarch64) kills the process: each ABI has its
own numbering, which this filter does not check. On x86_64 any number with the x32 bit set
fails with EPERM (x32 numbers are a second table). ``clone``/``clone3`` stay allowed: glibc's
fork and posix_spawn use clone3, and namespace creation is already stopped by bwrap
(``--disable-userns``, no capabilities). ``personality`` is allowed only as a query
(0xffffffff) or to set PER_LINUX (0); any other persona (ADDR_NO_RANDOMIZE turns off ASLR for
what is exec'd next, READ_IMPLIES_EXEC makes every mapping executable) fails with EPERM.

The program only reads the arch and the syscall number (and personality's first argument), so
the kernel's seccomp action cache (>= 5.11) allows all other syscalls without running it.

Not covered: ``/proc/<pid>/mem`` is plain open/pread/pwrite, which a filter cannot tell from
other file I/O (it sees no paths). Under bwrap with ``--proc``, a child of pid 1 opens /proc/1/mem
read-write, filter or not; it fails (EACCES) once pid 1 is non-dumpable (``PR_SET_DUMPABLE`` 0)
and the sandbox holds no capabilities (``--cap-drop ALL``), or when there is no /proc.
"""

from __future__ import annotations

import platform
import struct
import sys

__all__ = ["DENIED_SYSCALLS", "UnsupportedArchitecture", "filter_program", "supported"]


class UnsupportedArchitecture(ValueError):
    """No syscall table for this machine."""


DENIED_SYSCALLS: tuple[str, ...] = (
    # Another process's memory and files: the pid-1 takeover and its variants.
    "ptrace",  # attach to / trace another process of the run (pid 1, the harness)
    "process_vm_readv",  # read another process's memory without ptrace
    "process_vm_writev",  # write another process's memory without ptrace
    "process_madvise",  # madvise another process's memory (pidfd)
    "move_pages",  # move or probe the pages of another process
    "migrate_pages",  # move all pages of another process between NUMA nodes
    "pidfd_getfd",  # steal a file descriptor (status pipe, job memfd) from another process
    "kcmp",  # compare kernel objects of two processes: leaks fd/mm sharing across processes
    # Kernel attack surface with no use for a Python test.
    "perf_event_open",  # perf: large, bug-prone, side channels
    "bpf",  # eBPF programs and maps (verifier bugs)
    "userfaultfd",  # stalls kernel copies at will: the usual tool for winning kernel races
    "io_uring_setup",  # io_uring: a long list of local privilege escalations; also runs
    "io_uring_enter",  #   syscalls from kernel workers, outside this filter
    "io_uring_register",
    "keyctl",  # kernel keyrings: not namespaced, bug-prone
    "add_key",
    "request_key",
    "syslog",  # kernel log: host messages and kernel addresses
    "lookup_dcookie",  # oprofile leftover (removed in 6.8)
    "fanotify_init",  # filesystem-wide event monitoring
    "open_by_handle_at",  # open files by handle, bypassing the mount tree (the "shocker" escape)
    "name_to_handle_at",  # the other half of it
    # Mounts and namespaces: the sandbox's layout is fixed by bwrap.
    "mount",
    "umount2",
    "pivot_root",
    "unshare",  # new namespaces (CLONE_NEWUSER would give capabilities inside)
    "setns",  # join another namespace
    "move_mount",  # the new mount API (5.2+)
    "open_tree",
    "open_tree_attr",  # 6.15+
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # Whole-machine administration: needs capabilities the sandbox lacks; fail early anyway.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "quotactl_fd",
    # x86 only.
    "iopl",  # raw I/O port access
    "ioperm",
    "modify_ldt",  # segment descriptors: a history of kernel bugs, no use to Python
    "uselib",  # a.out library loader
)

# Syscall numbers: x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from the
# asm-generic table (include/uapi/asm-generic/unistd.h); numbers >= 403 are shared by all arches.
_COMMON = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
    "open_tree_attr": 467,
}  # fmt: skip
_X86_64 = _COMMON | {
    "ptrace": 101, "syslog": 103, "personality": 135, "uselib": 134, "pivot_root": 155,
    "modify_ldt": 154, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "migrate_pages": 256, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
}  # fmt: skip
_AARCH64 = _COMMON | {
    "lookup_dcookie": 18, "umount2": 39, "mount": 40, "pivot_root": 41, "quotactl": 60,
    "acct": 89, "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
    "delete_module": 106, "syslog": 116, "ptrace": 117, "reboot": 142, "add_key": 217,
    "request_key": 218, "keyctl": 219, "swapon": 224, "swapoff": 225, "migrate_pages": 238,
    "move_pages": 239, "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
    "kcmp": 272, "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
}  # fmt: skip
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {"x86_64": _X86_64, "aarch64": _AARCH64}
# include/uapi/linux/audit.h: EM_X86_64 / EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
AUDIT_ARCH: dict[str, int] = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# Classic BPF (include/uapi/linux/bpf_common.h, filter.h): struct sock_filter is
# {u16 code; u8 jt; u8 jf; u32 k}; jt/jf are forward offsets from the next instruction.
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS: A = *(u32 *)(seccomp_data + k)
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K: if A == k
_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K: if A & k
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K: return k
# struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # the low half of args[0] (both machines are little-endian)
# include/uapi/linux/seccomp.h
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000  # | errno in the low 16 bits
_RET_ALLOW = 0x7FFF0000
_EPERM = 1
_X32_SYSCALL_BIT = 0x40000000
_PERSONALITY_ALLOWED = (0x00000000, 0xFFFFFFFF)  # PER_LINUX; query the current persona

_Jump = int | str  # a relative offset (0: the next instruction) or a label
_Insn = tuple[int, _Jump, _Jump, int]


def supported() -> bool:
    """True where `filter_program()` has a table for the running kernel: x86_64/aarch64 Linux."""
    return sys.platform == "linux" and platform.machine() in SYSCALL_NUMBERS


def filter_program(machine: str | None = None) -> bytes:
    """The BPF program for `machine` (platform.machine() by default: 'x86_64' or 'aarch64').
    Raises UnsupportedArchitecture (a ValueError subclass) for other machines."""
    machine = platform.machine() if machine is None else machine
    if machine not in SYSCALL_NUMBERS:
        raise UnsupportedArchitecture(f"no seccomp syscall table for machine {machine!r}")
    numbers = SYSCALL_NUMBERS[machine]
    program: list[_Insn | str] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 0, "kill", AUDIT_ARCH[machine]),  # another ABI: its numbers mean other calls
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        program.append((_JSET_K, "deny", 0, _X32_SYSCALL_BIT))
    # Names missing from a table do not exist on that machine (iopl, ioperm, ... on aarch64).
    denied = sorted({numbers[name] for name in DENIED_SYSCALLS if name in numbers})
    program += [(_JEQ_K, "deny", 0, number) for number in denied]
    program += [
        (_JEQ_K, 0, "allow", numbers["personality"]),
        (_LD_W_ABS, 0, 0, _ARG0_LOW),  # the kernel takes `unsigned int persona`
        (_JEQ_K, "allow", 0, _PERSONALITY_ALLOWED[0]),
        (_JEQ_K, "allow", "deny", _PERSONALITY_ALLOWED[1]),
        "allow",
        (_RET_K, 0, 0, _RET_ALLOW),
        "deny",
        (_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        "kill",
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    return _assemble(program)


def _assemble(program: list[_Insn | str]) -> bytes:
    """Resolve labels (the strings in `program`) to jump offsets and pack native-endian."""
    labels: dict[str, int] = {}
    instructions: list[_Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(jump: _Jump, index: int) -> int:
        relative = jump if isinstance(jump, int) else labels[jump] - index - 1
        if not 0 <= relative <= 0xFF:
            raise ValueError(f"jump out of range at instruction {index}: {relative}")
        return relative

    return b"".join(
        struct.pack("=HBBI", code, offset(jt, index), offset(jf, index), k)
        for index, (code, jt, jf, k) in enumerate(instructions)
    )
