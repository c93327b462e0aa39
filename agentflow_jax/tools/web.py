"""Tools that use the web: Google search, Wikipedia retrieval, and question answering over a web page.

Every endpoint is a constructor argument (tests point them at a local server) and every request has
a timeout. Without an API key, without network, or on a bad reply, `run` raises an error whose
message says what to fix; `Toolbox.execute` turns it into an error `ToolResult`.

Ranking of page chunks (Wikipedia and Web RAG) is BM25 (`search.rank_passages`): no embedding
model is available offline, and BM25 needs no weights. Pages are split into chunks of 200 words
with 20 words of overlap, as in the reference.
"""

from __future__ import annotations

import html
import html.parser
import os
import re
import urllib.parse
from typing import Any, Sequence

from agentflow_jax.engines import Engine, GenerationRequest
from agentflow_jax.tools.base import Tool, ToolArgument, ToolMetadata
from agentflow_jax.tools.http_client import HttpRequestError, fetch, fetch_json
from agentflow_jax.tools.search import rank_passages

SERPER_URL = "https://google.serper.dev/search"
GOOGLE_CSE_URL = "https://www.googleapis.com/customsearch/v1"
WIKIPEDIA_API_URL = "https://en.wikipedia.org/w/api.php"
WIKIPEDIA_PAGE_URL = "https://en.wikipedia.org/wiki/"


class MissingApiKeyError(RuntimeError):
    """A tool that needs an API key was called without one."""


def chunk_words(text: str, size: int = 200, overlap: int = 20) -> list[str]:
    """Splits `text` into chunks of `size` words, each sharing `overlap` words with the previous."""
    if not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got overlap={overlap}, size={size}")
    words = text.split()
    if not words:
        return []
    starts = range(0, max(len(words) - overlap, 1), size - overlap)
    return [" ".join(words[s:s + size]) for s in starts]


# ---------------------------------------------------------------------------------------------
# Ground_Google_Search_Tool
# ---------------------------------------------------------------------------------------------

GOOGLE_SEARCH_METADATA = ToolMetadata(
    name="Ground_Google_Search_Tool",
    description="Searches the web with Google and returns the top results with their URLs and snippets.",
    inputs=(ToolArgument("query", "str", "The search query: keywords or a short question."),),
    output_type="str - a direct answer when Google shows one, then numbered results (title, URL, snippet).",
    demo_commands=(
        ('{"query": "capital of Australia"}', "Look up a simple fact."),
        ('{"query": "2024 Nobel Prize in Physics winners"}', "Find recent information."),
    ),
    limitations=("Returns snippets, not whole pages; results can be outdated, wrong or missing; needs "
                 "an API key and network access."),
    best_practices=("Use specific keywords; check facts against more than one result; to read a page "
                    "in depth, pass its URL to Web_RAG_Search_Tool."),
)


class GoogleSearchTool(Tool):
    """Web search through Serper (SERPER_API_KEY) or Google Programmable Search (GOOGLE_API_KEY +
    GOOGLE_CSE_ID). Keys not given to the constructor are read from the environment."""

    metadata = GOOGLE_SEARCH_METADATA

    def __init__(self, *, serper_api_key: str | None = None, google_api_key: str | None = None,
                 google_cse_id: str | None = None, serper_url: str = SERPER_URL,
                 google_cse_url: str = GOOGLE_CSE_URL, num_results: int = 5, timeout_s: float = 15.0):
        self.serper_api_key = serper_api_key or os.environ.get("SERPER_API_KEY")
        self.google_api_key = google_api_key or os.environ.get("GOOGLE_API_KEY")
        self.google_cse_id = google_cse_id or os.environ.get("GOOGLE_CSE_ID")
        self.serper_url = serper_url
        self.google_cse_url = google_cse_url
        self.num_results = num_results
        self.timeout_s = timeout_s

    def run(self, query: str) -> str:
        if self.serper_api_key:
            answer, results = self._serper(query)
        elif self.google_api_key and self.google_cse_id:
            answer, results = None, self._google_cse(query)
        else:
            raise MissingApiKeyError(
                "Ground_Google_Search_Tool has no API key: set SERPER_API_KEY (https://serper.dev) or "
                "both GOOGLE_API_KEY and GOOGLE_CSE_ID (Google Programmable Search), or remove the tool")
        return _format_web_results(query, answer, results)

    def _serper(self, query: str) -> tuple[str | None, list[dict[str, str]]]:
        reply = fetch_json(self.serper_url, service="Serper", timeout_s=self.timeout_s, method="POST",
                           json_body={"q": query, "num": self.num_results},
                           headers={"X-API-KEY": self.serper_api_key})
        organic = _expect_list(reply, "organic", "Serper")
        return _serper_answer(reply.get("answerBox")), organic[:self.num_results]

    def _google_cse(self, query: str) -> list[dict[str, str]]:
        reply = fetch_json(self.google_cse_url, service="Google Custom Search", timeout_s=self.timeout_s,
                           params={"key": self.google_api_key, "cx": self.google_cse_id, "q": query,
                                   "num": min(self.num_results, 10)})
        return _expect_list(reply, "items", "Google Custom Search")[:self.num_results]


