"""Local retrieval over a Search-R1 style corpus: a BM25 index, in-process and HTTP search tools.

Corpus format (JSON lines, as wiki-18 in Search-R1): `{"id": ..., "contents": "\\"Title\\"\\ntext"}`;
the first line of `contents` is the title (quotes optional), the rest is the passage.

Tokenisation (`tokenize`, used for documents and queries alike): lowercase, split into runs of
letters and digits (Unicode-aware; punctuation and underscores separate words), drop a small fixed
list of English stopwords; no stemming. Scores are Lucene-style BM25 with k1=0.9, b=0.4 (the
Anserini/pyserini passage-retrieval defaults), computed by bm25s; ties break by corpus order, so
results are deterministic.

The index lives next to the corpus (`<corpus>.bm25/`): the bm25s matrices, the byte offset of each
corpus line (documents are read from the corpus on demand, so memory stays small), and a
fingerprint of the corpus (size, mtime, SHA-256 of its first MiB, tokenizer version, BM25
parameters). `BM25Index.load_or_build` rebuilds when the fingerprint no longer matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from typing import Any, Sequence

import numpy as np

from agentflow_jax.tools.base import Tool, ToolArgument, ToolMetadata
from agentflow_jax.tools.http_client import HttpRequestError, fetch_json

TOKENIZER_VERSION = 1
BM25_PARAMS = {"method": "lucene", "k1": 0.9, "b": 0.4}
_WORD = re.compile(r"[^\W_]+")
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())


def tokenize(text: str) -> list[str]:
    """Lowercased words of `text` (letters/digits), English stopwords removed."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def split_title(contents: str) -> tuple[str, str]:
    """("Title", "text") from a corpus `contents` field whose first line is the (quoted) title."""
    first, _, rest = contents.partition("\n")
    if not rest:
        return "", contents.strip()
    return first.strip().strip('"').strip(), rest.strip()


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved passage: the corpus id and contents, and its BM25 score."""

    id: Any
    contents: str
    score: float

    @property
    def title(self) -> str:
        return split_title(self.contents)[0]

    @property
    def text(self) -> str:
        return split_title(self.contents)[1]


def format_hits(hits: Sequence[Hit]) -> str:
    """Readable, numbered passages: "[1] Title: ...\\ntext", separated by blank lines."""
    if not hits:
        return "No matching passages were found."
    return "\n\n".join(f"[{rank}] Title: {hit.title or '(untitled)'}\n{hit.text}"
                       for rank, hit in enumerate(hits, start=1))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; equal scores keep index order. [N] -> [k]."""
    k = min(k, scores.shape[0])
    kth_best = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
    above = np.flatnonzero(scores > kth_best)
    tied = np.flatnonzero(scores == kth_best)[:k - above.shape[0]]
    pool = np.concatenate([above, tied])
    return pool[np.lexsort((pool, -scores[pool]))]


def rank_passages(query: str, passages: Sequence[str], k: int) -> list[tuple[int, float]]:
    """BM25 ranking of a small in-memory list of passages: [(passage index, score)], best first."""
    import bm25s  # imported lazily: bm25s loads JAX and SciPy at import time (about 0.5 s)

    if not passages:
        return []
    retriever = bm25s.BM25(**BM25_PARAMS)
    retriever.index([tokenize(p) or [""] for p in passages], show_progress=False)
    scores = _scores(retriever, tokenize(query))
    return [(int(i), float(scores[i])) for i in top_k(scores, k)]


def _scores(retriever: Any, query_tokens: list[str]) -> np.ndarray:
    """BM25 score of every document for one tokenised query (zeros when no word is known). [N]"""
    ids = retriever.get_tokens_ids(query_tokens)
    if not ids:
        return np.zeros(retriever.scores["num_docs"], dtype=np.float32)
    return retriever.get_scores_from_ids(ids)


