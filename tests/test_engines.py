"""Tests of the engines package: ScriptedEngine, OpenAIChatEngine (against a local HTTP server), engine specs."""

import http.server
import json
import socket
import threading
import time
from typing import Callable

import pytest

from agentflow_jax.agent import prompts
from agentflow_jax.engines import (EngineError, Generation, GenerationRequest, ScriptedEngine, engine_from_spec,
                                   prompt_contains)
from agentflow_jax.engines.openai_compat import OpenAIChatEngine


def request(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), **sampling)


def chat_answer(content: str, finish_reason: str = "stop") -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": finish_reason}]}).encode()


# ----------------------------------------------------------------------------- scripted engine

def test_scripted_engine_from_function_records_requests():
    engine = ScriptedEngine(lambda r: r.messages[-1]["content"].upper())
    batch = [request("a"), request("b")]
    assert engine.generate(batch) == [Generation("A"), Generation("B")]
    assert engine.requests == tuple(batch)


def test_scripted_engine_passes_generations_through():
    generation = Generation("x", finish_reason="length", token_ids=(1, 2), logprobs=(-0.5, -0.25))
    assert ScriptedEngine(lambda r: generation).generate([request("q")]) == [generation]


def test_scripted_engine_queues_keyed_by_module_prompt():
    planner = GenerationRequest(messages=({"role": "system", "content": prompts.PLANNER_SYSTEM},
                                          {"role": "user", "content": "plan"}))
    verifier = GenerationRequest(messages=({"role": "system", "content": prompts.VERIFIER_SYSTEM},
                                           {"role": "user", "content": "verify"}))
    engine = ScriptedEngine.from_queues([
        (prompt_contains(prompts.PLANNER_SYSTEM), ["plan 1", "plan 2"]),
        (prompt_contains(prompts.VERIFIER_SYSTEM), ["Conclusion: STOP"]),
    ])
    texts = [g.text for g in engine.generate([planner, verifier, planner])]
    assert texts == ["plan 1", "Conclusion: STOP", "plan 2"]
    with pytest.raises(EngineError, match="queue 0 is exhausted"):
        engine.generate([planner])
    with pytest.raises(EngineError, match="no queue accepts request 'hello'"):
        engine.generate([request("hello")])


def test_scripted_engine_is_thread_safe():
    counter = iter(range(10_000))
    engine = ScriptedEngine(lambda r: str(next(counter)))
    results: list[str] = []
    results_lock = threading.Lock()

    def worker():
        texts = [g.text for g in engine.generate([request("x")] * 50)]
        assert texts == [str(int(texts[0]) + i) for i in range(50)]  # a batch is answered as a block
        with results_lock:
            results.extend(texts)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(int, results)) == list(range(200))
    assert len(engine.requests) == 200


# ----------------------------------------------------------------------------- local OpenAI-compatible server

Reply = tuple[int, bytes, float]  # status, body, delay before answering (s)


