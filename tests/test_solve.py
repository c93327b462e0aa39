"""The solve command end to end against a local OpenAI-compatible server on 127.0.0.1: the turns are
printed as they happen (the server holds each module's request until the test has read the lines of
the step before), one engine per role, and the trajectory as JSON."""

import http.server
import json
import queue
import subprocess
import sys
import threading

import pytest

from agentflow_jax.agent import prompts

ROLES = {prompts.QUERY_ANALYSIS_SYSTEM: "analysis", prompts.PLANNER_SYSTEM: "planner",
         prompts.EXECUTOR_SYSTEM: "executor", prompts.VERIFIER_SYSTEM: "verifier",
         prompts.GENERATOR_SYSTEM: "generator"}


def role_of(messages):
    return ROLES.get(messages[0]["content"], "tools")  # the generalist tool's own call is a bare user message


def reply_for(messages):
    return {"analysis": "Needs arithmetic.",
            "planner": ("Justification: the generalist can add.\nContext: none\nSub-Goal: add two and two\n"
                        "Tool Name: Generalist_Solution_Generator_Tool"),
            "executor": '{"tool_name": "Generalist_Solution_Generator_Tool", "arguments": {"query": "2+2?"}}',
            "verifier": "The result answers it.\nConclusion: STOP",
            "generator": "Two and two make four.\n<answer>4</answer>",
            "tools": "It is 4."}[role_of(messages)]


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible server. It records (role, model) of every request answered,
    and holds a role's requests until the test opens that role's gate (`server.gates`)."""

    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        role = role_of(body["messages"])
        gate = self.server.gates.get(role)
        if gate is not None and not gate.wait(timeout=120):
            self.send_error(503, f"the test never opened the {role} gate")
            return
        self.server.answered.append((role, body["model"]))
        answer = {"choices": [{"message": {"role": "assistant", "content": reply_for(body["messages"])},
                               "finish_reason": "stop"}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.gates, srv.answered = {}, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    for gate in srv.gates.values():
        gate.set()
    srv.shutdown()


@pytest.fixture
def server(http_server):
    return f"http://127.0.0.1:{http_server.server_address[1]}/v1"


ENV = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}


def run_solve(*args):
    return subprocess.run([sys.executable, "-m", "agentflow_jax.solve", *args], capture_output=True, text=True,
                          timeout=120, env=ENV)


def test_solve_prints_turns_and_writes_json(server, tmp_path):
    out = run_solve(f"--engine=openai:{server},toy", "--tools=generalist", f"--json={tmp_path / 't.json'}",
                    "What is 2+2?")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ["== Turn 1 ==", "Tool: Generalist_Solution_Generator_Tool", "Sub-goal: add two and two",
                     'Command: {"query": "2+2?"}', "It is 4.", "Verdict: STOP", "Stopped by: verifier",
                     "Answer: 4"]:
        assert expected in text, expected
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["answer"] == "4" and saved["turns"][0]["result"]["output"] == "It is 4."
    assert saved["memory"]["query"] == "What is 2+2?"


def test_solve_prints_each_step_before_the_next_one_is_answered(http_server, server):
    """The executor's request is held until the planner's step has been read from solve's stdout, the
    verifier's until the tool's result has, the generator's until the verdict has: with output printed
    at the end, the run could not finish. The final answer comes last."""
    gates = http_server.gates
    gates.update(executor=threading.Event(), verifier=threading.Event(), generator=threading.Event())
    process = subprocess.Popen([sys.executable, "-m", "agentflow_jax.solve", f"--engine=openai:{server},toy",
                                "--tools=generalist", "What is 2+2?"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen = []

    def read_until(expected: str) -> list:
        while True:
            line = lines.get(timeout=120)
            assert line is not None, f"solve ended before printing {expected!r}: {seen} {process.stderr.read()}"
            seen.append(line)
            if line == expected:
                return [role for role, _ in http_server.answered]

    try:
        assert read_until("Sub-goal: add two and two") == ["analysis", "planner"]
        assert seen[:3] == ["Query: What is 2+2?", "Analysis: Needs arithmetic.", ""]
        gates["executor"].set()
        assert read_until("  It is 4.") == ["analysis", "planner", "executor", "tools"]
        gates["verifier"].set()
        assert read_until("Verdict: STOP") == ["analysis", "planner", "executor", "tools", "verifier"]
        gates["generator"].set()
        read_until("Answer: 4")
        assert lines.get(timeout=120) is None  # the answer is the last line
    finally:
        for gate in gates.values():
            gate.set()
        process.wait(timeout=120)
    assert process.returncode == 0, process.stderr.read()
    assert seen[seen.index("== Turn 1 ==") - 1] == "" and 'Command: {"query": "2+2?"}' in seen


def test_each_role_uses_its_own_engine_and_json_goes_to_stdout(http_server, server):
    out = run_solve(f"--engine=openai:{server},main", f"--planner_engine=openai:{server},planner",
                    f"--role_engine=verifier=openai:{server},verifier", f"--role_engine=tools=openai:{server},tools",
                    "--tools=generalist", "--json=-", "What is 2+2?")
    assert out.returncode == 0, out.stderr
    served = dict(http_server.answered)
    assert served == {"analysis": "main", "planner": "planner", "executor": "main", "tools": "tools",
                      "verifier": "verifier", "generator": "main"}
    assert json.loads(out.stdout)["answer"] == "4"  # stdout is the JSON alone
    assert "Verdict: STOP" in out.stderr and out.stderr.rstrip().endswith("Answer: 4")


def test_solve_usage_errors(server):
    out = run_solve("--tools=generalist", "What?")
    assert out.returncode != 0 and "exactly one of --model=DIR or --engine=SPEC" in out.stderr
    out = run_solve(f"--engine=openai:{server},toy", "--tools=search", "What?")
    assert out.returncode != 0 and "--search_corpus or --retrieval_url" in out.stderr
    out = run_solve(f"--engine=openai:{server},toy", "--tools=teleport", "What?")
    assert out.returncode != 0 and "unknown tool name(s) ['teleport']" in out.stderr
    out = run_solve(f"--engine=openai:{server},toy", f"--role_engine=judge=openai:{server},x", "What?")
    assert out.returncode == 2 and "--role_engine='judge=openai:" in out.stderr and "ROLE in ['analysis'" in out.stderr


def test_generate_default_runs_offline():
    out = subprocess.run([sys.executable, "-m", "agentflow_jax.generate", "--max_new_tokens=4", "--n=2"],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "--- sample 0 (" in out.stdout and "--- sample 1 (" in out.stdout
    assert "from a " in out.stdout and "-token prompt" in out.stdout
