"""Run untrusted Python code in a separate, contained process.

`run_python(code, ...)` writes the code into a fresh temporary directory, runs `python -I main.py`
there under a small bootstrap (`sandbox_boot.py`, a separate process), then kills every process
the code started and removes the directory. The layers (each one that is unavailable is reported
in `SandboxResult.isolation_notes`, and the tools repeat the notes in their output):

* Namespaces (Linux `unshare(2)`; directly as root, inside a new user namespace otherwise):
  - network: a new network namespace with no interface up (not even loopback): nothing connects;
  - PID: the code runs under a tiny init, PID 1 of the namespace; when init ends (code finished,
    or killed at the wall limit) the kernel kills every process left in it, daemons included;
  - mount: private tmpfs over the world-writable scratch directories (/tmp, /var/tmp, /dev/shm,
    /run/lock), so nothing written there outlives the run or reaches the host; directories the
    sandbox uid cannot traverse (e.g. /root, where pyenv keeps the interpreter) are covered by an
    empty tmpfs with only the interpreter and the working directory bound back; a fresh /proc;
  - IPC: private SysV IPC and POSIX message queues.
* A dedicated unprivileged uid (when the caller is root): each run holds its own uid from a pool
  (a flock per uid, so concurrent runs in any process never share one). The code cannot write the
  caller's files nor signal its processes, and RLIMIT_NPROC, which counts per uid, contains fork
  bombs. Without a PID namespace, every process of that uid is killed at the end (kill(-1) from a
  helper running as the uid). If the uid could not reach the interpreter (no mount namespace to
  re-expose it), `run_python` raises `SandboxError` rather than run the code as root.
* rlimits on the code: address space, CPU seconds, processes, file size, no core dumps; plus
  no_new_privs, so set-uid programs cannot regain privileges.
* Always: a new session, an environment built from scratch (no variable of the caller; minimal
  PATH; HOME and TMPDIR in the working directory), a wall-clock limit enforced with SIGKILL (code
  that ignores SIGTERM dies too), a final sweep of leftover processes, output capped per stream.

Process tree: caller -> bootstrap (caller's uid, new session; enters the namespaces, child
subreaper, enforces the wall limit, sweeps) -> init (PID 1; mounts, reaps) -> the code (sandbox
uid, rlimits, exec python). A status pipe carries exit status, errors and notes back.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

TRUNCATION_MARKER = "\n... [output truncated: more than {limit} characters]"


class SandboxError(RuntimeError):
    """The sandbox could not be set up, so the code was not run."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
      wall_timeout_s: wall-clock seconds before every process of the run is SIGKILLed.
      cpu_time_s: CPU seconds of the code (RLIMIT_CPU); None means the wall limit, rounded up.
      memory_bytes: address-space limit of each process (RLIMIT_AS).
      max_processes: processes/threads the sandbox uid may have (RLIMIT_NPROC).
      max_file_bytes: largest file the code may write (RLIMIT_FSIZE).
      max_output_chars: stdout and stderr are each cut to this many characters.
    """

    wall_timeout_s: float = 10.0
    cpu_time_s: float | None = None
    memory_bytes: int = 2 * 1024**3
    max_processes: int = 32
    max_file_bytes: int = 16 * 1024**2
    max_output_chars: int = 8000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    Attributes:
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), truncated with a marker.
      exit_code: the interpreter's exit status, or None when it was killed by a signal.
      timed_out: True when the wall limit was reached.
      killed_reason: why the code was stopped ("wall time limit ...", "CPU time limit ...",
        "killed by signal ..."), or None when it exited by itself.
      isolation_notes: every way in which this run was less isolated than the full design
        (empty when all layers were active).
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_reason: str | None
    isolation_notes: tuple[str, ...]


def run_python(code: str, *,
               wall_timeout_s: float = SandboxLimits.wall_timeout_s,
               cpu_time_s: float | None = SandboxLimits.cpu_time_s,
               memory_bytes: int = SandboxLimits.memory_bytes,
               max_processes: int = SandboxLimits.max_processes,
               max_file_bytes: int = SandboxLimits.max_file_bytes,
               max_output_chars: int = SandboxLimits.max_output_chars,
               use_namespaces: bool = True,
               switch_user: bool = True) -> SandboxResult:
    """Runs `code` with `python -I` in a fresh temporary directory under the limits given.

    `use_namespaces=False` / `switch_user=False` turn those layers off (for tests of the weaker
    fallbacks, or hosts where they misbehave); what was off is listed in `isolation_notes`.
    Thread-safe; never leaves a process of the run alive.
    """
    limits = SandboxLimits(wall_timeout_s, cpu_time_s, memory_bytes, max_processes, max_file_bytes,
                           max_output_chars)
    return _Run(code, limits, use_namespaces=use_namespaces, switch_user=switch_user).execute()


def run_python_with_limits(code: str, limits: SandboxLimits, **options: bool) -> SandboxResult:
    """`run_python` with the limits given as one `SandboxLimits` value."""
    return run_python(code, **dataclasses.asdict(limits), **options)


def format_notes(notes: Sequence[str]) -> str:
    """Isolation notes as a short paragraph for tool output ("" when fully isolated)."""
    if not notes:
        return ""
    return "Sandbox isolation was weaker than designed: " + "; ".join(notes) + "."


# ---------------------------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------------------------

_BOOT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_UID_BASE, _UID_SLOTS = 1_900_000_000, 256
_BACKSTOP_GRACE_S = 5.0


class _Run:
    """One sandboxed execution, from temp dir creation to cleanup."""

    def __init__(self, code: str, limits: SandboxLimits, *, use_namespaces: bool, switch_user: bool):
        self.code = code
        self.limits = limits
        self.use_namespaces = use_namespaces
        self.switch_user = switch_user and os.geteuid() == 0
        cpu = limits.cpu_time_s if limits.cpu_time_s is not None else limits.wall_timeout_s
        self.cpu_limit_s = max(1, math.ceil(cpu))
        self.notes: list[str] = []
        if switch_user and os.geteuid() != 0:
            self.notes.append("not started as root, so the code runs as the caller's uid "
                              "(it can write the caller's files; the process limit is shared)")
        elif not switch_user:
            who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
            self.notes.append(f"uid switch disabled: the code runs as the caller ({who}) and can write "
                              "the caller's files")

    def execute(self) -> SandboxResult:
        workdir = tempfile.mkdtemp(prefix="agentflow_sandbox_")
        uid_lock = None
        try:
            if self.switch_user:
                uid_lock = _UidLock.claim()
            uid = uid_lock.uid if uid_lock else None
            self._prepare_workdir(workdir, uid)
            return self._spawn_and_collect(workdir, uid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if uid_lock:
                uid_lock.release()

    def _prepare_workdir(self, workdir: str, uid: int | None) -> None:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(self.code)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            os.chmod(script, 0o644)

    def _spawn_and_collect(self, workdir: str, uid: int | None) -> SandboxResult:
        spec = self._boot_spec(workdir, uid)
        status_r, status_w = os.pipe()
        spec["status_fd"] = status_w
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT_SCRIPT, json.dumps(spec)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=_sandbox_env(workdir), cwd=workdir, start_new_session=True,
                pass_fds=(status_w,), close_fds=True)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        cap = self.limits.max_output_chars
        readers = [_CappedReader(proc.stdout, cap), _CappedReader(proc.stderr, cap)]
        backstop = self.limits.wall_timeout_s + _BACKSTOP_GRACE_S
        try:
            proc.wait(timeout=backstop)
        except subprocess.TimeoutExpired:
            self.notes.append(f"the bootstrap did not finish within {backstop:g} s and was killed")
            _kill_group_and_uid(proc, uid)
        for reader in readers:
            reader.join(timeout=2.0)
        if uid is not None:
            _kill_uid_from_proc_scan(uid)  # belt and braces; normally nothing is left
        status = _read_status(status_r)
        return self._result(readers, status)

    def _boot_spec(self, workdir: str, uid: int | None) -> dict[str, Any]:
        limits = self.limits
        needed = [workdir, *_interpreter_dirs()]
        return {
            "workdir": workdir,
            "python": sys.executable,
            "uid": uid,
            "use_namespaces": self.use_namespaces,
            "wall_timeout_s": limits.wall_timeout_s,
            "rlimits": {
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_CPU": self.cpu_limit_s,
                "RLIMIT_NPROC": limits.max_processes,
                "RLIMIT_FSIZE": limits.max_file_bytes,
                "RLIMIT_CORE": 0,
            },
            "scratch_covers": [d for d in _SCRATCH_DIRS if _is_world_writable_dir(d)],
            "hidden_covers": _blocking_ancestors(needed) if uid is not None else [],
            "keep": needed,
            "env": _sandbox_env(workdir),
        }

    def _result(self, readers: list["_CappedReader"], status: dict[str, Any]) -> SandboxResult:
        if "error" in status:
            raise SandboxError(status["error"])
        notes = self.notes + status.get("notes", [])
        timed_out = bool(status.get("timed_out"))
        exit_info = status.get("exit") or {}
        exit_code = exit_info.get("code")
        killed_reason = None
        if timed_out:
            killed_reason = f"wall time limit of {self.limits.wall_timeout_s:g} s reached"
            exit_code = None
        elif "signal" in exit_info:
            killed_reason = _describe_signal(exit_info["signal"], self.cpu_limit_s)
        elif not exit_info:
            raise SandboxError(f"the sandbox bootstrap failed before the code ran: {readers[1].text()[-1000:]}")
        return SandboxResult(readers[0].text(), readers[1].text(), exit_code, timed_out, killed_reason,
                             tuple(dict.fromkeys(notes)))


def _describe_signal(signum: int, cpu_limit_s: int) -> str:
    if signum == signal.SIGXCPU:
        return f"CPU time limit of {cpu_limit_s} s reached (SIGXCPU)"
    try:
        return f"killed by signal {signal.Signals(signum).name}"
    except ValueError:
        return f"killed by signal {signum}"


def _sandbox_env(workdir: str) -> dict[str, str]:
    """The whole environment of the sandboxed code: nothing is inherited from the caller."""
    return {
        "PATH": _SANDBOX_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _interpreter_dirs() -> list[str]:
    """Directories the sandboxed interpreter must be able to read (prefixes, executable dir)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.realpath(sys.executable)))
    dirs.add(os.path.dirname(os.path.abspath(sys.executable)))
    return _outermost(sorted(dirs))


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drops every path that lies inside another path of the list."""
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def _blocking_ancestors(paths: Sequence[str]) -> list[str]:
    """For each path, its highest ancestor that other users cannot traverse (o-x), if any."""
    blocked = []
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.append(ancestor)
                break
    return _outermost(blocked)


def _is_world_writable_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_IWOTH)


class _CappedReader:
    """Drains a pipe on a thread, keeping the first `max_chars` characters' worth of bytes."""

    def __init__(self, pipe, max_chars: int):
        self._pipe = pipe
        self._max_chars = max_chars
        self._keep_bytes = 4 * max_chars + 4
        self._chunks: list[bytes] = []
        self._kept = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with self._pipe:
            while chunk := self._pipe.read1(65536):
                room = self._keep_bytes - self._kept
                if room > 0:
                    self._chunks.append(chunk[:room])
                    self._kept += min(room, len(chunk))
                self._dropped += max(0, len(chunk) - max(room, 0))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        if len(text) > self._max_chars or self._dropped:
            return text[:self._max_chars] + TRUNCATION_MARKER.format(limit=self._max_chars)
        return text