def _serper_answer(box: Any) -> str | None:
    """The direct answer of a Serper "answerBox" (with its source link), if there is one."""
    if not isinstance(box, dict):
        return None
    answer = box.get("answer") or box.get("snippet")
    if answer and box.get("link"):
        return f"{answer} (source: {box['link']})"
    return answer


def _expect_list(reply: Any, key: str, service: str) -> list[dict[str, Any]]:
    """reply[key] as a list of objects ([] when absent); a clear error for any other shape."""
    if not isinstance(reply, dict):
        raise HttpRequestError(f"{service} returned {type(reply).__name__} instead of a JSON object")
    items = reply.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise HttpRequestError(f'{service} returned an unexpected "{key}" field: {str(items)[:200]!r}')
    return items


def _format_web_results(query: str, answer: str | None, results: Sequence[dict[str, Any]]) -> str:
    lines = [f'Google results for "{query}":']
    if answer:
        lines.append(f"Direct answer: {answer}")
    if not results and not answer:
        lines.append("No results were found; try fewer or different keywords.")
    for rank, item in enumerate(results, start=1):
        lines.append(f"[{rank}] {item.get('title', '(no title)')}\nURL: {item.get('link', '(no URL)')}\n"
                     f"{item.get('snippet', '').strip()}")
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Wikipedia_RAG_Search_Tool
# ---------------------------------------------------------------------------------------------

WIKIPEDIA_METADATA = ToolMetadata(
    name="Wikipedia_RAG_Search_Tool",
    description=("Searches Wikipedia, reads the top matching articles, and returns the passages of "
                 "each article that are most relevant to the query."),
    inputs=(ToolArgument("query", "str", "What to look up: an entity name plus the fact wanted."),),
    output_type="str - numbered articles (title and URL) with their most relevant passages.",
    demo_commands=(
        ('{"query": "Marie Curie second Nobel Prize"}', "Read about a person's achievement."),
        ('{"query": "Danube river length"}', "Find a specific figure in an article."),
    ),
    limitations=("English Wikipedia only; passages are chosen by keyword overlap, so the answer can "
                 "be in a part of the article that is not shown; needs network access."),
    best_practices=("Name the entity explicitly; ask for one fact per call; follow up with "
                    "Web_RAG_Search_Tool on the article URL for a question about a long article."),
)


class WikipediaSearchTool(Tool):
    """MediaWiki search, then plain-text extracts of the top pages, ranked into relevant passages."""

    metadata = WIKIPEDIA_METADATA

    def __init__(self, *, api_url: str = WIKIPEDIA_API_URL, page_url: str = WIKIPEDIA_PAGE_URL,
                 num_pages: int = 3, passages_per_page: int = 2, timeout_s: float = 15.0):
        self.api_url = api_url
        self.page_url = page_url
        self.num_pages = num_pages
        self.passages_per_page = passages_per_page
        self.timeout_s = timeout_s

    def run(self, query: str) -> str:
        found = self._search(query)
        if not found:
            return f'No Wikipedia article matched "{query}"; try other keywords.'
        pages = [(item["title"], self._extract(item["title"]) or _strip_tags(item.get("snippet", "")))
                 for item in found]
        return self._format(query, pages)

    def _api(self, params: dict[str, Any]) -> dict[str, Any]:
        reply = fetch_json(self.api_url, service="the Wikipedia API", timeout_s=self.timeout_s,
                           params={**params, "format": "json", "formatversion": 2})
        if not isinstance(reply, dict) or "error" in reply:
            detail = reply.get("error") if isinstance(reply, dict) else reply
            raise HttpRequestError(f"the Wikipedia API reported an error: {str(detail)[:200]}")
        return reply

    def _search(self, query: str) -> list[dict[str, Any]]:
        reply = self._api({"action": "query", "list": "search", "srsearch": query,
                           "srlimit": self.num_pages})
        return _expect_list(reply.get("query", {}), "search", "the Wikipedia API")[:self.num_pages]

    def _extract(self, title: str) -> str:
        reply = self._api({"action": "query", "prop": "extracts", "explaintext": 1, "redirects": 1,
                           "titles": title})
        pages = reply.get("query", {}).get("pages", [])
        pages = list(pages.values()) if isinstance(pages, dict) else pages  # formatversion 1 or 2
        return "\n".join(p.get("extract", "") for p in pages if isinstance(p, dict)).strip()

    def _format(self, query: str, pages: list[tuple[str, str]]) -> str:
        chunks = [(page, chunk) for page, (_, text) in enumerate(pages) for chunk in chunk_words(text)]
        ranked = rank_passages(query, [c for _, c in chunks], len(chunks))
        best: dict[int, list[str]] = {page: [] for page in range(len(pages))}
        for i, _ in ranked:
            page, chunk = chunks[i]
            if len(best[page]) < self.passages_per_page:
                best[page].append(chunk)
        blocks = []
        for page, (title, _) in enumerate(pages):
            url = self.page_url + urllib.parse.quote(title.replace(" ", "_"))
            passages = "\n".join(f"- {p}" for p in best[page]) or "- (no text available)"
            blocks.append(f"[{page + 1}] {title} ({url})\n{passages}")
        return "\n\n".join(blocks)