class FakeChatServer:
    """A /v1/chat/completions server on 127.0.0.1 answering with `respond(request_json) -> Reply`."""

    def __init__(self, respond: Callable[[dict], Reply]):
        self.respond = respond
        self.received: list[tuple[str, dict, dict]] = []  # (path, headers, json body)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.received.append((self.path, dict(self.headers), body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, delay = server.respond(body)
                    time.sleep(delay)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond: Callable[[dict], Reply]) -> FakeChatServer:
        servers.append(FakeChatServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def replies_in_order(*replies: Reply) -> Callable[[dict], Reply]:
    """Answers with `replies` one after another, repeating the last one."""
    pending = list(replies)
    return lambda body: pending.pop(0) if len(pending) > 1 else pending[0]


def client(server: FakeChatServer, **options) -> OpenAIChatEngine:
    options = {"model": "tiny", "api_key": "", "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01} | options
    return OpenAIChatEngine(server.base_url, **options)


def test_openai_success_sends_chat_body(serve):
    server = serve(replies_in_order((200, chat_answer("Hello!", "length"), 0.0)))
    out = client(server).generate([request("Hi", max_new_tokens=7, temperature=0.7, top_p=0.99)])
    assert out == [Generation("Hello!", finish_reason="length")]
    path, headers, body = server.received[0]
    assert path == "/v1/chat/completions"
    assert body == {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7,
                    "temperature": 0.7, "top_p": 0.99}
    assert "Authorization" not in headers


def test_openai_retries_500_then_succeeds(serve):
    server = serve(replies_in_order((500, b"overloaded", 0.0), (200, chat_answer("ok"), 0.0)))
    assert client(server).generate([request("q")]) == [Generation("ok")]
    assert len(server.received) == 2


def test_openai_retries_429(serve):
    server = serve(replies_in_order((429, b"slow down", 0.0), (200, chat_answer("ok"), 0.0)))
    assert client(server).generate([request("q")])[0].text == "ok"
    assert len(server.received) == 2


def test_openai_gives_up_after_max_retries(serve):
    server = serve(replies_in_order((503, b"down for maintenance", 0.0)))
    url = server.base_url + "/chat/completions"
    with pytest.raises(EngineError) as error:
        client(server, max_retries=2).generate([request("q")])
    assert str(error.value) == (f"POST {url} returned HTTP 503: 'down for maintenance' "
                                "(gave up after 3 attempt(s))")
    assert len(server.received) == 3


def test_openai_400_is_not_retried(serve):
    server = serve(replies_in_order((400, b'{"error": "max_tokens too large"}', 0.0)))
    with pytest.raises(EngineError, match=r"returned HTTP 400: '\{\"error\": \"max_tokens too large\"\}'"):
        client(server).generate([request("q")])
    assert len(server.received) == 1


def test_openai_timeout_is_retried_then_reported(serve):
    server = serve(replies_in_order((200, chat_answer("late"), 1.0)))
    with pytest.raises(EngineError, match=r"timed out after 0.2 s \(gave up after 2 attempt\(s\)\)"):
        client(server, timeout_s=0.2, max_retries=1).generate([request("q")])
    assert len(server.received) == 2


@pytest.mark.parametrize("payload", [b"<html>not json</html>", b'{"choices": []}',
                                     b'{"choices": [{"message": {}}]}',
                                     b'{"choices": [{"message": {"content": null}}]}'])
def test_openai_malformed_answer_is_an_error_without_retry(serve, payload):
    server = serve(replies_in_order((200, payload, 0.0)))
    with pytest.raises(EngineError, match="malformed answer|is not text"):
        client(server).generate([request("q")])
    assert len(server.received) == 1


def test_openai_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = OpenAIChatEngine(f"http://127.0.0.1:{port}/v1", "tiny", api_key="", max_retries=1, backoff_s=0.01)
    with pytest.raises(EngineError, match=r"failed: ConnectError: .*[Cc]onnection refused.*gave up after 2 attempt"):
        engine.generate([request("q")])


def test_openai_concurrent_batch_keeps_order(serve):
    def echo_slowly(body: dict) -> Reply:
        n = int(body["messages"][-1]["content"])
        return 200, chat_answer(f"echo {n}"), 0.05 * (6 - n)  # later requests finish first

    server = serve(echo_slowly)
    out = client(server, max_concurrency=6).generate([request(str(n)) for n in range(6)])
    assert [g.text for g in out] == [f"echo {n}" for n in range(6)]
    assert server.max_in_flight >= 2


def test_openai_sends_key_as_bearer_and_never_reveals_it(serve):
    server = serve(replies_in_order((401, b"bad key sk-secret-123 rejected", 0.0)))
    engine = client(server, api_key="sk-secret-123")
    with pytest.raises(EngineError) as error:
        engine.generate([request("q")])
    assert server.received[0][1]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in str(error.value) and "bad key *** rejected" in str(error.value)
    assert "sk-secret" not in repr(engine)


def test_openai_key_falls_back_to_environment(serve, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    server = serve(replies_in_order((200, chat_answer("ok"), 0.0)))
    OpenAIChatEngine(server.base_url, "tiny").generate([request("q")])
    assert server.received[0][1]["Authorization"] == "Bearer sk-from-env"


def test_openai_top_k_needs_vllm_extras(serve):
    server = serve(replies_in_order((200, chat_answer("ok"), 0.0)))
    with pytest.raises(ValueError, match="vllm_extras=True"):
        client(server).generate([request("q", top_k=20)])
    assert server.received == []
    client(server, vllm_extras=True).generate([request("q", top_k=20)])
    assert server.received[0][2]["top_k"] == 20


def test_openai_rejects_url_without_scheme():
    with pytest.raises(ValueError, match="http://"):
        OpenAIChatEngine("127.0.0.1:8000/v1", "tiny")


# ----------------------------------------------------------------------------- engine specs

def test_engine_from_spec_openai():
    engine = engine_from_spec("openai:http://127.0.0.1:8000/v1/,Qwen/Qwen2.5-7B-Instruct", timeout_s=30.0)
    assert isinstance(engine, OpenAIChatEngine)
    assert engine.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert engine.model == "Qwen/Qwen2.5-7B-Instruct"
    assert engine.timeout_s == 30.0


@pytest.mark.parametrize("spec, message", [
    ("vllm:/tmp/ckpt", "unknown engine spec 'vllm:/tmp/ckpt'"),
    ("jax:", "needs 'jax:DIR'"),
    ("http://127.0.0.1:8000/v1", "unknown engine spec"),
    ("openai:http://127.0.0.1:8000/v1", "needs 'openai:URL,MODEL'"),
    ("openai:http://127.0.0.1:8000/v1,", "needs 'openai:URL,MODEL'"),
])
def test_engine_from_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        engine_from_spec(spec)


def test_openai_sends_the_frequency_penalty_only_when_set(serve):
    server = serve(replies_in_order((200, chat_answer("ok"), 0.0)))
    client(server).generate([request("q", frequency_penalty=1.2), request("r")])
    bodies = sorted((body for _, _, body in server.received), key=lambda b: b["messages"][0]["content"])
    assert bodies[0]["frequency_penalty"] == 1.2 and "frequency_penalty" not in bodies[1]
