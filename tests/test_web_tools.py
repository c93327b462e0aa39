"""Web tools against a local HTTP server that replays recorded-format API replies, plus the registry.

The server imitates Serper (`organic`, `answerBox`), Google Custom Search (`items`), the MediaWiki
API (`query.search`, then `query.pages[].extract`) and an HTML page; it also serves error statuses,
a slow endpoint, malformed JSON and a PDF. Every failure must surface as an error ToolResult
through `Toolbox.execute`, with a message that says what went wrong.
"""

import http.server
import json
import threading
import time
import urllib.parse

import pytest

from agentflow_jax.engines import Generation
from agentflow_jax.tools import build_toolbox
from agentflow_jax.tools.base import ToolCall, Toolbox
from agentflow_jax.tools.web import (GoogleSearchTool, WebRagTool, WikipediaSearchTool, chunk_words,
                                     html_to_text)

FILLER = " ".join(f"filler{i} words about unrelated topics" for i in range(120))  # 600 words
FACT = "Velmora was founded in 1843 by river traders from the northern hills."
ARTICLE = f"{FILLER} {FACT} {FILLER}"
PAGE = f"""<!doctype html><html><head><title>Velmora</title><style>body {{color: red}}</style>
<script>var secret = "script text must not appear";</script></head>
<body><h1>Velmora</h1><p>{FILLER}</p><p>{FACT}</p><div>{FILLER}</div></body></html>"""

SERPER_REPLY = {
    "searchParameters": {"q": "velmora founded", "type": "search", "engine": "google"},
    "answerBox": {"title": "Velmora", "answer": "1843", "link": "https://example.org/velmora"},
    "organic": [
        {"title": "Velmora - history", "link": "https://example.org/velmora", "snippet": FACT, "position": 1},
        {"title": "Velmora travel guide", "link": "https://travel.example/velmora", "snippet": "Visit Velmora.",
         "position": 2},
    ],
}
CSE_REPLY = {
    "kind": "customsearch#search",
    "items": [{"kind": "customsearch#result", "title": "Velmora (city)", "link": "https://cse.example/velmora",
               "snippet": "A city founded in 1843."}],
}


class _FakeWeb(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, dict(self.headers), body))
        if self.path == "/serper/search":
            if self.headers.get("X-API-KEY") != "test-key":
                return self._reply(403, {"message": "Unauthorized.", "statusCode": 403})
            return self._reply(200, SERPER_REPLY)
        if self.path == "/malformed":
            return self._reply(200, b'{"organic": [', "application/json")
        self._reply(404, {"error": "no such path"})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        self.requests.append((url.path, dict(self.headers), params))
        route = {
            "/cse": lambda: self._reply(200, CSE_REPLY),
            "/w/api.php": lambda: self._mediawiki(params),
            "/page.html": lambda: self._reply(200, PAGE.encode(), "text/html; charset=utf-8"),
            "/slow-page.html": lambda: (time.sleep(0.5), self._reply(200, PAGE.encode(), "text/html"))[1],
            "/timeout": lambda: (time.sleep(3), self._reply(200, {}))[1],
            "/malformed": lambda: self._reply(200, b'{"organic": [', "application/json"),
            "/doc.pdf": lambda: self._reply(200, b"%PDF-1.4 binary", "application/pdf"),
        }.get(url.path)
        if route is None and url.path.startswith("/status/"):
            code = int(url.path.rsplit("/", 1)[1])
            return self._reply(code, {"error": {"code": code, "message": "recorded failure"}})
        if route is None:
            return self._reply(404, {"error": "no such path"})
        route()

    def _mediawiki(self, params: dict) -> None:
        if params.get("list") == "search":
            if params["srsearch"] == "nothing matches":
                return self._reply(200, {"batchcomplete": True, "query": {"searchinfo": {"totalhits": 0},
                                                                          "search": []}})
            return self._reply(200, {"batchcomplete": True, "query": {"searchinfo": {"totalhits": 2}, "search": [
                {"ns": 0, "title": "Velmora", "pageid": 11, "snippet": '<span class="searchmatch">Velmora</span> city'},
                {"ns": 0, "title": "Velmora River", "pageid": 12, "snippet": "A river near the city."},
            ]}})
        title = params["titles"]
        if title == "Velmora":  # formatversion=2 layout: pages is a list
            return self._reply(200, {"batchcomplete": True, "query": {"pages": [
                {"pageid": 11, "ns": 0, "title": "Velmora", "extract": ARTICLE}]}})
        # formatversion=1 layout: pages keyed by page id
        return self._reply(200, {"batchcomplete": "", "query": {"pages": {"12": {
            "pageid": 12, "ns": 0, "title": title, "extract": "The Velmora River is 240 km long."}}}})


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeWeb)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class ScriptedEngine:
    """Answers by prompt kind; records every request it saw."""

    def __init__(self):
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def generate(self, requests):
        out = []
        for request in requests:
            prompt = request.messages[-1]["content"]
            with self._lock:
                self.prompts.append(prompt)
            if "Write a Python 3 program" in prompt:
                out.append(Generation("```python\nprint('product =', 4817 * 36)\n```"))
            elif "Passages:" in prompt:
                out.append(Generation("It was founded in 1843."))
            else:
                out.append(Generation("A generalist guess."))
        return out


