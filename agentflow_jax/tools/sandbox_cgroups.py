"""A cgroup of its own for each sandboxed run: memory and process count limited over the whole run.

`RunCgroup.create(name, memory_bytes, max_processes)` makes one cgroup per hierarchy below the
caller's own cgroup (so the caller's limits still apply above it):

* cgroup v2 (one hierarchy with both controllers): `memory.max`, `memory.swap.max = 0`,
  `memory.oom.group = 1` (when one process is OOM-killed the kernel kills the whole run),
  `pids.max`;
* cgroup v1 (the `memory` and `pids` hierarchies): `memory.limit_in_bytes` (and
  `memory.memsw.limit_in_bytes`, so swap cannot extend it), `pids.max`. v1 has no group kill: the
  bootstrap watches `memory.oom_control` through an eventfd and kills the run at the first OOM kill.

The caller moves the bootstrap in (`add`) before the bootstrap starts anything, so every process
of the run is inside; pids.max counts two more tasks than asked for, the bootstrap and init.
Afterwards the caller reads what was hit (`limits_hit`), kills anything left (`kill_all`) and removes
the directories (`remove`).

`availability()` says, once per process, whether this works here and if not why (one line, with
what to allow), without creating anything.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

_PREFIX = "agentflow_sandbox_"
_OWN_TASKS = 2  # the bootstrap and init are in the run's cgroup too
_lock = threading.Lock()
_layout: "_Layout | str | None" = None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the run cgroups go: the caller's cgroup directory in each hierarchy used."""

    version: int
    memory_parent: str
    pids_parent: str


def _mounts() -> list[tuple[str, str, set[str], str]]:
    """(mount point, fs type, super options, root) of every cgroup mount of this process."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] in ("cgroup", "cgroup2"):
                root, mount_point = fields[3], fields[4].replace("\\040", " ")
                found.append((mount_point, rfields[0], set(rfields[2].split(",")), root))
    return found


def _own_paths() -> dict[str, str]:
    """Controller name (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _dir_of(mount_point: str, mount_root: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, rel))


def _discover() -> "_Layout | str":
    """The layout to use, or a one-line reason why no cgroup can be made here."""
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError as e:
        return f"cannot read this process's cgroups ({e})"
    v1 = {}
    for mount_point, fstype, options, root in mounts:
        for controller in ("memory", "pids"):
            if fstype == "cgroup" and controller in options and controller in own:
                v1[controller] = _dir_of(mount_point, root, own[controller])
    if len(v1) == 2:
        for parent in v1.values():
            if not os.path.isdir(parent):
                return (f"cgroup directory {parent} does not exist (the cgroup filesystem is hidden or "
                        "not mounted); mount cgroup2 (or cgroup v1 memory and pids) read-write at /sys/fs/cgroup")
            if not os.access(parent, os.W_OK):
                return (f"cgroup v1 directory {parent} is not writable; run as root with /sys/fs/cgroup "
                        "mounted read-write")
        return _Layout(1, v1["memory"], v1["pids"])
    for mount_point, fstype, _, root in mounts:
        if fstype == "cgroup2" and "" in own:
            parent = _dir_of(mount_point, root, own[""])
            reason = _enable_v2_controllers(parent)
            return _Layout(2, parent, parent) if reason is None else reason
    missing = sorted({"memory", "pids"} - set(v1))
    return (f"no cgroup hierarchy with the {' and '.join(missing)} controller(s) is mounted; mount "
            "cgroup2 (or cgroup v1 memory and pids) read-write at /sys/fs/cgroup")


def _enable_v2_controllers(parent: str) -> str | None:
    """Makes memory and pids available to children of `parent`; a reason when impossible."""
    try:
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            available = set(f.read().split())
        if not {"memory", "pids"} <= available:
            return (f"cgroup v2 at {parent} lacks the {sorted({'memory', 'pids'} - available)} "
                    "controller(s); enable them in the parent's cgroup.subtree_control")
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        if not {"memory", "pids"} <= enabled:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
    except OSError as e:
        return (f"cannot enable the memory and pids controllers below {parent} ({e.strerror}); run the "
                "caller in a delegated cgroup of its own (e.g. systemd-run --scope -p Delegate=yes) "
                "with write access")
    return None


