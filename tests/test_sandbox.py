"""The sandbox contains what untrusted code can do (host files, Unix sockets, network, the caller's
processes and secrets, memory/processes/disk over the whole run, time, kernel interfaces), says
which isolation is in force, and the Python coder tool reports what its snippet printed, left in
variables, or failed with.

Limits are short (1-3 s) so the whole file runs in seconds. Tests of a layer skip, with the reason,
only on a host that lacks it (`isolation_report`); CI runs as root where every layer exists.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import psutil
import pytest

from agentflow_jax.engines import Generation
from agentflow_jax.tools import sandbox, sandbox_cgroups
from agentflow_jax.tools.python_coder import PythonCoderTool, extract_code
from agentflow_jax.tools.sandbox import SandboxError, run_python

QUICK = dict(wall_timeout_s=3.0, cpu_time_s=3.0, memory_bytes=1 << 30, max_processes=16,
             max_file_bytes=1 << 20, max_output_chars=4000)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **options) -> sandbox.SandboxResult:
    """run_python with the QUICK limits and require="best_effort": runs on any host; tests of a
    layer check it is in force first (`_needs`)."""
    return run_python(code, **{**QUICK, "require": "best_effort", **options})


def _needs(*layers: str) -> None:
    """Skips (saying why) when this host cannot give the layers the test is about."""
    missing = sandbox.isolation_report("best_effort")["missing"]
    lacking = {layer: missing[layer] for layer in layers if layer in missing}
    if lacking:
        pytest.skip(f"this host lacks sandbox layer(s) {lacking}")


@pytest.fixture(autouse=True)
def parent_unharmed(tmp_path):
    """Every test: the parent's own temp file survives intact and the parent can still start processes."""
    sentinel = tmp_path / "parent_sentinel.txt"
    sentinel.write_text("parent data")
    yield
    assert sentinel.read_text() == "parent data"
    assert subprocess.run(["true"]).returncode == 0


