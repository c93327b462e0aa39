"""Run untrusted Python code in a separate, contained process.

`run_python(code, ...)` runs `python -I main.py` under a small bootstrap (`sandbox_boot.py`, a
separate process started with vfork+exec, never a fork of the caller) and returns what it printed.
The layers, each named as it appears in reports:

* filesystem: a mount namespace whose root is an empty tmpfs (size `disk_bytes`, `max_files`
  inodes) holding only read-only binds of /usr (with the /lib, /bin symlinks), the interpreter's
  prefixes and /etc/ld.so.cache; a fresh /proc; a /dev with null, zero, full, random, urandom; a
  small /etc (passwd, group, hosts); the writable work directory /sandbox, /tmp and /dev/shm.
  Nothing else of the host exists inside (no /run, /home, /root, the host's /tmp, the project),
  so no host file and no Unix socket bound at a host path can be reached. pivot_root, then the
  old root is detached.
* pid: a PID namespace under a tiny init; when init ends (code finished, wall limit, OOM) the
  kernel kills every process left in it, daemons included. The caller's processes have no pid
  inside, so they can be neither signalled nor inspected through /proc.
* network: a network namespace with no interface up: no connection, no abstract Unix socket.
* ipc: private SysV IPC and POSIX message queues.
* uid: when the caller is root, each run has its own unprivileged uid from a pool (a flock per
  uid, so concurrent runs never share one); the code keeps no capability.
* cgroup: a cgroup of the run's own (v2, or v1 memory + pids) limits memory (`memory_bytes`,
  tmpfs files included) and tasks (`max_processes`, threads included) over all its processes; at
  the first OOM kill the whole run is stopped and the result says so.
* seccomp: a filter (`sandbox_seccomp`) refusing ptrace, mount, unshare/setns and clone with new
  namespaces, keyctl, bpf, perf_event_open, io_uring, module loading, ...
* no_new_privs and rlimits: address space per process (`memory_bytes`), CPU seconds, processes
  of the uid, file size, open files, no core dumps; hard limits equal soft ones, so the code
  cannot raise them.
Always: a new session, an environment built from scratch, a wall-clock limit enforced with
SIGKILL, a sweep of leftover processes, output capped per stream.

`require` says what a run needs: "full" refuses to run the code unless every layer is in force
(SandboxError, one line naming each missing layer and what to install or allow), "best_effort"
runs with the layers this host allows and lists the missing ones, with what each exposes, in
`isolation_notes`, "none" does the same without warnings. `isolation_report()` probes the host
once per process and returns the JSON-able report to log and keep in a run's metadata.

Process tree: caller -> bootstrap (caller's uid, new session, moved into the run's cgroup by the
caller while its interpreter starts; enters the namespaces, subreaper, enforces the wall limit,
sweeps) -> init (PID 1; mounts, reaps) -> the code (sandbox uid, limits, seccomp, exec python).
The spec goes in through a pipe; a status pipe carries layers, exit status and errors back.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from agentflow_jax.errors import UserError
from agentflow_jax.tools import sandbox_cgroups, sandbox_seccomp

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

TRUNCATION_MARKER = "\n... [output truncated: more than {limit} characters]"
REQUIRE_LEVELS = ("full", "best_effort", "none")
LAYERS = ("filesystem", "pid", "network", "ipc", "uid", "cgroup", "seccomp", "no_new_privs", "rlimits")
# What the code can do when a layer is missing (said wherever a missing layer is reported).
EXPOSURES = {
    "filesystem": "the code can read every host file its uid may read (write where its uid may) and "
                  "connect to Unix sockets bound at host paths",
    "pid": "the code can see the host's processes in /proc and signal those of its uid",
    "network": "the code can open network connections and reach abstract Unix sockets",
    "ipc": "SysV IPC objects and POSIX message queues are shared with the host",
    "uid": "the code runs as the caller's uid: it shares that user's per-user kernel limits, and "
           "without the filesystem layer it can read and write the caller's files",
    "cgroup": "memory and process count are limited per process only, not over the whole run",
    "seccomp": "ptrace, mount, unshare, keyctl, bpf, perf_event_open and similar calls are not filtered",
    "no_new_privs": "set-uid programs could regain privileges",
    "rlimits": "no per-process limits on CPU time, address space, file size or open files",
}


class SandboxError(UserError, RuntimeError):
    """The sandbox could not be set up, or refused to run at the required isolation level."""


def _check_positive(owner: str, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
      wall_timeout_s: wall-clock seconds before every process of the run is SIGKILLed.
      cpu_time_s: CPU seconds of each process (RLIMIT_CPU); None means the wall limit, rounded up.
      memory_bytes: memory of the whole run, all processes and its tmpfs files together (cgroup);
        also the address-space limit of each process (RLIMIT_AS).
      max_processes: processes and threads of the whole run (cgroup pids.max; RLIMIT_NPROC too).
      max_file_bytes: largest file the code may write (RLIMIT_FSIZE).
      max_output_chars: stdout and stderr are each cut to this many characters.
      disk_bytes: size of the run's writable tmpfs (/sandbox, /tmp, /dev/shm together).
      max_files: inodes of that tmpfs (files, directories and links together).
      max_open_files: open file descriptors per process (RLIMIT_NOFILE).
    """

    wall_timeout_s: float = 10.0
    cpu_time_s: float | None = None
    memory_bytes: int = 2 * 1024**3
    max_processes: int = 32
    max_file_bytes: int = 16 * 1024**2
    max_output_chars: int = 8000
    disk_bytes: int = 64 * 1024**2
    max_files: int = 4096
    max_open_files: int = 256

    def __post_init__(self):
        for name in ("wall_timeout_s", "cpu_time_s"):
            if getattr(self, name) is not None or name == "wall_timeout_s":
                _check_positive("SandboxLimits", name, getattr(self, name), (int, float))
        for name in ("memory_bytes", "max_processes", "max_file_bytes", "max_output_chars",
                     "disk_bytes", "max_files", "max_open_files"):
            _check_positive("SandboxLimits", name, getattr(self, name), int)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    Attributes:
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), truncated with a marker.
      exit_code: the interpreter's exit status, or None when it was killed by a signal.
      timed_out: True when the wall limit was reached.
      killed_reason: why the code was stopped ("wall time limit ...", "memory limit of the run
        ...", "CPU time limit ...", "killed by signal ..."), or None when it exited by itself.
      isolation_notes: each layer that was missing, why, and what that exposes (empty when all
        layers were in force).
      isolation: the layers in force for this run (names from `LAYERS`).
      limit_events: run-wide limits the code ran into without being stopped (e.g. the process
        limit refusing forks).
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_reason: str | None
    isolation_notes: tuple[str, ...]
    isolation: tuple[str, ...] = ()
    limit_events: tuple[str, ...] = ()


def run_python(code: str, *,
               wall_timeout_s: float = SandboxLimits.wall_timeout_s,
               cpu_time_s: float | None = SandboxLimits.cpu_time_s,
               memory_bytes: int = SandboxLimits.memory_bytes,
               max_processes: int = SandboxLimits.max_processes,
               max_file_bytes: int = SandboxLimits.max_file_bytes,
               max_output_chars: int = SandboxLimits.max_output_chars,
               disk_bytes: int = SandboxLimits.disk_bytes,
               max_files: int = SandboxLimits.max_files,
               max_open_files: int = SandboxLimits.max_open_files,
               require: str = "full",
               use_namespaces: bool = True,
               switch_user: bool = True) -> SandboxResult:
    """Runs `code` with `python -I` in a fresh, empty filesystem under the limits given.

    `require` is "full", "best_effort" or "none" (see the module docstring). `use_namespaces=False`
    turns off the filesystem, pid, network and ipc layers (the code then sees the host's files
    and network); `switch_user=False` runs the code as the caller's uid (without capabilities).
    Both are for hosts where those layers misbehave, need require="best_effort" or "none", and
    are listed in `isolation_notes`. Thread-safe; never leaves a process of the run alive.
    Raises SandboxError when the sandbox cannot start or `require` is not met.
    """
    limits = SandboxLimits(wall_timeout_s, cpu_time_s, memory_bytes, max_processes, max_file_bytes,
                           max_output_chars, disk_bytes, max_files, max_open_files)
    return _Run(code, limits, _Options.make(require, use_namespaces, switch_user)).execute()


def run_python_with_limits(code: str, limits: SandboxLimits, **options: Any) -> SandboxResult:
    """`run_python` with the limits given as one `SandboxLimits` value (options: require, ...)."""
    return run_python(code, **dataclasses.asdict(limits), **options)


def format_notes(notes: Sequence[str]) -> str:
    """Isolation notes as a short paragraph for tool output ("" when fully isolated)."""
    if not notes:
        return ""
    return "Sandbox isolation was weaker than designed: " + "; ".join(notes) + "."


def isolation_report(require: str = "full", *, use_namespaces: bool = True,
                     switch_user: bool = True) -> dict[str, Any]:
    """What isolation the sandbox gets on this host, for logs and a run's metadata (JSON-able).

    Probes once per process and option set (one trivial sandboxed run). Returns
    `{"require": str, "satisfied": bool, "in_force": [layer, ...], "missing": {layer: reason},
    "exposed": {layer: what the code can do}, "summary": str}`; "satisfied" is False only when
    require="full" and a layer is missing. Never raises for a missing layer.
    """
    options = _Options.make(require, use_namespaces, switch_user, check_full=False)
    in_force, missing = _probe(options.use_namespaces, options.switch_user)
    if options.require == "full":
        missing = {**missing, **options.conflicts()}
    satisfied = options.require != "full" or not missing
    if not missing:
        summary = "sandbox isolation: full (" + ", ".join(in_force) + ")"
    else:
        summary = (f"sandbox isolation (require={options.require!r}): missing " + "; ".join(
            f"{layer} ({reason}; exposes: {EXPOSURES[layer]})" for layer, reason in missing.items())
            + "; in force: " + (", ".join(in_force) or "nothing"))
    return {"require": options.require, "satisfied": satisfied, "in_force": list(in_force),
            "missing": dict(missing), "exposed": {k: EXPOSURES[k] for k in missing}, "summary": summary}


def check_isolation(require: str = "full", *, use_namespaces: bool = True,
                    switch_user: bool = True) -> dict[str, Any]:
    """`isolation_report`, logged once per process (WARNING when a layer is missing, else INFO).

    Raises SandboxError (one line: each missing layer and what to install or allow) when
    require="full" and the host lacks a layer. Tools call this when they start.
    """
    report = isolation_report(require, use_namespaces=use_namespaces, switch_user=switch_user)
    if not report["satisfied"]:
        raise SandboxError(_refusal_message(report["missing"]))
    _log_once(report)
    return report


# ---------------------------------------------------------------------------------------------
# Options, probe and logging
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    require: str
    use_namespaces: bool
    switch_user: bool

    @classmethod
    def make(cls, require: str, use_namespaces: bool, switch_user: bool, *,
             check_full: bool = True) -> "_Options":
        if require not in REQUIRE_LEVELS:
            raise ValueError(f"require must be one of {', '.join(map(repr, REQUIRE_LEVELS))}; got {require!r}")
        for name, value in (("use_namespaces", use_namespaces), ("switch_user", switch_user)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        options = cls(require, use_namespaces, switch_user)
        if check_full and require == "full" and (conflicts := options.conflicts()):
            raise SandboxError(_refusal_message(conflicts))
        return options

    def conflicts(self) -> dict[str, str]:
        """Layers that the options themselves turn off."""
        off: dict[str, str] = {}
        if not self.use_namespaces:
            off.update({k: "turned off by use_namespaces=False" for k in ("filesystem", "pid", "network", "ipc")})
        if not self.switch_user:
            off["uid"] = "turned off by switch_user=False"
        return off


def _refusal_message(missing: dict[str, str]) -> str:
    return ("Python sandbox refused to run: require='full' but this host lacks " + "; ".join(
        f"{layer} ({reason})" for layer, reason in missing.items())
        + ". Fix that, or set require='best_effort' to run without it, which means: " + "; ".join(
        f"{layer}: {EXPOSURES[layer]}" for layer in missing) + ".")


_probe_lock = threading.Lock()
_probe_cache: dict[tuple[bool, bool], tuple[tuple[str, ...], dict[str, str]]] = {}
_logged: set[str] = set()


def _probe(use_namespaces: bool, switch_user: bool) -> tuple[tuple[str, ...], dict[str, str]]:
    """(layers in force, {missing layer: reason}) from one trivial run; cached per process."""
    key = (use_namespaces, switch_user)
    with _probe_lock:
        if key not in _probe_cache:
            run = _Run("pass", SandboxLimits(wall_timeout_s=30.0, max_output_chars=2000),
                       _Options("none", use_namespaces, switch_user))
            try:
                run.execute()
                _probe_cache[key] = (tuple(run.layers), dict(run.missing))
            except SandboxError as e:
                _probe_cache[key] = ((), {layer: f"the sandbox did not start: {e}" for layer in LAYERS})
        return _probe_cache[key]


def _log_once(report: dict[str, Any]) -> None:
    with _probe_lock:
        if report["summary"] in _logged:
            return
        _logged.add(report["summary"])
    level = logging.WARNING if report["missing"] and report["require"] != "none" else logging.INFO
    _log.log(level, "%s", report["summary"])


# ---------------------------------------------------------------------------------------------
# Caller side of one run
# ---------------------------------------------------------------------------------------------

_BOOT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_UID_BASE, _UID_SLOTS = 1_900_000_000, 256
_BACKSTOP_GRACE_S = 5.0
_DRAIN_AFTER_EXIT_S = 1.0
_run_numbers = itertools.count()


class _Run:
    """One sandboxed execution: cgroup and uid, the bootstrap, output collection, cleanup."""

    def __init__(self, code: str, limits: SandboxLimits, options: _Options):
        self.code = code
        self.limits = limits
        self.options = options
        cpu = limits.cpu_time_s if limits.cpu_time_s is not None else limits.wall_timeout_s
        self.cpu_limit_s = max(1, math.ceil(cpu))
        self.layers: list[str] = []
        self.missing: dict[str, str] = dict(options.conflicts())
        self.notes: list[str] = []

    def execute(self) -> SandboxResult:
        uid_lock = cgroup = None
        try:
            if self.options.switch_user and os.geteuid() == 0:
                uid_lock = _UidLock.claim()
            elif self.options.switch_user:
                self.missing["uid"] = (f"not running as root, so the code runs as the caller's uid "
                                       f"{os.geteuid()}; run as root for a separate uid per run")
            cgroup = self._make_cgroup()
            spec = self._spec(uid_lock.uid if uid_lock else None, cgroup)
            return self._spawn_and_collect(spec, cgroup)
        finally:
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            if uid_lock:
                if "pid" not in self.layers and cgroup is None:
                    _kill_uid_from_proc_scan(uid_lock.uid)  # nothing else contains this run's processes
                uid_lock.release()

    def _make_cgroup(self) -> sandbox_cgroups.RunCgroup | None:
        reason = sandbox_cgroups.availability()
        if reason is None:
            try:
                return sandbox_cgroups.RunCgroup.create(str(next(_run_numbers)), self.limits.memory_bytes,
                                                        self.limits.max_processes)
            except OSError as e:
                reason = f"could not create the run's cgroup ({e}); run as root with cgroups writable"
        self.missing["cgroup"] = reason
        return None

    def _spec(self, uid: int | None, cgroup: sandbox_cgroups.RunCgroup | None) -> dict[str, Any]:
        limits = self.limits
        host = _host_layout()
        try:
            seccomp = sandbox_seccomp.filter_program().hex()
        except sandbox_seccomp.SeccompUnavailable as e:
            seccomp = None
            self.missing["seccomp"] = str(e)
        cgroup_spec = None
        if cgroup is not None:
            cgroup_spec = {"oom_control": cgroup.oom_control,
                           "event_control": os.path.join(cgroup.memory_dir, "cgroup.event_control")}
        return {
            "code": self.code,
            "python": sys.executable,
            "require": self.options.require,
            "use_namespaces": self.options.use_namespaces,
            "uid": uid,
            "uid_blocked_by": host["blocking"] if uid is not None else [],
            "missing": self.missing,
            "wall_timeout_s": limits.wall_timeout_s,
            "disk_bytes": limits.disk_bytes,
            "max_files": limits.max_files,
            "rlimits": {
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_CPU": self.cpu_limit_s,
                # With a cgroup, pids.max binds first (and counts refusals); this is the backstop.
                "RLIMIT_NPROC": limits.max_processes + (1 if cgroup is not None else 0),
                "RLIMIT_FSIZE": limits.max_file_bytes,
                "RLIMIT_NOFILE": limits.max_open_files,
                "RLIMIT_CORE": 0,
            },
            "binds": host["binds"],
            "symlinks": host["symlinks"],
            "cgroup": cgroup_spec,
            "seccomp": seccomp,
            "env": _SANDBOX_ENV,
        }

    def _spawn_and_collect(self, spec: dict[str, Any], cgroup: sandbox_cgroups.RunCgroup | None) -> SandboxResult:
        spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        spec["status_fd"] = status_w
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT_SCRIPT, str(spec_r)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": _SANDBOX_PATH}, cwd="/", start_new_session=True,
                pass_fds=(spec_r, status_w), close_fds=True)
        except BaseException:
            os.close(status_r)
            os.close(spec_w)
            raise
        finally:
            os.close(status_w)
            os.close(spec_r)
        # The bootstrap waits for its spec; meanwhile (its interpreter is starting) move it into the
        # run's cgroup, so that everything it forks is born inside (a cgroup v1 move waits for an RCU
        # grace period, which this hides).
        if cgroup is not None and not self._move_into(cgroup, proc.pid):
            spec["cgroup"] = None
        try:
            with open(spec_w, "wb", closefd=True) as f:
                f.write(json.dumps(spec).encode())
        except BrokenPipeError:
            pass  # the bootstrap died before reading; the status says why
        cap = self.limits.max_output_chars
        stdout, stderr, status_buffer = _CappedBuffer(cap), _CappedBuffer(cap), _CappedBuffer(1 << 20)
        streams = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr, status_r: status_buffer}
        try:
            finished = _collect(proc, streams, self.limits.wall_timeout_s + _BACKSTOP_GRACE_S)
        finally:
            proc.stdout.close()
            proc.stderr.close()
            os.close(status_r)
        if not finished:
            self.notes.append("the bootstrap did not finish in time and was killed")
            _kill_group(proc)
            if cgroup is not None:
                cgroup.kill_all()
        status = _parse_status(status_buffer.data())
        if workdir := status.get("host_workdir"):
            shutil.rmtree(workdir, ignore_errors=True)
        events = cgroup.limits_hit() if cgroup is not None else {}
        return self._result(stdout.text(), stderr.text(), status, events)

    def _move_into(self, cgroup: sandbox_cgroups.RunCgroup, pid: int) -> bool:
        try:
            cgroup.add(pid)
            return True
        except OSError as e:
            self.missing["cgroup"] = f"could not move the run into its cgroup ({e.strerror}); run as root"
            return False

    def _result(self, stdout: str, stderr: str, status: dict[str, Any], events: dict[str, int]) -> SandboxResult:
        if "error" in status:
            raise SandboxError(status["error"])
        self.layers = [layer for layer in LAYERS if layer in status.get("layers", [])]
        self.missing.update(status.get("missing", {}))
        if status.get("refused"):
            raise SandboxError(_refusal_message(self.missing))
        exit_info = status.get("exit") or {}
        exit_code = exit_info.get("code")
        memory_mib = self.limits.memory_bytes / 2**20
        oom = status.get("oom") or (events.get("oom_kill") and exit_info.get("signal", signal.SIGKILL) == signal.SIGKILL
                                    and "code" not in exit_info)
        if status.get("timed_out"):
            killed_reason, exit_code = f"wall time limit of {self.limits.wall_timeout_s:g} s reached", None
        elif oom:
            killed_reason, exit_code = (f"memory limit of the run ({memory_mib:g} MiB over all its "
                                        "processes) reached; every process was stopped"), None
        elif "signal" in exit_info:
            killed_reason = _describe_signal(exit_info["signal"], self.cpu_limit_s)
        elif not exit_info:
            raise SandboxError(f"the sandbox bootstrap failed before the code ran: {stderr[-1000:]}")
        else:
            killed_reason = None
        limit_events = []
        if events.get("pids_max"):
            limit_events.append(f"process limit of the run ({self.limits.max_processes} processes and "
                                f"threads) reached: {events['pids_max']} fork(s) refused")
        if events.get("oom_kill") and not oom:
            limit_events.append(f"memory limit of the run reached: {events['oom_kill']} process(es) killed")
        notes = [f"{layer} layer missing ({reason}): {EXPOSURES[layer]}" for layer, reason in self.missing.items()]
        notes += self.notes + status.get("notes", [])
        return SandboxResult(stdout, stderr, exit_code, bool(status.get("timed_out")), killed_reason,
                             tuple(dict.fromkeys(notes)), tuple(self.layers), tuple(limit_events))


