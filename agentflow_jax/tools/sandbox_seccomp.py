"""The sandbox's seccomp filter: system calls that plain Python never needs are refused.

The filter is compiled once per process with libseccomp (the maintained C library, reached through
ctypes; Debian package `libseccomp2`), exported as a classic-BPF program (`bytes`, an array of
`struct sock_filter`), and installed by the sandbox bootstrap in the code's process right before
it execs the interpreter (`sandbox_boot._install_seccomp`). Everything not listed is allowed; a
listed call fails with EPERM, except `clone3`, which fails with ENOSYS so that glibc falls back
to `clone`, whose flags the filter can inspect (clone3 passes them in memory). System calls of
another architecture (32-bit entry points on x86_64, x32) kill the process: libseccomp's default
for a foreign architecture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import threading

# Refused outright: debugging other processes, mounts and namespaces, kernel keyrings, eBPF, perf
# events, io_uring, kernel modules, clocks, swap, reboot, host names, raw I/O ports, kernel log.
REFUSED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "lookup_dcookie",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "iopl", "ioperm", "syslog", "vhangup", "uselib", "nfsservctl",
)
# clone() with any of these flags (new namespaces) is refused; a plain fork or thread is not.
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}
_TIOCSTI = 0x5412  # ioctl that pushes characters into a terminal's input
# Architectures whose clone() takes the flags as its first argument (s390 passes them second).
_CLONE_FLAGS_FIRST = {"x86_64", "aarch64", "riscv64", "ppc64le", "loongarch64"}

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _errno_action(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    """`struct scmp_arg_cmp`: argument index, comparison, two 64-bit operands."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    """libseccomp is missing or failed; the message says what to install."""


_lock = threading.Lock()
_cached: bytes | SeccompUnavailable | None = None


def filter_program() -> bytes:
    """The compiled filter (BPF instructions, 8 bytes each), built once per process.

    Raises SeccompUnavailable (with what to install) when libseccomp cannot be loaded or fails.
    """
    global _cached
    with _lock:
        if _cached is None:
            try:
                _cached = _build()
            except SeccompUnavailable as e:
                _cached = e
        if isinstance(_cached, SeccompUnavailable):
            raise _cached
        return _cached


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp not found ({e}); install it (Debian/Ubuntu: apt-get "
                                 "install libseccomp2)") from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _build() -> bytes:
    lib = _load_libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("libseccomp could not create a filter (seccomp_init failed)")
    try:
        eperm = _errno_action(errno.EPERM)

        def add(name: str, action: int, *conditions: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                return  # not a system call of this architecture
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), array)
            if rc < 0:
                raise SeccompUnavailable(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")

        for name in REFUSED_SYSCALLS:
            add(name, eperm)
        add("clone3", _errno_action(errno.ENOSYS))
        if platform.machine() in _CLONE_FLAGS_FIRST:
            for flag in CLONE_NAMESPACE_FLAGS.values():
                add("clone", eperm, _ArgCmp(0, _SCMP_CMP_MASKED_EQ, flag, flag))
        add("ioctl", eperm, _ArgCmp(1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("agentflow_seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SeccompUnavailable(f"libseccomp could not export the filter: {os.strerror(-rc)}")
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed filter ({len(program)} bytes)")
    return program