def availability() -> str | None:
    """None when run cgroups can be made here, else a one-line reason with what to allow."""
    layout = _get_layout()
    return layout if isinstance(layout, str) else None


def _get_layout() -> "_Layout | str":
    global _layout
    with _lock:
        if _layout is None:
            _layout = _discover()
            if isinstance(_layout, _Layout):
                _remove_stale(_layout)
        return _layout


def _remove_stale(layout: _Layout) -> None:
    """Removes empty run cgroups left by callers that died (their pid is in the name)."""
    for parent in {layout.memory_parent, layout.pids_parent}:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if not name.startswith(_PREFIX):
                continue
            pid = name[len(_PREFIX):].split("_")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


def _write(path: str, value: str | int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read_keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file ("key value" lines) as a dict; {} when missing."""
    try:
        with open(path) as f:
            pairs = [line.split() for line in f]
    except OSError:
        return {}
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


@dataclasses.dataclass
class RunCgroup:
    """The cgroup directories of one run (one for v2, memory + pids for v1)."""

    version: int
    dirs: tuple[str, ...]
    memory_dir: str
    pids_dir: str

    @classmethod
    def create(cls, name: str, memory_bytes: int, max_processes: int) -> "RunCgroup":
        """Makes the run's cgroup(s) with the limits set; raises OSError with the cause."""
        layout = _get_layout()
        if isinstance(layout, str):
            raise OSError(layout)
        name = f"{_PREFIX}{os.getpid()}_{name}"
        memory_dir = os.path.join(layout.memory_parent, name)
        pids_dir = os.path.join(layout.pids_parent, name)
        dirs = tuple(dict.fromkeys((memory_dir, pids_dir)))
        group = cls(layout.version, (), memory_dir, pids_dir)
        try:
            for d in dirs:
                os.mkdir(d, 0o755)
                group.dirs += (d,)
            if layout.version == 2:
                _write(os.path.join(memory_dir, "memory.max"), memory_bytes)
                for optional, value in (("memory.swap.max", 0), ("memory.oom.group", 1)):
                    if os.path.exists(os.path.join(memory_dir, optional)):
                        _write(os.path.join(memory_dir, optional), value)
            else:
                _write(os.path.join(memory_dir, "memory.limit_in_bytes"), memory_bytes)
                memsw = os.path.join(memory_dir, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    _write(memsw, memory_bytes)
            _write(os.path.join(pids_dir, "pids.max"), max_processes + _OWN_TASKS)
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def add(self, pid: int) -> None:
        """Moves process `pid` (and its future children) into the run; OSError on failure."""
        for path in self.procs_files:
            _write(path, pid)

    @property
    def oom_control(self) -> str | None:
        """v1 only: the file an eventfd watches for OOM kills (via cgroup.event_control)."""
        return os.path.join(self.memory_dir, "memory.oom_control") if self.version == 1 else None

    def limits_hit(self) -> dict[str, int]:
        """How often the run hit its limits: {"oom_kill": n, "pids_max": n} (zero entries dropped)."""
        if self.version == 2:
            oom = _read_keyed(os.path.join(self.memory_dir, "memory.events")).get("oom_kill", 0)
        else:
            oom = _read_keyed(os.path.join(self.memory_dir, "memory.oom_control")).get("oom_kill", 0)
        pids = _read_keyed(os.path.join(self.pids_dir, "pids.events")).get("max", 0)
        return {k: v for k, v in (("oom_kill", oom), ("pids_max", pids)) if v}

    def members(self) -> list[int]:
        pids: set[int] = set()
        for path in self.procs_files:
            try:
                with open(path) as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                pass
        return sorted(pids)

    def kill_all(self, rounds: int = 100) -> bool:
        """SIGKILLs every process in the run's cgroups until none is left; False if some stay."""
        kill_file = os.path.join(self.dirs[0], "cgroup.kill") if self.version == 2 and self.dirs else None
        for _ in range(rounds):
            members = self.members()
            if not members:
                return True
            if kill_file and os.path.exists(kill_file):
                _write(kill_file, 1)
            else:
                for pid in members:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.005)
        return not self.members()

    def remove(self, timeout_s: float = 2.0) -> None:
        """Removes the directories (retrying while the kernel finishes tearing processes down)."""
        deadline = time.monotonic() + timeout_s
        for d in reversed(self.dirs):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
        self.dirs = ()