def _read_status(fd: int) -> dict[str, Any]:
    """Merges the JSON lines the bootstrap processes wrote to the status pipe."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    status: dict[str, Any] = {"notes": []}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        status["notes"] += record.pop("notes", [])
        status.update(record)
    return status


class _UidLock:
    """A uid from a pool, held exclusively (flock) for the duration of one run, across processes."""

    _DIR = os.path.join(tempfile.gettempdir(), "agentflow_sandbox_uids")

    def __init__(self, uid: int, fd: int):
        self.uid = uid
        self._fd = fd

    @classmethod
    def claim(cls) -> "_UidLock":
        os.makedirs(cls._DIR, mode=0o700, exist_ok=True)
        start = random.randrange(_UID_SLOTS)
        for i in range(_UID_SLOTS):
            slot = (start + i) % _UID_SLOTS
            fd = os.open(os.path.join(cls._DIR, str(slot)), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(_UID_BASE + slot, fd)
        raise RuntimeError(f"all {_UID_SLOTS} sandbox uids are in use; run fewer sandboxes at once")

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


def _kill_group_and_uid(proc: subprocess.Popen, uid: int | None) -> None:
    """Last resort when the bootstrap hangs: SIGKILL its process group, then the sandbox uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so its pgid is still ours
    except ProcessLookupError:
        pass
    proc.wait()
    if uid is not None:
        _kill_uid_from_proc_scan(uid)


def _kill_uid_from_proc_scan(uid: int, rounds: int = 50) -> None:
    """SIGKILLs every process whose real uid is `uid`, rescanning /proc until none is left."""
    for _ in range(rounds):
        victims = [pid for pid in _pids() if _real_uid(pid) == uid]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