class BM25Index:
    """A BM25 index over a JSON-lines corpus, saved beside it; documents are read on demand."""

    def __init__(self, corpus_path: str, retriever: Any, offsets: np.ndarray):
        self.corpus_path = corpus_path
        self._retriever = retriever
        self._offsets = offsets
        self._fd = os.open(corpus_path, os.O_RDONLY | os.O_CLOEXEC)

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    @staticmethod
    def default_dir(corpus_path: str) -> str:
        return corpus_path + ".bm25"

    @classmethod
    def build(cls, corpus_path: str, index_dir: str | None = None) -> "BM25Index":
        """Indexes the corpus and saves the index (replacing any old one) to `index_dir`."""
        import bm25s

        index_dir = index_dir or cls.default_dir(corpus_path)
        fingerprint = corpus_fingerprint(corpus_path)
        offsets, token_lists = _read_corpus(corpus_path)
        retriever = bm25s.BM25(**BM25_PARAMS)
        retriever.index(token_lists, show_progress=False)
        tmp_dir = f"{index_dir}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        retriever.save(tmp_dir, show_progress=False)
        np.save(os.path.join(tmp_dir, "offsets.npy"), offsets)
        with open(os.path.join(tmp_dir, "fingerprint.json"), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f)
        shutil.rmtree(index_dir, ignore_errors=True)
        os.rename(tmp_dir, index_dir)
        return cls(corpus_path, retriever, offsets)

    @classmethod
    def load(cls, corpus_path: str, index_dir: str | None = None) -> "BM25Index":
        """Loads a saved index; raises FileNotFoundError / ValueError when missing or stale."""
        import bm25s

        index_dir = index_dir or cls.default_dir(corpus_path)
        with open(os.path.join(index_dir, "fingerprint.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if saved != corpus_fingerprint(corpus_path):
            raise ValueError(f"the index in {index_dir} was built from a different version of "
                             f"{corpus_path} (or another tokenizer); rebuild it with BM25Index.build")
        retriever = bm25s.BM25.load(index_dir, show_progress=False)
        offsets = np.load(os.path.join(index_dir, "offsets.npy"))
        return cls(corpus_path, retriever, offsets)

    @classmethod
    def load_or_build(cls, corpus_path: str, index_dir: str | None = None) -> "BM25Index":
        """The saved index when it matches the corpus, otherwise a freshly built (and saved) one."""
        if not os.path.isfile(corpus_path):
            raise FileNotFoundError(f"corpus file {corpus_path!r} does not exist; give the path of a "
                                    'JSON-lines file with {"id": ..., "contents": "\\"Title\\"\\ntext"} rows')
        try:
            return cls.load(corpus_path, index_dir)
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            return cls.build(corpus_path, index_dir)

    def document(self, i: int) -> dict[str, Any]:
        """The corpus record of document `i` (its JSON line, parsed)."""
        start = int(self._offsets[i])
        end = int(self._offsets[i + 1]) if i + 1 < len(self) else os.fstat(self._fd).st_size
        return json.loads(os.pread(self._fd, end - start, start))

    def search(self, queries: Sequence[str], topk: int) -> list[list[Hit]]:
        """The `topk` best passages for each query, best first. Thread-safe."""
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        results = []
        for query in queries:
            scores = _scores(self._retriever, tokenize(query))
            results.append([self._hit(int(i), float(scores[i])) for i in top_k(scores, topk)])
        return results

    def _hit(self, i: int, score: float) -> Hit:
        record = self.document(i)
        return Hit(record.get("id", i), record["contents"], score)

    def close(self) -> None:
        os.close(self._fd)


def corpus_fingerprint(corpus_path: str) -> dict[str, Any]:
    """What identifies a corpus version: size, mtime, hash of the first MiB; plus index settings."""
    st = os.stat(corpus_path)
    with open(corpus_path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head,
            "tokenizer_version": TOKENIZER_VERSION, "bm25": BM25_PARAMS}


def _read_corpus(corpus_path: str) -> tuple[np.ndarray, list[list[str]]]:
    """Byte offset and tokens (title + text) of every non-empty line of the corpus."""
    offsets, token_lists = [], []
    with open(corpus_path, "rb") as f:
        position = 0
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                contents = _contents_of(line, corpus_path, line_no)
                offsets.append(position)
                token_lists.append(tokenize(contents) or [""])
            position += len(line)
    if not offsets:
        raise ValueError(f"corpus {corpus_path!r} has no passages")
    return np.asarray(offsets, dtype=np.int64), token_lists


def _contents_of(line: bytes, corpus_path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{corpus_path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("contents"), str):
        raise ValueError(f'{corpus_path}:{line_no}: each line must be an object with a "contents" string')
    return record["contents"]


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

LOCAL_SEARCH_METADATA = ToolMetadata(
    name="Local_Search_Tool",
    description=("Searches a local collection of encyclopedia-style passages by keywords (BM25) and "
                 "returns the best-matching passages with their titles."),
    inputs=(ToolArgument("query", "str", "A short keyword query naming the entity and the fact wanted."),),
    output_type="str - numbered passages, each as 'Title: ...' followed by the passage text.",
    demo_commands=(
        ('{"query": "Velmora city founded year"}', "Find the passage stating when Velmora was founded."),
        ('{"query": "Quillon population"}', "Find a passage about Quillon's population."),
    ),
    limitations=("Matches words, not meaning: synonyms and paraphrases can be missed. Knows only the "
                 "passages in its collection; one query looks up one fact best."),
    best_practices=("Use distinctive names and keywords rather than full questions; search one entity "
                    "or fact per call; read the titles to tell similar names apart."),
)


class LocalSearchTool(Tool):
    """Searches a `BM25Index` in-process."""

    metadata = LOCAL_SEARCH_METADATA

    def __init__(self, index: BM25Index, *, topk: int = 3):
        self.index = index
        self.topk = topk

    def run(self, query: str) -> str:
        return format_hits(self.index.search([query], self.topk)[0])


class RetrievalSearchTool(Tool):
    """Searches through a Search-R1 compatible `POST /retrieve` server (see `retrieval_server`)."""

    metadata = LOCAL_SEARCH_METADATA

    def __init__(self, url: str, *, topk: int = 3, timeout_s: float = 30.0):
        self.url = url
        self.topk = topk
        self.timeout_s = timeout_s

    def search(self, queries: Sequence[str]) -> list[list[Hit]]:
        """One batched request; the hits of each query, best first."""
        reply = fetch_json(self.url, service="the retrieval server", timeout_s=self.timeout_s,
                           method="POST",
                           json_body={"queries": list(queries), "topk": self.topk, "return_scores": True})
        return _parse_retrieve_reply(reply, len(queries))

    def run(self, query: str) -> str:
        return format_hits(self.search([query])[0])


def _parse_retrieve_reply(reply: Any, n_queries: int) -> list[list[Hit]]:
    """Hits from `{"result": [[{"document": {...}, "score": s} | {...document...}]]}`."""
    result = reply.get("result") if isinstance(reply, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        raise HttpRequestError(f'the retrieval server\'s reply has no "result" list with one entry per '
                               f"query (got {str(reply)[:200]!r}); is the URL a /retrieve endpoint?")
    hits = []
    for items in result:
        query_hits = []
        for item in items:
            document = item.get("document", item) if isinstance(item, dict) else None
            if not isinstance(document, dict) or not isinstance(document.get("contents"), str):
                raise HttpRequestError(f"the retrieval server returned a passage without contents: {item!r:.200}")
            query_hits.append(Hit(document.get("id"), document["contents"], float(item.get("score", 0.0))))
        hits.append(query_hits)
    return hits