@pytest.fixture
def no_keys(monkeypatch):
    for key in ("SERPER_API_KEY", "GOOGLE_API_KEY", "GOOGLE_CSE_ID"):
        monkeypatch.delenv(key, raising=False)


def _execute(tool, **arguments):
    return Toolbox([tool], call_timeout_s=20).execute(ToolCall(tool.metadata.name, arguments))


def test_chunks_have_200_words_with_20_overlap():
    words = [f"w{i}" for i in range(381)]
    chunks = [c.split() for c in chunk_words(" ".join(words))]
    assert [len(c) for c in chunks] == [200, 200, 21]
    assert chunks[1][:20] == chunks[0][-20:] and chunks[2][0] == "w360"
    assert chunk_words("") == [] and chunk_words("a b") == ["a b"]


def test_html_to_text_keeps_visible_text_only():
    text = html_to_text(PAGE)
    assert FACT in text and text.startswith("Velmora\n")
    assert "script text" not in text and "color: red" not in text


def test_google_search_through_serper(web, no_keys):
    tool = GoogleSearchTool(serper_api_key="test-key", serper_url=f"{web}/serper/search", num_results=2)
    result = _execute(tool, query="velmora founded")
    assert result.ok, result.error
    assert "Direct answer: 1843 (source: https://example.org/velmora)" in result.output
    assert "[1] Velmora - history\nURL: https://example.org/velmora\n" + FACT in result.output
    assert "[2] Velmora travel guide\nURL: https://travel.example/velmora" in result.output
    path, headers, body = [r for r in _FakeWeb.requests if r[0] == "/serper/search"][-1]
    assert body == {"q": "velmora founded", "num": 2}


def test_google_search_through_custom_search(web, no_keys):
    tool = GoogleSearchTool(google_api_key="g-key", google_cse_id="cx-1", google_cse_url=f"{web}/cse")
    result = _execute(tool, query="velmora")
    assert result.ok, result.error
    assert "[1] Velmora (city)\nURL: https://cse.example/velmora\nA city founded in 1843." in result.output
    _, _, params = [r for r in _FakeWeb.requests if r[0] == "/cse"][-1]
    assert params["key"] == "g-key" and params["cx"] == "cx-1" and params["q"] == "velmora"


def test_google_search_without_a_key_is_a_clear_error(no_keys):
    result = _execute(GoogleSearchTool(), query="anything")
    assert not result.ok
    assert "MissingApiKeyError" in result.error and "SERPER_API_KEY" in result.error


def test_google_search_with_a_rejected_key(web, no_keys):
    tool = GoogleSearchTool(serper_api_key="wrong", serper_url=f"{web}/serper/search")
    result = _execute(tool, query="velmora")
    assert not result.ok and "HTTP 403" in result.error and "API key" in result.error
    assert "wrong" not in result.error


def test_api_key_is_not_leaked_in_error_messages(web, no_keys):
    tool = GoogleSearchTool(google_api_key="very-secret-key", google_cse_id="cx", google_cse_url=f"{web}/status/500")
    result = _execute(tool, query="velmora")
    assert not result.ok and "HTTP 500" in result.error and "very-secret-key" not in result.error


def test_wikipedia_returns_the_relevant_passage_of_each_page(web):
    tool = WikipediaSearchTool(api_url=f"{web}/w/api.php", passages_per_page=1)
    result = _execute(tool, query="When was Velmora founded?")
    assert result.ok, result.error
    first, second = result.output.split("\n\n")
    assert first.startswith("[1] Velmora (https://en.wikipedia.org/wiki/Velmora)\n- ")
    assert FACT in first and first.count("\n- ") == 1
    assert second == "[2] Velmora River (https://en.wikipedia.org/wiki/Velmora_River)\n- The Velmora River is 240 km long."


def test_wikipedia_without_matches(web):
    result = _execute(WikipediaSearchTool(api_url=f"{web}/w/api.php"), query="nothing matches")
    assert result.ok and result.output.startswith("No Wikipedia article matched")


