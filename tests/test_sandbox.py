"""The sandbox contains what untrusted code can do (time, memory, processes, files, network, secrets),
and the Python coder tool reports what its snippet printed, left in variables, or failed with.

Limits are short (1-3 s) so the whole file runs in seconds. Where a layer may be missing on some
host (namespaces, uid switch), a test accepts "blocked" or "reported in isolation_notes"; on a
host where every layer works, it requires "blocked".
"""

import os
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import psutil
import pytest

from agentflow_jax.engines import Generation
from agentflow_jax.tools import sandbox
from agentflow_jax.tools.python_coder import PythonCoderTool, extract_code
from agentflow_jax.tools.sandbox import run_python

QUICK = dict(wall_timeout_s=2.0, cpu_time_s=2.0, memory_bytes=1 << 30, max_processes=16,
             max_file_bytes=1 << 20, max_output_chars=4000)


@pytest.fixture(autouse=True)
def parent_unharmed(tmp_path):
    """Every test: the parent's own temp file survives intact and the parent can still start processes."""
    sentinel = tmp_path / "parent_sentinel.txt"
    sentinel.write_text("parent data")
    yield
    assert sentinel.read_text() == "parent data"
    assert subprocess.run(["true"]).returncode == 0


def _processes_with(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if token in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_prints_output_and_exit_code():
    result = run_python("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(3)", **QUICK)
    assert result.stdout == "hello 42\n"
    assert result.stderr == "oops\n"
    assert result.exit_code == 3
    assert not result.timed_out and result.killed_reason is None


def test_working_directory_is_fresh_writable_and_removed():
    code = "import os\nopen('a.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    result = run_python(code, **QUICK)
    workdir, listing = result.stdout.splitlines()
    assert listing == "['a.txt', 'main.py']"
    assert not os.path.exists(workdir)


def test_infinite_loop_is_killed_at_the_wall_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", **{**QUICK, "wall_timeout_s": 1.0, "cpu_time_s": 30})
    elapsed = time.monotonic() - start
    assert result.timed_out and result.exit_code is None
    assert "wall time limit" in result.killed_reason
    assert 1.0 <= elapsed < 4.0


def test_code_ignoring_sigterm_is_killed_too():
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n" \
           "while True:\n    time.sleep(0.05)"
    start = time.monotonic()
    result = run_python(code, **{**QUICK, "wall_timeout_s": 1.0})
    assert result.timed_out and result.stdout == "ready\n"
    assert time.monotonic() - start < 4.0


def test_cpu_time_limit_stops_busy_code_before_the_wall_limit():
    result = run_python("while True:\n    pass", **{**QUICK, "wall_timeout_s": 10.0, "cpu_time_s": 1})
    assert not result.timed_out
    assert "CPU time limit" in result.killed_reason


def test_huge_allocation_fails_inside_the_sandbox():
    result = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", **QUICK)
    assert "MemoryError" in result.stderr
    assert result.exit_code == 1 and "allocated" not in result.stdout


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = run_python(code, **{**QUICK, "wall_timeout_s": 1.5})
    assert result.timed_out
    assert time.monotonic() - start < 6.0
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
    {"switch_user": False},
    {"use_namespaces": False, "switch_user": False},
], ids=["full", "caller-uid", "no-namespaces"])
def test_detached_child_does_not_survive(options):
    token = f"agentflow-daemon-{uuid.uuid4().hex}"
    marker = f"/tmp/{token}.marker"
    result = run_python(_DAEMON.format(token=token, marker=marker), **{**QUICK, "wall_timeout_s": 12.0},
                        **options)
    assert result.stdout == "daemon ready\n", result
    assert _processes_with(token) == []
    time.sleep(1.0)  # the daemon would have written its marker 0.5 s after starting
    assert not os.path.exists(marker)


