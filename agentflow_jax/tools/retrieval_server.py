"""A Search-R1 compatible retrieval server over a local BM25 index.

    python -m agentflow_jax.tools.retrieval_server --corpus=PATH --port=8000 [--host=127.0.0.1]

`POST /retrieve` with `{"queries": [str], "topk": int | null, "return_scores": bool}` answers
`{"result": [[item, ...], ...]}`, one list per query, best first. As in Search-R1's server, an item
is `{"document": {"id", "contents"}, "score": float}` when `return_scores` is true and the bare
document `{"id", "contents"}` when it is false (the default); a missing or null `topk` means the
server's `--topk`. Unknown fields are ignored. A malformed request gets HTTP 400 with
`{"error": "..."}`; other paths get 404. Requests are served concurrently (one thread each).
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import threading
from typing import Any

from agentflow_jax.tools.search import BM25Index, Hit

_log = logging.getLogger(__name__)
MAX_BODY_BYTES = 10 * 1024 * 1024


class BadRequest(ValueError):
    """The request body does not follow the /retrieve format."""


def parse_retrieve_request(body: bytes, *, default_topk: int, max_topk: int,
                           max_queries: int) -> tuple[list[str], int, bool]:
    """Validates a /retrieve body; returns (queries, topk, return_scores) or raises BadRequest."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest('the body must be a JSON object like {"queries": ["..."], "topk": 3}')
    queries = request.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest('"queries" must be a list of strings')
    if len(queries) > max_queries:
        raise BadRequest(f'"queries" has {len(queries)} entries; send at most {max_queries} per request')
    topk = request.get("topk")
    topk = default_topk if topk is None else topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= max_topk:
        raise BadRequest(f'"topk" must be an integer from 1 to {max_topk}, got {request.get("topk")!r}')
    return_scores = request.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f'"return_scores" must be true or false, got {return_scores!r}')
    return queries, topk, return_scores


def retrieve_response(hits: list[list[Hit]], return_scores: bool) -> dict[str, Any]:
    """The Search-R1 response body for the hits of each query."""
    def item(hit: Hit) -> dict[str, Any]:
        document = {"id": hit.id, "contents": hit.contents}
        return {"document": document, "score": hit.score} if return_scores else document
    return {"result": [[item(h) for h in query_hits] for query_hits in hits]}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_HTTPServer"

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /retrieve"})
            return
        try:
            body = self._read_body()
            queries, topk, return_scores = parse_retrieve_request(
                body, default_topk=self.server.default_topk, max_topk=self.server.max_topk,
                max_queries=self.server.max_queries)
        except BadRequest as e:
            self._send(400, {"error": str(e)})
            return
        hits = self.server.index.search(queries, min(topk, len(self.server.index)))
        self._send(200, retrieve_response(hits, return_scores))

    def do_GET(self) -> None:  # noqa: N802
        self._send(404, {"error": "this server answers POST /retrieve only"})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        _log.debug("%s - %s", self.address_string(), format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], index: BM25Index, default_topk: int, max_topk: int,
                 max_queries: int):
        super().__init__(address, _Handler)
        self.index = index
        self.default_topk = default_topk
        self.max_topk = max_topk
        self.max_queries = max_queries


class RetrievalServer:
    """The /retrieve server bound to (host, port); port 0 picks a free port (see `.port`)."""

    def __init__(self, index: BM25Index, *, host: str = "127.0.0.1", port: int = 0, default_topk: int = 3,
                 max_topk: int = 100, max_queries: int = 1024):
        self._httpd = _HTTPServer((host, port), index, default_topk, max_topk, max_queries)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The full /retrieve endpoint URL."""
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}/retrieve"

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def start(self) -> "RetrievalServer":
        """Serves on a background daemon thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="retrieval-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops serving and releases the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="JSON-lines corpus; its BM25 index is built if needed")
    parser.add_argument("--index_dir", default=None, help="where the index lives (default: <corpus>.bm25)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="passages per query when a request gives none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    index = BM25Index.load_or_build(args.corpus, args.index_dir)
    server = RetrievalServer(index, host=args.host, port=args.port, default_topk=args.topk)
    _log.info("serving %d passages at %s", len(index), server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
