"""The solve command end to end against a local OpenAI-compatible server on 127.0.0.1."""

import http.server
import json
import subprocess
import sys
import threading

import pytest

from agentflow_jax.agent import prompts


def reply_for(messages):
    system = messages[0]["content"]
    if system == prompts.QUERY_ANALYSIS_SYSTEM:
        return "Needs arithmetic."
    if system == prompts.PLANNER_SYSTEM:
        return ("Justification: the generalist can add.\nContext: none\nSub-Goal: add two and two\n"
                "Tool Name: Generalist_Solution_Generator_Tool")
    if system == prompts.EXECUTOR_SYSTEM:
        return '{"tool_name": "Generalist_Solution_Generator_Tool", "arguments": {"query": "2+2?"}}'
    if system == prompts.VERIFIER_SYSTEM:
        return "The result answers it.\nConclusion: STOP"
    if system == prompts.GENERATOR_SYSTEM:
        return "Two and two make four.\n<answer>4</answer>"
    return "It is 4."  # the generalist tool's own call (a bare user message)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def run_solve(*args):
    return subprocess.run([sys.executable, "-m", "agentflow_jax.solve", *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})


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


def test_solve_usage_errors(server):
    out = run_solve("--tools=generalist", "What?")
    assert out.returncode != 0 and "exactly one of --model=DIR or --engine=SPEC" in out.stderr
    out = run_solve(f"--engine=openai:{server},toy", "--tools=search", "What?")
    assert out.returncode != 0 and "--search_corpus or --retrieval_url" in out.stderr
    out = run_solve(f"--engine=openai:{server},toy", "--tools=teleport", "What?")
    assert out.returncode != 0 and "unknown tool name(s) ['teleport']" in out.stderr


def test_generate_default_runs_offline():
    out = subprocess.run([sys.executable, "-m", "agentflow_jax.generate", "--max_new_tokens=4", "--n=2"],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "--- sample 0 (" in out.stdout and "--- sample 1 (" in out.stdout
    assert "from a " in out.stdout and "-token prompt" in out.stdout