def test_writing_outside_the_working_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    repo_file = os.path.join(os.path.dirname(__file__), f"escaped-{uuid.uuid4().hex}.txt")
    code = textwrap.dedent(f"""
        for path in [{str(target)!r}, {repo_file!r}, "/etc/agentflow-escaped"]:
            try:
                open(path, "w").write("escaped")
                print("WROTE", path)
            except OSError as e:
                print("BLOCKED", type(e).__name__)
    """)
    try:
        result = run_python(code, **QUICK)
        assert "Traceback" not in result.stderr
        if not result.isolation_notes:
            assert result.stdout.count("BLOCKED") == 3
            assert not target.exists() and not os.path.exists(repo_file)
        else:
            assert any("uid" in n or "mount" in n for n in result.isolation_notes)
    finally:
        for path in (str(target), repo_file, "/etc/agentflow-escaped"):
            if os.path.exists(path):
                os.remove(path)


def test_network_is_blocked_or_reported():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", {port}))
            print("CONNECTED")
        except OSError as e:
            print("BLOCKED", e)
    """)
    try:
        result = run_python(code, **QUICK)
        if any("network" in n for n in result.isolation_notes):
            return
        assert result.stdout.startswith("BLOCKED")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_parent_secrets_and_process_are_out_of_reach(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
    code = textwrap.dedent(f"""
        import os, signal
        print(dict(os.environ))
        try:
            print(open("/proc/{os.getpid()}/environ", "rb").read())
        except OSError as e:
            print("environ BLOCKED", type(e).__name__)
        try:
            os.kill({os.getpid()}, 0)
            print("CAN SIGNAL PARENT")
        except OSError as e:
            print("signal BLOCKED", type(e).__name__)
    """)
    result = run_python(code, **QUICK)
    assert "sekrit" not in result.stdout and "OPENAI_API_KEY" not in result.stdout
    assert "environ BLOCKED" in result.stdout
    assert "signal BLOCKED" in result.stdout or result.isolation_notes


def test_output_is_truncated_with_a_marker():
    result = run_python("print('x' * 50000)\nimport sys\nprint('y' * 50000, file=sys.stderr)",
                        **{**QUICK, "max_output_chars": 1000})
    for stream in (result.stdout, result.stderr):
        assert stream.endswith(sandbox.TRUNCATION_MARKER.format(limit=1000))
        assert len(stream) < 1100


def test_weaker_isolation_is_reported():
    result = run_python("print('ok')", **QUICK, use_namespaces=False, switch_user=False)
    assert result.stdout == "ok\n"
    assert any("namespaces disabled" in n for n in result.isolation_notes)
    assert any("uid switch disabled" in n for n in result.isolation_notes)
    assert "weaker" in sandbox.format_notes(result.isolation_notes)


def test_concurrent_runs_are_independent():
    results = [None] * 4

    def work(i):
        results[i] = run_python(f"import time\ntime.sleep(0.2)\nprint({i} * 11)", **QUICK)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * 11}\n" for i in range(4)]


def test_bootstrap_ignores_the_callers_python_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-injected")
    result = run_python("import sys\nprint(any('injected' in p for p in sys.path))", **QUICK)
    assert result.stdout == "False\n"


class _ReplyEngine:
    """An engine that always answers with the same text."""

    def __init__(self, text: str):
        self.text = text

    def generate(self, requests):
        return [Generation(self.text) for _ in requests]


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
    tool = PythonCoderTool(_ReplyEngine(reply), limits=sandbox.SandboxLimits(**QUICK))
    output = tool.run(query="add the numbers")
    assert output.startswith("Printed output:\nsum 3\n\nVariables after the run:\ny = [1, 2]\n\n")
    assert 'File "snippet.py", line 3' in output and "ZeroDivisionError: division by zero" in output
    assert "(exit code 1)" in output
    assert output.endswith("Code:\n```python\ny = [1, 2]\nprint('sum', sum(y))\nprint(1 / 0)\n```")


def test_python_coder_reports_a_timeout():
    tool = PythonCoderTool(_ReplyEngine("```python\nwhile True:\n    pass\n```"),
                           limits=sandbox.SandboxLimits(**{**QUICK, "wall_timeout_s": 1.0, "cpu_time_s": 5}))
    output = tool.run(query="loop")
    assert "Printed output:\n(nothing was printed)" in output
    assert "The program was stopped: wall time limit of 1 s reached." in output
