"""The sandbox bootstrap: run by `sandbox.run_python` as `python -I -S sandbox_boot.py SPEC_JSON`.

It runs as the caller (root when possible) in a new session and is never imported by the package:
standard library only. Its job, in order (see `sandbox` for the design):

1. enter new PID, network and IPC namespaces (inside a new user namespace when not root) and
   become a child subreaper;
2. fork init, which enters a mount namespace, makes the scratch directories private, hides the
   directories the sandbox uid cannot traverse (re-exposing the interpreter and the working
   directory), mounts a fresh /proc, then forks the code's process and reaps until it ends;
3. the code's process drops to the sandbox uid, sets no_new_privs, the parent-death signal and the
   rlimits, and execs `python -I main.py` with the clean environment;
4. wait for init up to the wall limit, SIGKILL it at the limit, then sweep every leftover process.

Exit information, errors and isolation notes go to the caller as JSON lines on the status pipe.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
from typing import Any, Sequence

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_SECUREBITS, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 28, 36, 38
_SECBIT_NOROOT_AND_LOCK = 0x3
# The bootstrap enters these itself (PID applies to its children); init then enters "mount", so
# that the bootstrap keeps the host's /proc while init mounts the namespace's own.
_BOOTSTRAP_NAMESPACES = (("pid", _CLONE_NEWPID), ("network", _CLONE_NEWNET), ("ipc", _CLONE_NEWIPC))
_INIT_NAMESPACES = (("mount", _CLONE_NEWNS),)
_MISSING_NAMESPACE_NOTES = {
    "network": "no network namespace: the code can open network connections",
    "pid": "no PID namespace: leftover processes are killed by a uid/descendant sweep instead",
    "mount": "no mount namespace: /tmp and other shared scratch directories are writable by the code",
    "ipc": "no IPC namespace: SysV IPC objects are shared with the host",
}

_libc = ctypes.CDLL(None, use_errno=True)


class _Status:
    """Writes JSON lines to the status pipe (shared by bootstrap, init and the pre-exec child)."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_inheritable(fd, False)  # the user's code must not inherit it

    def send(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def _libc_call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _bootstrap_main(spec: dict[str, Any]) -> int:
    status = _Status(spec["status_fd"])
    namespaces = _enter_bootstrap_namespaces(status) if spec["use_namespaces"] else set()
    if not spec["use_namespaces"]:
        status.send(notes=["namespaces disabled: network, PID and mount isolation are off"])
    _libc_call("prctl", _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    init_pid = os.fork()
    if init_pid == 0:
        _init_main(spec, namespaces, status)
    finished = _wait_for(init_pid, spec["wall_timeout_s"])
    if not finished:
        status.send(timed_out=True)
        os.kill(init_pid, signal.SIGKILL)  # not reaped yet, so the pid is still init's
    _sweep(spec, namespaces, status)
    return 0


def _enter_bootstrap_namespaces(status: _Status) -> set[str]:
    """Enters a user namespace first when not root (it grants the rights for the others)."""
    entered: set[str] = set()
    if os.geteuid() != 0:
        try:
            _enter_user_namespace()
            entered.add("user")
        except OSError as e:
            status.send(notes=[f"no user namespace ({e.strerror}), so no other namespace either"])
    return entered | _enter_namespaces(_BOOTSTRAP_NAMESPACES, status)


def _enter_namespaces(namespaces: Sequence[tuple[str, int]], status: _Status) -> set[str]:
    """Unshares each namespace that works here; notes the ones that do not."""
    entered: set[str] = set()
    for name, flag in namespaces:
        try:
            _libc_call("unshare", flag)
            entered.add(name)
        except OSError:
            status.send(notes=[_MISSING_NAMESPACE_NOTES[name]])
    return entered


def _check_uid_reachable(spec: dict[str, Any], namespaces: set[str], status: _Status) -> None:
    """Refuses to run (rather than run as root) when the sandbox uid cannot reach the interpreter."""
    if spec["uid"] is None or "mount" in namespaces or not spec["hidden_covers"]:
        return
    status.send(error=f"the sandbox uid cannot traverse {spec['hidden_covers']} to reach the Python "
                      "interpreter and there is no mount namespace to re-expose it; make those "
                      "directories traversable by others (chmod o+x), enable mount namespaces, or pass "
                      "switch_user=False to accept running the code as the caller")
    os._exit(1)


def _enter_user_namespace() -> None:
    """Becomes root of a new user namespace that maps only the caller's own uid and gid."""
    uid, gid = os.geteuid(), os.getegid()
    _libc_call("unshare", _CLONE_NEWUSER)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def _wait_for(pid: int, timeout_s: float) -> bool:
    """Reaps children until child `pid` has exited (True) or `timeout_s` passed (False)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while time.monotonic() < deadline:
        reaped = _reap_exited()
        if reaped is None or pid in reaped:
            return True
        time.sleep(delay)
        delay = min(0.02, delay * 2)
    return False


def _reap_exited() -> list[int] | None:
    """Reaps every exited child; returns their pids, or None when there are no children at all."""
    reaped = []
    try:
        while (pid := os.waitpid(-1, os.WNOHANG)[0]):
            reaped.append(pid)
    except ChildProcessError:
        return reaped or None
    return reaped


def _sweep(spec: dict[str, Any], namespaces: set[str], status: _Status) -> None:
    """Kills every process the code left behind and reaps them.

    With a PID namespace the kernel already killed everything when init exited (and a dead
    namespace accepts no new process, so no helper could be forked into it). Otherwise every
    process of the sandbox uid is killed, then the orphans that were re-parented to us.
    """
    if spec["uid"] is not None and "pid" not in namespaces:
        _kill_all_of_uid(spec["uid"])
    for _ in range(200):
        children = _own_children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
        _reap_exited()
    else:
        status.send(notes=["some leftover processes could not be killed"])
    _reap_exited()


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
    """Pids of this process's children (orphans land here: the bootstrap is a subreaper)."""
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def _init_main(spec: dict[str, Any], namespaces: set[str], status: _Status) -> None:
    """PID 1 of the sandbox: prepares the filesystem, starts the code, reports how it ended."""
    try:
        if spec["use_namespaces"]:
            namespaces = namespaces | _enter_namespaces(_INIT_NAMESPACES, status)
        if "mount" in namespaces:
            try:
                _prepare_filesystem(spec, namespaces, status)
            except OSError as e:
                status.send(notes=[f"private mounts failed ({e}); shared scratch directories stay writable"])
                namespaces = namespaces - {"mount"}
        _check_uid_reachable(spec, namespaces, status)
        code_pid = os.fork()
        if code_pid == 0:
            _exec_code(spec, namespaces, status)
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


def _prepare_filesystem(spec: dict[str, Any], namespaces: set[str], status: _Status) -> None:
    """Private scratch dirs, hidden non-traversable dirs, the needed paths re-exposed, fresh /proc."""
    _libc_call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    keep = spec["keep"]
    for cover in spec["scratch_covers"]:
        _cover_with_tmpfs(cover, "mode=1777,size=64m", keep)
    for cover in spec["hidden_covers"]:
        _cover_with_tmpfs(cover, "mode=0755,size=1m", keep)
    if "pid" in namespaces:
        try:
            _libc_call("mount", b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        except OSError as e:
            status.send(notes=[f"could not mount a private /proc ({e.strerror}); host processes are visible"])


def _cover_with_tmpfs(target: str, options: str, keep: Sequence[str]) -> None:
    """Mounts an empty tmpfs on `target`, then bind-mounts back each kept path that lies under it."""
    inside = [p for p in keep if p.startswith(target.rstrip("/") + "/")]
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inside}
    _libc_call("mount", b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode())
    for path, fd in fds.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _libc_call("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
        os.close(fd)


def _exec_code(spec: dict[str, Any], namespaces: set[str], status: _Status) -> None:
    """Drops privileges, applies the rlimits and execs the interpreter on main.py (never returns)."""
    try:
        uid = spec["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        elif "user" in namespaces:
            _libc_call("prctl", _PR_SET_SECUREBITS, _SECBIT_NOROOT_AND_LOCK, 0, 0, 0)
        _libc_call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        for name, value in spec["rlimits"].items():
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
        os.chdir(spec["workdir"])
        python = spec["python"]
        os.execve(python, [python, "-I", "main.py"], spec["env"])
    except BaseException as e:  # noqa: BLE001
        status.send(error=f"could not start the code: {type(e).__name__}: {e}")
    os._exit(127)


if __name__ == "__main__":
    sys.exit(_bootstrap_main(json.loads(sys.argv[1])))