def _strip_tags(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# ---------------------------------------------------------------------------------------------
# Web_RAG_Search_Tool
# ---------------------------------------------------------------------------------------------

WEB_RAG_METADATA = ToolMetadata(
    name="Web_RAG_Search_Tool",
    description=("Reads one web page, finds the passages most relevant to a question, and answers the "
                 "question from those passages with a language model."),
    inputs=(ToolArgument("query", "str", "The question to answer from the page."),
            ToolArgument("url", "str", "The page's full http:// or https:// address.")),
    output_type="str - the answer, the source URL, and the passages it was based on.",
    demo_commands=(
        ('{"query": "When was the bridge opened?", "url": "https://en.wikipedia.org/wiki/Golden_Gate_Bridge"}',
         "Answer a question from a known page."),
    ),
    limitations=("Reads HTML and plain-text pages only (no PDFs or pages built by JavaScript); "
                 "passages are chosen by keyword overlap; the answer is only as good as the page."),
    best_practices=("Use with a URL found by a search tool; ask one specific question per call; "
                    "check the quoted passages when the answer matters."),
)

_RAG_PROMPT = """Answer the question using only the passages below, which come from {url}.
If the passages do not contain the answer, say that the page does not contain it.

Question: {query}

Passages:
{passages}

Answer:"""

_SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "head"})
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article",
                         "h1", "h2", "h3", "h4", "h5", "h6", "header", "footer", "blockquote", "pre"})


class _TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML document; blocks become line breaks, scripts and styles vanish."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)


def _decode(body: bytes, content_type: str) -> str:
    """Decodes with the charset the server declared, UTF-8 when none (or an unknown one) is given."""
    declared = re.search(r"charset=[\"']?([\w.:-]+)", content_type)
    try:
        return body.decode(declared.group(1) if declared else "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def html_to_text(document: str) -> str:
    """The visible text of an HTML document, one block per line, whitespace collapsed."""
    parser = _TextExtractor()
    parser.feed(document)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


class WebRagTool(Tool):
    """Fetches `url`, ranks its 200-word chunks against `query` with BM25, answers with the engine."""

    metadata = WEB_RAG_METADATA

    def __init__(self, engine: Engine, *, top_chunks: int = 4, timeout_s: float = 15.0,
                 max_page_bytes: int = 5_000_000, max_new_tokens: int = 512):
        self.engine = engine
        self.top_chunks = top_chunks
        self.timeout_s = timeout_s
        self.max_page_bytes = max_page_bytes
        self.max_new_tokens = max_new_tokens

    def run(self, query: str, url: str) -> str:
        text = self._page_text(url)
        chunks = chunk_words(text)
        if not chunks:
            raise ValueError(f"the page at {url} has no readable text; try another URL")
        best = [chunks[i] for i, _ in rank_passages(query, chunks, self.top_chunks)]
        passages = "\n\n".join(f"[{n}] {c}" for n, c in enumerate(best, start=1))
        prompt = _RAG_PROMPT.format(url=url, query=query, passages=passages)
        request = GenerationRequest(messages=({"role": "user", "content": prompt},),
                                    max_new_tokens=self.max_new_tokens, temperature=0.0)
        (generation,) = self.engine.generate([request])
        return f"Answer: {generation.text.strip()}\nSource: {url}\n\nPassages used:\n{passages}"

    def _page_text(self, url: str) -> str:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"url must be a full http:// or https:// address, got {url!r}")
        body, content_type = fetch(url, service="the web page", timeout_s=self.timeout_s,
                                   max_bytes=self.max_page_bytes)
        mime = content_type.split(";")[0].strip().lower()
        text = _decode(body, content_type)
        if mime in ("text/html", "application/xhtml+xml") or (not mime and "<html" in text[:1000].lower()):
            return html_to_text(text)
        if mime.startswith("text/") or mime == "application/json":
            return text
        raise ValueError(f"the page at {url} is {mime or 'of unknown type'}, which this tool cannot "
                         "read; give the URL of an HTML or plain-text page")