def test_web_rag_answers_from_the_best_chunks(web):
    engine = ScriptedEngine()
    tool = WebRagTool(engine, top_chunks=2)
    result = _execute(tool, query="When was Velmora founded?", url=f"{web}/page.html")
    assert result.ok, result.error
    assert result.output.startswith(f"Answer: It was founded in 1843.\nSource: {web}/page.html\n")
    prompt = engine.prompts[-1]
    passages = prompt.split("Passages:\n")[1]
    assert passages.startswith("[1] ") and FACT in passages.split("\n\n[2] ")[0]
    assert "script text" not in prompt


@pytest.mark.parametrize("make_tool, arguments, message", [
    (lambda web: WebRagTool(ScriptedEngine()), lambda web: {"query": "q", "url": f"{web}/status/500"}, "HTTP 500"),
    (lambda web: WebRagTool(ScriptedEngine(), timeout_s=0.5), lambda web: {"query": "q", "url": f"{web}/timeout"},
     "did not answer within 0.5 s"),
    (lambda web: WebRagTool(ScriptedEngine()), lambda web: {"query": "q", "url": f"{web}/doc.pdf"},
     "application/pdf, which this tool cannot read"),
    (lambda web: WebRagTool(ScriptedEngine()), lambda web: {"query": "q", "url": "ftp://example.org/x"},
     "http:// or https://"),
    (lambda web: WebRagTool(ScriptedEngine()), lambda web: {"query": "q", "url": "http://127.0.0.1:9/x"},
     "could not reach the web page"),
    (lambda web: GoogleSearchTool(serper_api_key="k", serper_url=f"{web}/malformed"), lambda web: {"query": "q"},
     "not valid JSON"),
    (lambda web: WikipediaSearchTool(api_url=f"{web}/status/429"), lambda web: {"query": "q"}, "HTTP 429"),
    (lambda web: WikipediaSearchTool(api_url=f"{web}/malformed"), lambda web: {"query": "q"}, "not valid JSON"),
], ids=["http-500", "timeout", "pdf", "bad-scheme", "unreachable", "serper-malformed", "wiki-429", "wiki-malformed"])
def test_failures_become_clear_error_results(web, no_keys, make_tool, arguments, message):
    start = time.monotonic()
    result = _execute(make_tool(web), **arguments(web))
    assert not result.ok and message in result.error, result.error
    assert time.monotonic() - start < 3.0


def test_registry_builds_a_toolbox_that_runs_a_batch_concurrently(web, no_keys):
    engine = ScriptedEngine()
    toolbox = build_toolbox(["python", "generalist", "google", "wikipedia", "web_rag"], engine=engine, config={
        "call_timeout_s": 20,
        "python": {"wall_timeout_s": 5},
        "wikipedia": {"api_url": f"{web}/w/api.php"},
    })
    assert toolbox.names == ("Python_Code_Generator_Tool", "Generalist_Solution_Generator_Tool",
                             "Ground_Google_Search_Tool", "Wikipedia_RAG_Search_Tool", "Web_RAG_Search_Tool")
    slow_pages = [ToolCall("Web_RAG_Search_Tool", {"query": "founded", "url": f"{web}/slow-page.html"})] * 4
    calls = [ToolCall("Python_Code_Generator_Tool", {"query": "4817 times 36"}),
             ToolCall("Generalist_Solution_Generator_Tool", {"query": "guess"}),
             ToolCall("Ground_Google_Search_Tool", {"query": "no key configured"}),
             ToolCall("Wikipedia_RAG_Search_Tool", {"query": "Velmora founded"}),
             *slow_pages]
    start = time.monotonic()
    results = toolbox.execute_many(calls)
    elapsed = time.monotonic() - start
    assert [r.ok for r in results] == [True, True, False, True, True, True, True, True]
    assert "product = 173412" in results[0].output and "```python" in results[0].output
    assert results[1].output == "A generalist guess."
    assert "SERPER_API_KEY" in results[2].error
    assert results[3].output.startswith("[1] Velmora")
    assert all(r.output.startswith("Answer: It was founded in 1843.") for r in results[4:])
    assert elapsed < 1.8  # four 0.5 s page fetches would take 2 s one after another


def test_registry_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match=r"unknown tool name\(s\) \['pyhton'\]; valid names: \['python'"):
        build_toolbox(["pyhton"])
    with pytest.raises(ValueError, match="unknown key"):
        build_toolbox(["google"], config={"google": {"serper_key": "x"}})
    with pytest.raises(ValueError, match="pass engine="):
        build_toolbox(["generalist"])
    with pytest.raises(ValueError, match="corpus_path"):
        build_toolbox(["search"])
