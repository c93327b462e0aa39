"""The sandbox bootstrap: run by `sandbox.run_python` as `python -I -S sandbox_boot.py SPEC_FD`.

Standard library only; never imported by the package. It reads the run's spec (JSON: the code,
limits, what to bind, the cgroup, the seccomp program) from the pipe SPEC_FD, which the caller
fills once it has moved the bootstrap into the run's cgroup, and sets up the layers described in
`sandbox` in three processes:

1. the bootstrap (caller's uid, new session, already in the run's cgroup when there is one, so
   all it forks is inside) enters new PID, network and IPC namespaces, directly
   as root with CAP_SYS_ADMIN or inside a new user namespace otherwise, becomes a child
   subreaper, then forks init and waits for it up to the wall limit, or until the run's cgroup
   reports an OOM kill (cgroup v1), and SIGKILLs it then; finally it sweeps leftovers;
2. init (PID 1 of the namespace) enters a mount namespace, builds the
   filesystem (an empty tmpfs root with read-only binds, a fresh /proc, a minimal /dev, the work
   directory), pivots into it, writes main.py, forks the code's process and reaps until it ends;
3. the code's process switches to the sandbox uid (or drops every capability when it stays uid 0),
   sets no_new_privs, the rlimits and the seccomp filter, checks the `require` level, and execs
   `python -I main.py` with a clean environment.

What was set up, what was not and why, errors and exit information go back to the caller as JSON
lines on the status pipe.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import stat
import sys
import time
from typing import Any, NoReturn

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 0x20, 0x400, 0x800, 0x1000
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 0x4000, 0x40000, 0x200000
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_SECCOMP = 1, 4, 24, 22
_PR_SET_SECUREBITS, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 28, 36, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SECCOMP_MODE_FILTER = 2
_SECBIT_NOROOT_AND_LOCKED = 0x3 | 0x4 | 0x8  # NOROOT(+LOCKED), NO_SETUID_FIXUP(+LOCKED)
_CAP_SYS_ADMIN = 21
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "loongarch64": 41}
# Locked mount flags a read-only bind must keep (the kernel refuses to clear them in a user
# namespace): statvfs flag -> mount flag.
_KEEP_FLAGS = ((os.ST_NOEXEC, _MS_NOEXEC), (os.ST_NOATIME, _MS_NOATIME),
               (os.ST_NODIRATIME, _MS_NODIRATIME), (os.ST_RELATIME, _MS_RELATIME))
_DEVICES = ("null", "zero", "full", "random", "urandom")
_NEW_ROOT = "/tmp"  # where the new root's tmpfs is mounted before pivot_root (in our namespace only)
WORKDIR = "/sandbox"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _Status:
    """Writes JSON lines to the status pipe (shared by bootstrap, init and the code's process)."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_inheritable(fd, False)  # the user's code must not inherit it

    def send(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


class _Layers:
    """The layers set up so far and the missing ones with their reasons (inherited by fork)."""

    def __init__(self, status: _Status):
        self.status = status
        self.ok: list[str] = []
        self.missing: dict[str, str] = {}

    def add(self, layer: str) -> None:
        self.ok.append(layer)

    def miss(self, layer: str, reason: str) -> None:
        self.missing.setdefault(layer, reason)

    def __contains__(self, layer: str) -> bool:
        return layer in self.ok


def _check(name: str, rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(f"mount {target}", _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)))


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    _check(f"prctl({option})", _libc.prctl(option, arg, arg3, 0, 0))


def _unshare(flag: int) -> None:
    _check("unshare", _libc.unshare(flag))


# ---------------------------------------------------------------------------------------------
# 1. The bootstrap
# ---------------------------------------------------------------------------------------------

def _bootstrap_main(spec: dict[str, Any]) -> int:
    status = _Status(spec["status_fd"])
    layers = _Layers(status)
    for layer, reason in spec["missing"].items():
        layers.miss(layer, reason)
    if spec["cgroup"] is not None:
        layers.add("cgroup")  # the caller moved us in before sending the spec
    if spec["use_namespaces"]:
        _enter_namespaces(layers)
    else:
        for layer in ("filesystem", "pid", "network", "ipc"):
            layers.miss(layer, "turned off by use_namespaces=False")
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    oom_fd = _watch_oom(spec["cgroup"], layers)
    init_pid = os.fork()
    if init_pid == 0:
        _init_main(spec, layers)
    ended = _wait_for_init(init_pid, spec["wall_timeout_s"], oom_fd)
    if ended != "exited":
        status.send(**{ended: True})
        os.kill(init_pid, signal.SIGKILL)  # not reaped yet, so the pid is still init's
    _sweep(spec, layers)
    return 0


def _enter_namespaces(layers: _Layers) -> None:
    """PID, network and IPC namespaces: directly with CAP_SYS_ADMIN, else in a user namespace."""
    if not _has_cap_sys_admin():
        try:
            _enter_user_namespace()
            layers.miss("uid", f"no CAP_SYS_ADMIN: the namespaces come from a user namespace that maps "
                               f"only the caller's uid {os.geteuid()}; run as root for a separate uid")
        except OSError as e:
            reason = (f"cannot create a user namespace ({e.strerror}) and no CAP_SYS_ADMIN; run as root "
                      "or allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
                      "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0)")
            for layer in ("filesystem", "pid", "network", "ipc"):
                layers.miss(layer, reason)
            return
    for layer, flag in (("pid", _CLONE_NEWPID), ("network", _CLONE_NEWNET), ("ipc", _CLONE_NEWIPC)):
        try:
            _unshare(flag)
            layers.add(layer)
        except OSError as e:
            layers.miss(layer, f"unshare failed ({e.strerror}); allow {layer} namespaces")


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    return False


def _enter_user_namespace() -> None:
    """Becomes root of a new user namespace that maps only the caller's own uid and gid."""
    uid, gid = os.geteuid(), os.getegid()
    _unshare(_CLONE_NEWUSER)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def _watch_oom(cgroup: dict[str, Any] | None, layers: _Layers) -> int | None:
    """cgroup v1: an eventfd that becomes readable when the run's memory cgroup OOM-kills."""
    if not cgroup or not cgroup.get("oom_control"):
        return None
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ofd = os.open(cgroup["oom_control"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(cgroup["event_control"], "w") as f:
            f.write(f"{efd} {ofd}")
    except OSError as e:
        layers.miss("cgroup", f"cannot watch the run's OOM events ({e.strerror})")
        os.close(efd)
        return None
    return efd


def _wait_for_init(pid: int, timeout_s: float, oom_fd: int | None) -> str:
    """"exited", "timed_out" (wall limit) or "oom" (the run's memory cgroup killed a process)."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # kernel < 5.3: poll the child instead
        return _poll_for_init(pid, deadline, oom_fd)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if oom_fd is not None:
        poller.register(oom_fd, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
        if pidfd in ready:
            return "exited"
        if oom_fd in ready:
            return "oom"
    return "timed_out"


def _poll_for_init(pid: int, deadline: float, oom_fd: int | None) -> str:
    delay = 0.001
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return "exited"
        if oom_fd is not None and select.select([oom_fd], [], [], 0)[0]:
            return "oom"
        time.sleep(delay)
        delay = min(0.02, delay * 2)
    return "timed_out"


def _sweep(spec: dict[str, Any], layers: _Layers) -> None:
    """Kills and reaps every process left behind.

    With a PID namespace the kernel killed everything when init died. Otherwise every process of
    the sandbox uid is killed, then the orphans that were re-parented to us (we are a subreaper);
    the caller also empties the run's cgroup.
    """
    if "pid" not in layers and spec["uid"] is not None and "uid" not in layers.missing:
        _kill_all_of_uid(spec["uid"])
    for _ in range(200):
        _reap_exited()
        children = _own_children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    else:
        layers.status.send(notes=["some leftover processes could not be killed"])
    _reap_exited()


def _reap_exited() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _kill_all_of_uid(uid: int) -> None:
    """kill(-1, SIGKILL) from a helper running as `uid`: every process of that uid dies at once."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _own_children() -> list[int]:
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


# ---------------------------------------------------------------------------------------------
# 2. init
# ---------------------------------------------------------------------------------------------

def _init_main(spec: dict[str, Any], layers: _Layers) -> NoReturn:
    """PID 1 of the sandbox: cgroup, filesystem, main.py, then the code; reports how it ended."""
    status = layers.status
    try:
        _prctl(_PR_SET_DUMPABLE, 0)  # the code may share init's uid: keep it out of /proc/1/fd and mem
        if spec["use_namespaces"] and "filesystem" not in layers.missing:
            try:
                _unshare(_CLONE_NEWNS)
                _build_root(spec, layers)
                layers.add("filesystem")
            except OSError as e:
                layers.miss("filesystem", f"could not build the private filesystem ({e}); allow mount "
                                          "namespaces (root with CAP_SYS_ADMIN, or user namespaces)")
        if "filesystem" not in layers and spec["uid_blocked_by"]:
            layers.miss("uid", f"the sandbox uid cannot traverse {', '.join(spec['uid_blocked_by'])} to reach "
                               "the interpreter and there is no private filesystem to re-expose it; "
                               "install Python where every user can read it (chmod o+x)")
        workdir = WORKDIR if "filesystem" in layers else _host_workdir(spec, layers)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(spec["code"])
        code_pid = os.fork()
        if code_pid == 0:
            _code_main(spec, layers, workdir)
        while True:
            pid, wait_status = os.wait()
            if pid == code_pid:
                break
        if os.WIFSIGNALED(wait_status):
            status.send(exit={"signal": os.WTERMSIG(wait_status)})
        else:
            status.send(exit={"code": os.WEXITSTATUS(wait_status)})
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report anything, never fall back into the bootstrap
        status.send(error=f"sandbox init failed: {type(e).__name__}: {e}")
        os._exit(1)


def _host_workdir(spec: dict[str, Any], layers: _Layers) -> str:
    """Without a private filesystem: a fresh directory under the host's /tmp (the caller removes it)."""
    path = f"/tmp/agentflow_sandbox_{os.urandom(8).hex()}"
    os.mkdir(path, 0o700)
    layers.status.send(host_workdir=path)
    if (uid := _code_uid(spec, layers)) is not None:
        os.chown(path, uid, uid)
    return path


def _build_root(spec: dict[str, Any], layers: _Layers) -> None:
    """An empty tmpfs root holding only read-only binds, /dev, /proc, /etc basics and the work dir."""
    os.umask(0o022)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in spec["binds"]}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC) for name in _DEVICES}
    size = f"size={spec['disk_bytes']},nr_inodes={spec['max_files']},mode=0755"
    _mount("tmpfs", _NEW_ROOT, "tmpfs", _MS_NOSUID | _MS_NODEV, size)
    root = _NEW_ROOT
    for path, fd in sources.items():
        target = root + path
        _make_mountpoint(target, directory=stat.S_ISDIR(os.fstat(fd).st_mode))
        _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
        _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
               | _locked_flags(os.statvfs(f"/proc/self/fd/{fd}").f_flag))
        os.close(fd)
    for link, target in spec["symlinks"]:
        os.makedirs(os.path.dirname(root + link), mode=0o755, exist_ok=True)
        os.symlink(target, root + link)
    uid = _code_uid(spec, layers)
    _build_dev(root, devices)
    _write_etc(root, uid)
    code_uid = uid if uid is not None else os.geteuid()
    os.mkdir(root + WORKDIR, 0o700)
    os.chown(root + WORKDIR, code_uid, code_uid)
    os.makedirs(root + "/tmp", exist_ok=True)  # may hold a bind already (an interpreter under /tmp)
    os.chmod(root + "/tmp", 0o1777)
    os.mkdir(root + "/proc", 0o555)
    if "pid" in layers:  # a /proc of the host's PID namespace would show the host's processes
        _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.chdir(root)
    _check("pivot_root", _libc.syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b"."))
    _check("umount2", _libc.umount2(b".", _MNT_DETACH))  # the old root, now stacked on ours
    os.chdir("/")