_SANDBOX_ENV = {
    "PATH": _SANDBOX_PATH,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "MPLBACKEND": "Agg",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _describe_signal(signum: int, cpu_limit_s: int) -> str:
    if signum == signal.SIGXCPU:
        return f"CPU time limit of {cpu_limit_s} s reached (SIGXCPU)"
    try:
        return f"killed by signal {signal.Signals(signum).name}"
    except ValueError:
        return f"killed by signal {signum}"


_host_lock = threading.Lock()
_host_cache: dict[str, Any] = {}


def _host_layout() -> dict[str, Any]:
    """What the private filesystem binds from the host (computed once per process).

    binds: read-only directories/files mounted at the same path; symlinks: [path, target] pairs
    recreated inside (e.g. /lib -> usr/lib); blocking: directories the sandbox uid cannot traverse
    on the way to the interpreter (matters only without the filesystem layer).
    """
    with _host_lock:
        if not _host_cache:
            binds, symlinks = [], []
            for path in _SYSTEM_DIRS + _SYSTEM_FILES:
                if os.path.islink(path):
                    symlinks.append([path, os.readlink(path)])
                elif os.path.exists(path):
                    binds.append(path)
            interpreter = _interpreter_dirs()
            binds = _outermost(binds + interpreter)
            _host_cache.update(binds=binds, symlinks=symlinks, blocking=_blocking_ancestors(interpreter))
        return _host_cache


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


class _CappedBuffer:
    """Keeps the first `max_chars` characters' worth of bytes of a stream and counts the rest."""

    def __init__(self, max_chars: int):
        self._max_chars = max_chars
        self._keep_bytes = 4 * max_chars + 4
        self._chunks: list[bytes] = []
        self._kept = 0
        self._dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self._keep_bytes - self._kept
        if room > 0:
            self._chunks.append(chunk[:room])
            self._kept += min(room, len(chunk))
        self._dropped += max(0, len(chunk) - max(room, 0))

    def data(self) -> bytes:
        return b"".join(self._chunks)

    def text(self) -> str:
        text = self.data().decode("utf-8", errors="replace")
        if len(text) > self._max_chars or self._dropped:
            return text[:self._max_chars] + TRUNCATION_MARKER.format(limit=self._max_chars)
        return text


def _collect(proc: subprocess.Popen, streams: dict[int, _CappedBuffer], backstop_s: float) -> bool:
    """Reads every stream to its end and reaps the bootstrap; False if the backstop ran out.

    One selector loop in the calling thread (no reader threads, no polling): the streams and a
    pidfd of the bootstrap. Once the bootstrap has exited, what is still open gets a short drain.
    """
    deadline = time.monotonic() + backstop_s
    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ)
    open_streams = set(streams)
    exited = False
    try:
        while open_streams or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is None and not open_streams:
                proc.wait(timeout=left)  # only without pidfd support (kernel < 5.3)
                return True
            for key, _ in selector.select(min(left, 0.05) if pidfd is None else left):
                fd = key.fd
                if fd == pidfd:
                    selector.unregister(pidfd)
                    exited = True
                    deadline = min(deadline, time.monotonic() + _DRAIN_AFTER_EXIT_S)
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    streams[fd].add(chunk)
                else:
                    selector.unregister(fd)
                    open_streams.discard(fd)
            if pidfd is None and proc.poll() is not None:
                exited = True
        proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        selector.close()
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _parse_status(data: bytes) -> dict[str, Any]:
    """Merges the JSON lines the bootstrap processes wrote to the status pipe."""
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

    # One directory for every caller on the host (not $TMPDIR, which callers may set differently).
    _DIR = "/run/agentflow_sandbox_uids" if os.path.isdir("/run") else "/tmp/agentflow_sandbox_uids"

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
        raise SandboxError(f"all {_UID_SLOTS} sandbox uids are in use; run fewer sandboxes at once")

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


def _kill_group(proc: subprocess.Popen) -> None:
    """Last resort when the bootstrap hangs: SIGKILL its process group and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so its pgid is still ours
    except ProcessLookupError:
        pass
    proc.wait()


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