def _processes_named(token: str) -> list[str]:
    """Every host process or thread whose command line or name contains `token`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if token in " ".join(proc.info["cmdline"] or []):
            found.append(f"pid {proc.info['pid']}")
        try:
            for tid in os.listdir(f"/proc/{proc.info['pid']}/task"):
                with open(f"/proc/{proc.info['pid']}/task/{tid}/comm") as f:
                    if token in f.read():
                        found.append(f"tid {tid}")
        except OSError:
            pass
    return found


def _attempts(body: str) -> str:
    """A program that runs each `attempt(label, fn)` of `body` and prints whether it was blocked."""
    return textwrap.dedent("""
        import ctypes, os, resource, signal, socket
        libc = ctypes.CDLL(None, use_errno=True)
        def call(name, *args):
            if getattr(libc, name)(*args) == -1:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        def attempt(label, fn):
            try:
                fn()
                print(label, "ALLOWED")
            except (OSError, ValueError) as e:
                print(label, "blocked", type(e).__name__)
    """) + textwrap.dedent(body)


def _blocked(stdout: str) -> dict[str, bool]:
    words = [line.split() for line in stdout.splitlines()]
    return {w[0]: w[1] == "blocked" for w in words if len(w) > 1 and w[1] in ("blocked", "ALLOWED")}


# ---------------------------------------------------------------------------------------------
# Running code
# ---------------------------------------------------------------------------------------------

def test_prints_output_and_exit_code():
    result = _run("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert result.stdout == "hello 42\n"
    assert result.stderr == "oops\n"
    assert result.exit_code == 3
    assert not result.timed_out and result.killed_reason is None


def test_full_isolation_is_in_force_and_reported_per_run():
    _needs(*sandbox.LAYERS)
    result = run_python("print('ok')", **QUICK)  # require="full", the default
    assert result.isolation == sandbox.LAYERS and result.isolation_notes == ()


def test_filesystem_starts_empty_and_the_work_directory_is_fresh():
    _needs("filesystem")
    code = textwrap.dedent("""
        import os, sys
        open('a.txt', 'w').write('x')
        print(os.getcwd())
        print(sorted(os.listdir('.')))
        print(sorted(os.listdir('/')))
        print(sys.prefix)
        print(sorted(os.listdir('/dev')))
    """)
    first = _run(code).stdout.splitlines()
    cwd, listing, root, prefix, dev = first
    assert cwd == "/sandbox" and listing == "['a.txt', 'main.py']"
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp", "sandbox",
               *(p.strip("/").split("/")[0] for p in (sys.prefix, sys.base_prefix, sys.executable))}
    assert set(eval(root)) <= allowed, root
    assert prefix == sys.prefix
    assert set(eval(dev)) == {"null", "zero", "full", "random", "urandom", "shm", "fd", "stdin", "stdout", "stderr"}
    again = _run("import os\nprint(sorted(os.listdir('.')))")
    assert again.stdout == "['main.py']\n"  # nothing of the previous run is left


def test_files_planted_outside_the_work_directory_cannot_be_read(tmp_path):
    _needs("filesystem")
    token = uuid.uuid4().hex
    planted = [tmp_path / f"{token}.txt", os.path.join(REPO, "tests", f"{token}.txt"),
               os.path.expanduser(f"~/{token}.txt"), f"/run/{token}.txt"]
    written = []
    for path in planted:
        try:
            with open(path, "w") as f:
                f.write(f"secret {token}")
            os.chmod(path, 0o644)  # world-readable: only the filesystem layer can keep it out
            written.append(str(path))
        except OSError:
            pass
    assert len(written) >= 2
    body = "".join(f"attempt({f'read{i}'!r}, lambda: print(open({p!r}).read()))\n" for i, p in enumerate(written))
    body += "attempt('list_project', lambda: print(os.listdir(%r)))\n" % REPO
    try:
        result = _run(_attempts(body))
    finally:
        for path in written:
            os.remove(path)
    assert token not in result.stdout
    assert all(_blocked(result.stdout).values()) and len(_blocked(result.stdout)) == len(written) + 1, result.stdout


def test_unix_sockets_of_the_host_cannot_be_reached(tmp_path):
    _needs("filesystem", "network")
    token = uuid.uuid4().hex[:12]
    listeners, addresses = [], [str(tmp_path / "host.sock"), f"\0agentflow-{token}"]
    if os.access("/run", os.W_OK):
        addresses.append(f"/run/agentflow-{token}.sock")
    for address in addresses:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen()
        listener.setblocking(False)
        listeners.append(listener)
    body = "".join(f"attempt('unix{i}', lambda: socket.socket(socket.AF_UNIX).connect({a!r}))\n"
                   for i, a in enumerate(addresses))
    try:
        result = _run(_attempts(body))
        assert _blocked(result.stdout) == {f"unix{i}": True for i in range(len(addresses))}, result.stdout
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        if len(addresses) > 2:
            os.remove(addresses[2])


def test_network_is_blocked():
    _needs("network")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = _run(_attempts(f"attempt('tcp', lambda: socket.create_connection(('127.0.0.1', {port}), 1))"))
        assert result.stdout.startswith("tcp blocked")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_caller_cannot_be_signalled_or_inspected(monkeypatch):
    _needs("pid", "uid")
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
    pid, pgid = os.getpid(), os.getpgid(0)
    result = _run(_attempts(f"""
        print(dict(os.environ))
        attempt('kill', lambda: os.kill({pid}, 0))
        attempt('killpg', lambda: os.killpg({pgid}, 0))
        attempt('environ', lambda: print(open('/proc/{pid}/environ', 'rb').read()))
    """))
    assert "sekrit" not in result.stdout and "OPENAI_API_KEY" not in result.stdout
    blocked = _blocked(result.stdout)
    assert blocked["kill"] and blocked["killpg"] and blocked["environ"], result.stdout
    assert psutil.pid_exists(pid)


def test_limits_cannot_be_raised_and_no_new_privileges():
    _needs("seccomp", "no_new_privs", "rlimits")
    body = "".join(f"attempt('{name}', lambda: resource.setrlimit(resource.{name}, (resource.RLIM_INFINITY,) * 2))\n"
                   for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"))
    body += "attempt('cgroupfs', lambda: open('/sys/fs/cgroup/memory.max', 'w').write('max'))\n"
    body += "print('status', open('/proc/self/status').read().count('NoNewPrivs:\\t1'), " \
            "open('/proc/self/status').read().count('Seccomp:\\t2'))\n"
    result = _run(_attempts(body))
    assert result.stdout.splitlines()[-1] == "status 1 1"
    assert all(_blocked(result.stdout).values()), result.stdout


def test_new_namespaces_and_kernel_interfaces_are_refused():
    _needs("seccomp")
    result = _run(_attempts("""
        CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
        def raw_clone():
            pid = libc.syscall(56 if os.uname().machine == 'x86_64' else 220, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
            if pid == 0:
                os._exit(0)
            if pid == -1:
                raise OSError(ctypes.get_errno(), 'clone')
            os.waitpid(pid, 0)
        attempt('unshare_user', lambda: call('unshare', CLONE_NEWUSER))
        attempt('clone_user', raw_clone)
        attempt('setns', lambda: call('setns', os.open('/proc/self/ns/net', os.O_RDONLY), 0))
        attempt('ptrace', lambda: call('ptrace', 0, 0, 0, 0))
        attempt('mount', lambda: call('mount', b'none', b'/tmp', b'tmpfs', 0, None))
        attempt('keyctl', lambda: call('syscall', 250 if os.uname().machine == 'x86_64' else 219, 0, 0, 0, 0))
        attempt('bpf', lambda: call('syscall', 321 if os.uname().machine == 'x86_64' else 280, 0, 0, 0))
        attempt('perf', lambda: call('syscall', 298 if os.uname().machine == 'x86_64' else 241, 0, 0, -1, -1, 0))
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            print('threads', sum(pool.map(lambda x: x, [1, 2])))
        child = os.fork()
        if child == 0:
            os._exit(5)
        print('fork', os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    """))
    assert _blocked(result.stdout) == dict.fromkeys(
        ["unshare_user", "clone_user", "setns", "ptrace", "mount", "keyctl", "bpf", "perf"], True), result.stdout
    assert "threads 3\n" in result.stdout and "fork 5\n" in result.stdout  # ordinary use still works


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------

def test_infinite_loop_is_killed_at_the_wall_limit():
    start = time.monotonic()
    result = _run("while True:\n    pass", **{"wall_timeout_s": 1.0, "cpu_time_s": 30})
    elapsed = time.monotonic() - start
    assert result.timed_out and result.exit_code is None
    assert "wall time limit" in result.killed_reason
    assert 1.0 <= elapsed < 4.0


def test_code_ignoring_sigterm_is_killed_too():
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n" \
           "while True:\n    time.sleep(0.05)"
    start = time.monotonic()
    result = _run(code, **{"wall_timeout_s": 1.0})
    assert result.timed_out and result.stdout == "ready\n"
    assert time.monotonic() - start < 4.0


def test_cpu_time_limit_stops_busy_code_before_the_wall_limit():
    result = _run("while True:\n    pass", **{"wall_timeout_s": 10.0, "cpu_time_s": 1})
    assert not result.timed_out
    assert "CPU time limit" in result.killed_reason


def test_huge_allocation_fails_inside_the_sandbox():
    result = _run("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert "MemoryError" in result.stderr
    assert result.exit_code == 1 and "allocated" not in result.stdout


def test_processes_that_together_exceed_the_memory_limit_are_stopped():
    _needs("cgroup")
    code = textwrap.dedent("""
        import os, time
        for i in range(4):
            if os.fork() == 0:
                block = b'x' * (100 << 20)   # 100 MiB each: every process alone is under the limit
                print('child', i, 'holds 100 MiB', flush=True)
                time.sleep(30)
                os._exit(0)
        for _ in range(4):
            os.wait()
        print('all four held 400 MiB')
    """)
    start = time.monotonic()
    result = _run(code, **{"wall_timeout_s": 20.0, "memory_bytes": 256 << 20})
    assert "all four" not in result.stdout and result.stdout.count("holds") < 3
    assert not result.timed_out and result.exit_code is None
    assert "memory limit of the run (256 MiB" in result.killed_reason
    assert time.monotonic() - start < 15.0


def test_files_beyond_the_disk_limit_are_stopped():
    _needs("filesystem")
    code = textwrap.dedent("""
        def fill(make, n):
            for i in range(n):
                try:
                    make(i)
                except OSError as e:
                    return f'stopped at {i}: {e.strerror}'
            return f'wrote all {n}'
        print(fill(lambda i: open(f'big{i}', 'wb').write(b'x' * (1 << 20)), 50))
        import shutil; [__import__('os').remove(f'big{i}') for i in range(3)]
        print(fill(lambda i: open(f'/tmp/empty{i}', 'w').close(), 5000))
    """)
    result = _run(code, **{"disk_bytes": 8 << 20, "max_files": 200})
    big, empty = result.stdout.splitlines()
    assert big.startswith("stopped at") and int(big.split()[2][:-1]) <= 8 and "No space left" in big
    assert empty.startswith("stopped at") and int(empty.split()[2][:-1]) < 200


def test_fork_bomb_is_contained():
    start = time.monotonic()
    result = _run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                        **{"wall_timeout_s": 1.5})
    assert result.timed_out
    assert time.monotonic() - start < 6.0
    if "cgroup" in result.isolation:
        assert any("process limit of the run (16" in e for e in result.limit_events)
    pid = os.fork()  # the parent can still fork
    if pid == 0:
        os._exit(7)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7


_DAEMON = textwrap.dedent("""
    import os, sys, time
    token, marker = {token!r}, {marker!r}
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            program = ("import sys, time; open('daemon_ready', 'w').close(); time.sleep(0.5); "
                       "open(sys.argv[1], 'w').write('survived')")
            os.execv(sys.executable, [sys.executable, "-c", program, marker, token])
        os._exit(0)
    deadline = time.time() + 10
    while not os.path.exists("daemon_ready") and time.time() < deadline:
        time.sleep(0.01)
    print("daemon ready" if os.path.exists("daemon_ready") else "daemon never started")
""")


@pytest.mark.parametrize("options", [
    {},
    {"switch_user": False, "require": "best_effort"},
    {"use_namespaces": False, "switch_user": False, "require": "best_effort"},
], ids=["full", "caller-uid", "no-namespaces"])
def test_double_forked_daemon_does_not_survive(options):
    token = f"agentflow-daemon-{uuid.uuid4().hex}"
    marker = f"/tmp/{token}.marker"
    result = _run(_DAEMON.format(token=token, marker=marker), **{"wall_timeout_s": 12.0},
                        **options)
    assert result.stdout == "daemon ready\n", result
    assert _processes_named(token) == []
    time.sleep(1.0)  # the daemon would have written its marker 0.5 s after starting
    assert not os.path.exists(marker)


def test_thread_and_process_pools_are_gone_when_the_call_returns():
    token = "afj" + uuid.uuid4().hex[:12]  # a thread/process name (15 characters at most)
    code = textwrap.dedent(f"""
        import concurrent.futures, ctypes, multiprocessing, os, time
        def name_me(*_):
            ctypes.CDLL(None).prctl(15, b"{token}", 0, 0, 0)
        def park(_):
            name_me()
            time.sleep(60)
        if __name__ == "__main__":
            processes = multiprocessing.Pool(2, initializer=name_me)
            processes.map_async(park, range(2))
            threads = concurrent.futures.ThreadPoolExecutor(2)
            for _ in range(2):
                threads.submit(park, None)
            deadline = time.time() + 10
            while len({{t for t in os.listdir('/proc/self/task')
                        if open(f'/proc/self/task/{{t}}/comm').read().strip() == "{token}"}}) < 2 and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            print("pools running", flush=True)
            os._exit(0)   # no clean-up: the pools are left running
    """)
    result = _run(code, **{"wall_timeout_s": 12.0})
    assert result.stdout == "pools running\n", result
    assert _processes_named(token) == []


def test_run_cgroups_are_removed_after_each_run():
    _needs("cgroup")
    _run("print(1)")
    layout = sandbox_cgroups._get_layout()
    prefix = f"agentflow_sandbox_{os.getpid()}_"
    for parent in {layout.memory_parent, layout.pids_parent}:
        assert not [d for d in os.listdir(parent) if d.startswith(prefix)]


@pytest.mark.parametrize("version", [1, 2])
def test_run_cgroup_layout_and_limits_on_either_cgroup_version(version, tmp_path, monkeypatch):
    """Discovery and limit files against a fake cgroup tree (this host has only one of the versions)."""
    if version == 1:
        mounts = [(str(tmp_path / c), "cgroup", {"rw", c}, "/") for c in ("memory", "pids")]
        own = {"memory": "/job", "pids": "/"}
        for d in ("memory/job", "pids"):
            (tmp_path / d).mkdir(parents=True)
    else:
        mounts = [(str(tmp_path), "cgroup2", {"rw"}, "/")]
        own = {"": "/job"}
        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "cgroup.controllers").write_text("cpu io memory pids\n")
        (tmp_path / "job" / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(sandbox_cgroups, "_mounts", lambda: mounts)
    monkeypatch.setattr(sandbox_cgroups, "_own_paths", lambda: own)
    monkeypatch.setattr(sandbox_cgroups, "_layout", None)
    assert sandbox_cgroups.availability() is None
    group = sandbox_cgroups.RunCgroup.create("t", 123 << 20, 7)
    memory_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    assert open(os.path.join(group.memory_dir, memory_file)).read() == str(123 << 20)
    assert open(os.path.join(group.pids_dir, "pids.max")).read() == "9"  # + the bootstrap and init
    if version == 1:
        assert group.memory_dir.startswith(str(tmp_path / "memory" / "job")) and group.oom_control
        assert group.pids_dir.startswith(str(tmp_path / "pids" / "agentflow_sandbox_"))
    else:
        assert group.memory_dir == group.pids_dir and group.oom_control is None
        assert (tmp_path / "job" / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert group.members() == [] and group.limits_hit() == {}


def test_cgroup_v2_without_the_controllers_says_what_to_enable(tmp_path, monkeypatch):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cgroup.controllers").write_text("cpu io\n")
    monkeypatch.setattr(sandbox_cgroups, "_mounts", lambda: [(str(tmp_path), "cgroup2", {"rw"}, "/")])
    monkeypatch.setattr(sandbox_cgroups, "_own_paths", lambda: {"": "/job"})
    monkeypatch.setattr(sandbox_cgroups, "_layout", None)
    reason = sandbox_cgroups.availability()
    assert "lacks the ['memory', 'pids'] controller(s); enable them" in reason


def test_output_is_truncated_with_a_marker():
    result = _run("print('x' * 50000)\nimport sys\nprint('y' * 50000, file=sys.stderr)",
                        **{"max_output_chars": 1000})
    for stream in (result.stdout, result.stderr):
        assert stream.endswith(sandbox.TRUNCATION_MARKER.format(limit=1000))
        assert len(stream) < 1100


def test_concurrent_runs_are_independent():
    results = [None] * 4

    def work(i):
        results[i] = _run(f"import time\ntime.sleep(0.2)\nopen('mine', 'w').write('{i}')\n"
                                f"print(open('mine').read(), {i} * 11)")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i} {i * 11}\n" for i in range(4)]


def test_bootstrap_ignores_the_callers_python_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-injected")
    result = _run("import sys\nprint(any('injected' in p for p in sys.path))")
    assert result.stdout == "False\n"


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"require must be one of 'full', 'best_effort', 'none'; got 'strict'"):
        run_python("print(1)", require="strict")
    with pytest.raises(ValueError, match=r"SandboxLimits.disk_bytes must be a positive number, got 0"):
        sandbox.SandboxLimits(disk_bytes=0)
    with pytest.raises(ValueError, match="switch_user must be True or False"):
        run_python("print(1)", switch_user="no")


# ---------------------------------------------------------------------------------------------
# Isolation levels: what each reports, and "full" refusing
# ---------------------------------------------------------------------------------------------

class _ReplyEngine:
    """An engine that always answers with the same text."""

    def __init__(self, text: str):
        self.text = text

    def generate(self, requests):
        return [Generation(self.text) for _ in requests]


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """Isolation is logged once per process: forget what was logged, capture what is."""
    monkeypatch.setattr(sandbox, "_logged", set())
    caplog.set_level(logging.INFO, logger=sandbox.__name__)
    return caplog


def test_full_level_reports_every_layer_and_logs_it_once(fresh_log):
    _needs(*sandbox.LAYERS)
    tool = PythonCoderTool(_ReplyEngine("print(1)"), limits=sandbox.SandboxLimits(**QUICK))
    PythonCoderTool(_ReplyEngine("print(1)"), limits=sandbox.SandboxLimits(**QUICK))
    assert tool.isolation["satisfied"] and tool.isolation["missing"] == {}
    assert tool.isolation["in_force"] == list(sandbox.LAYERS)
    [record] = fresh_log.records
    assert record.levelno == logging.INFO and record.getMessage().startswith("sandbox isolation: full (filesystem")


def test_best_effort_level_runs_and_says_what_is_missing(fresh_log):
    tool = PythonCoderTool(_ReplyEngine("```python\nimport os\nprint(os.getuid())\n```"),
                           limits=sandbox.SandboxLimits(**QUICK), require="best_effort", switch_user=False)
    assert tool.isolation["satisfied"] and tool.isolation["missing"]["uid"] == "turned off by switch_user=False"
    assert "per-user kernel limits" in tool.isolation["exposed"]["uid"]
    [record] = fresh_log.records
    assert record.levelno == logging.WARNING and "missing uid (turned off by switch_user=False; exposes:" in record.getMessage()
    output = tool.run(query="who am I")
    assert f"Printed output:\n{os.getuid()}" in output
    assert "Sandbox isolation was weaker than designed: uid layer missing (turned off by switch_user=False)" in output


def test_none_level_runs_without_namespaces_and_logs_without_warning(fresh_log):
    report = sandbox.check_isolation("none", use_namespaces=False, switch_user=False)
    assert report["satisfied"]
    assert {"filesystem", "pid", "network", "ipc", "uid"} <= set(report["missing"])
    assert "seccomp" in report["in_force"] or "seccomp" in report["missing"]
    assert [r.levelno for r in fresh_log.records] == [logging.INFO]
    result = run_python("print('ran')", **QUICK, require="none", use_namespaces=False, switch_user=False)
    assert result.stdout == "ran\n" and "filesystem" not in result.isolation
    assert any(n.startswith("filesystem layer missing (turned off by use_namespaces=False)") for n in result.isolation_notes)


def test_full_level_refuses_options_that_turn_layers_off():
    with pytest.raises(SandboxError) as info:
        run_python("print(1)", switch_user=False)
    message = str(info.value)
    assert "\n" not in message and "uid (turned off by switch_user=False)" in message
    assert "uid: the code runs as the caller's uid" in message  # what best_effort would expose
    with pytest.raises(SandboxError, match="filesystem .turned off by use_namespaces=False"):
        PythonCoderTool(_ReplyEngine("print(1)"), use_namespaces=False)


def test_full_level_refuses_at_tool_start_when_the_probe_finds_a_layer_missing(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_cache", {(True, True): (
        tuple(layer for layer in sandbox.LAYERS if layer != "seccomp"),
        {"seccomp": "libseccomp not found; install it (Debian/Ubuntu: apt-get install libseccomp2)"})})
    with pytest.raises(SandboxError) as info:
        PythonCoderTool(_ReplyEngine("print(1)"))
    assert "\n" not in str(info.value)
    assert "lacks seccomp (libseccomp not found; install it (Debian/Ubuntu: apt-get install libseccomp2))" in str(info.value)
    tool = PythonCoderTool(_ReplyEngine("print(1)"), require="best_effort")
    assert list(tool.isolation["missing"]) == ["seccomp"]


_CHILD = textwrap.dedent("""
    import json, sys
    from agentflow_jax.tools import sandbox
    out = {"report": sandbox.isolation_report("full")}
    try:
        sandbox.run_python("print(1)", wall_timeout_s=5)
        out["full"] = "ran"
    except sandbox.SandboxError as e:
        out["full"] = str(e)
    out["best_effort"] = sandbox.run_python("print(1)", wall_timeout_s=5, require="best_effort").stdout
    print(json.dumps(out))
""")


def _run_child(prefix: list[str], setup: str = "") -> dict:
    command = prefix + [sys.executable, "-c", _CHILD] if not setup else \
        prefix + ["sh", "-c", f'{setup} && exec "$0" -c "$1"', sys.executable, _CHILD]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_full_level_refuses_on_a_host_without_cgroups():
    """A child whose mount namespace hides /sys/fs/cgroup: the cgroup layer is missing there."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare(1) to hide the cgroup filesystem from a child")
    out = _run_child(["unshare", "--mount", "--propagation", "private"], "mount -t tmpfs none /sys/fs/cgroup")
    assert list(out["report"]["missing"]) == ["cgroup"] and not out["report"]["satisfied"]
    assert out["full"].startswith("Python sandbox refused to run: require='full' but this host lacks cgroup (")
    assert "mount cgroup2 (or cgroup v1 memory and pids) read-write" in out["full"] and "\n" not in out["full"]
    assert out["best_effort"] == "1\n"


def test_full_level_refuses_without_cap_sys_admin():
    """A child without CAP_SYS_ADMIN gets its namespaces from a user namespace: no separate uid."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and util-linux setpriv(1) to drop CAP_SYS_ADMIN for a child")
    out = _run_child(["setpriv", "--bounding-set=-sys_admin"])
    assert list(out["report"]["missing"]) == ["uid"]
    assert "lacks uid (no CAP_SYS_ADMIN" in out["full"] and "\n" not in out["full"]
    assert out["best_effort"] == "1\n"


# ---------------------------------------------------------------------------------------------
# The Python coder tool
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, code", [
    ("Here:\n```python\nprint(1)\n```\nThis prints 1.", "print(1)"),
    ("```py\nx = 1\n```\ntext\n```Python\nx = 2\n```", "x = 2"),
    ("```python\nx = 3\nprint(x)", "x = 3\nprint(x)"),  # unclosed fence (generation hit its limit)
    ("print(4)", "print(4)"),
])
def test_code_is_taken_from_the_last_fenced_block(reply, code):
    assert extract_code(reply) == code


def test_python_coder_reports_output_variables_errors_and_code():
    reply = "Sure:\n```python\ny = [1, 2]\nprint('sum', sum(y))\nprint(1 / 0)\n```\nDone."
    tool = PythonCoderTool(_ReplyEngine(reply), limits=sandbox.SandboxLimits(**QUICK), require="best_effort")
    output = tool.run(query="add the numbers")
    assert output.startswith("Printed output:\nsum 3\n\nVariables after the run:\ny = [1, 2]\n\n")
    assert 'File "snippet.py", line 3' in output and "ZeroDivisionError: division by zero" in output
    assert "(exit code 1)" in output
    assert output.endswith("Code:\n```python\ny = [1, 2]\nprint('sum', sum(y))\nprint(1 / 0)\n```")


def test_sandbox_settings_are_config_keys_of_the_python_tool():
    from agentflow_jax.tools import build_toolbox
    toolbox = build_toolbox(["python"], engine=_ReplyEngine("print(1)"), config={"python": {
        "require": "best_effort", "disk_bytes": 1 << 20, "max_files": 64, "max_open_files": 32}})
    tool = toolbox.find("Python_Code_Generator_Tool")
    assert tool.sandbox_options["require"] == "best_effort" and tool.limits.max_files == 64
    with pytest.raises(ValueError, match="require must be one of"):
        build_toolbox(["python"], engine=_ReplyEngine("print(1)"), config={"python": {"require": "strict"}})


def test_python_coder_reports_a_timeout():
    tool = PythonCoderTool(_ReplyEngine("```python\nwhile True:\n    pass\n```"),
                           limits=sandbox.SandboxLimits(**{**QUICK, "wall_timeout_s": 1.0, "cpu_time_s": 5}),
                           require="best_effort")
    output = tool.run(query="loop")
    assert "Printed output:\n(nothing was printed)" in output
    assert "The program was stopped: wall time limit of 1 s reached." in output