def _locked_flags(statvfs_flags: int) -> int:
    return sum(ms for st, ms in _KEEP_FLAGS if statvfs_flags & st)


def _make_mountpoint(path: str, *, directory: bool) -> None:
    if directory:
        os.makedirs(path, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _build_dev(root: str, devices: dict[str, int]) -> None:
    """/dev with null, zero, full, random, urandom, an empty shm and the fd symlinks."""
    os.mkdir(root + "/dev", 0o755)
    for name, fd in devices.items():
        _make_mountpoint(f"{root}/dev/{name}", directory=False)
        _mount(f"/proc/self/fd/{fd}", f"{root}/dev/{name}", None, _MS_BIND)
        _mount(None, f"{root}/dev/{name}", None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NOEXEC
               | _locked_flags(os.statvfs(f"/proc/self/fd/{fd}").f_flag))
        os.close(fd)
    os.mkdir(root + "/dev/shm", 0o777)
    os.chmod(root + "/dev/shm", 0o1777)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", root + "/dev/fd")


def _code_uid(spec: dict[str, Any], layers: _Layers) -> int | None:
    """The sandbox uid the code will run as, or None when it keeps the caller's (or namespace's) uid."""
    return spec["uid"] if spec["uid"] is not None and "uid" not in layers.missing else None


def _write_etc(root: str, uid: int | None) -> None:
    """Minimal /etc: passwd and group naming the code's uid, hosts with localhost."""
    os.makedirs(root + "/etc", mode=0o755, exist_ok=True)
    users = "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    groups = "root:x:0:\n"
    if uid is not None:
        users += f"sandbox:x:{uid}:{uid}:sandbox:{WORKDIR}:/usr/sbin/nologin\n"
        groups += f"sandbox:x:{uid}:\n"
    for name, text in (("passwd", users), ("group", groups), ("hosts", "127.0.0.1 localhost\n::1 localhost\n")):
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------
# 3. The code's process
# ---------------------------------------------------------------------------------------------

def _code_main(spec: dict[str, Any], layers: _Layers, workdir: str) -> NoReturn:
    """Drops privileges, sets limits and the filter, checks `require`, execs the interpreter."""
    status = layers.status
    try:
        _drop_privileges(spec, layers)
        for name, value in spec["rlimits"].items():
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
        layers.add("rlimits")
        _install_seccomp(spec, layers)
        status.send(layers=layers.ok, missing=layers.missing)
        if spec["require"] == "full" and layers.missing:
            status.send(refused=True)
            os._exit(126)
        os.chdir(workdir)
        env = dict(spec["env"], HOME=workdir, TMPDIR="/tmp" if workdir == WORKDIR else workdir,
                   MPLCONFIGDIR=workdir)
        python = spec["python"]
        os.execve(python, [python, "-I", "main.py"], env)
    except BaseException as e:  # noqa: BLE001
        status.send(error=f"could not start the code: {type(e).__name__}: {e}")
    os._exit(127)


def _drop_privileges(spec: dict[str, Any], layers: _Layers) -> None:
    """The sandbox uid when there is one; otherwise uid 0 keeps no capability across exec."""
    uid = _code_uid(spec, layers)
    if uid is not None:
        _drop_bounding_set()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.add("uid")
    elif os.geteuid() == 0:  # root of the host (uid switch off) or of our user namespace
        _drop_bounding_set()
        _prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT_AND_LOCKED)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    layers.add("no_new_privs")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it


def _drop_bounding_set() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(spec: dict[str, Any], layers: _Layers) -> None:
    """Loads the caller's compiled filter (no_new_privs is already set, so no privilege needed)."""
    program = spec["seccomp"]
    if program is None:
        return
    code = bytes.fromhex(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buffer))
    try:
        _check("prctl(PR_SET_SECCOMP)", _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
                                                     ctypes.addressof(fprog), 0, 0))
        layers.add("seccomp")
    except OSError as e:
        layers.miss("seccomp", f"the kernel refused the filter ({e.strerror}); enable CONFIG_SECCOMP_FILTER")


def _read_spec(fd: int) -> dict[str, Any]:
    """The spec the caller writes into the pipe once the bootstrap is in the run's cgroup."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


if __name__ == "__main__":
    # os._exit: nothing is buffered (status lines go out with os.write), and skipping the
    # interpreter's shutdown lets the caller see the end a few milliseconds sooner.
    os._exit(_bootstrap_main(_read_spec(int(sys.argv[1]))))
