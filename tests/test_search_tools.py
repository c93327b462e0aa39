"""Local BM25 retrieval: ranking on a generated corpus, saved index, the /retrieve server and clients."""

import json
import os
import random
import threading
import urllib.error
import urllib.request

import pytest

from agentflow_jax.tools import build_toolbox
from agentflow_jax.tools.base import ToolCall
from agentflow_jax.tools.retrieval_server import RetrievalServer
from agentflow_jax.tools.search import BM25Index, LocalSearchTool, RetrievalSearchTool, tokenize

SYLLABLES = ["vel", "mor", "qui", "llon", "tar", "bex", "zan", "dri", "ost", "ka", "lum", "ny", "sor", "pe"]
FACTS = {
    "founded": "{name} was founded in the year {value}.",
    "population": "The population of {name} is {value} people.",
    "river": "{name} lies on the banks of the {value} river.",
}


def _world(seed: int = 0, n_entities: int = 100) -> tuple[list[dict], dict]:
    """Passages (one fact each) about fictional cities; truth[(name, fact)] = passage id."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_entities:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    rows, truth = [], {}
    for name in sorted(names):
        for fact, template in FACTS.items():
            value = {"founded": rng.randint(1000, 1999), "population": rng.randint(1000, 99999),
                     "river": rng.choice(sorted(names))}[fact]
            pid = str(len(rows))
            rows.append({"id": pid, "contents": f'"{name}"\n' + template.format(name=name, value=value)})
            truth[(name, fact)] = pid
    return rows, truth


QUESTIONS = {
    "founded": "In what year was {name} founded?",
    "population": "What is the population of {name}?",
    "river": "Which river does {name} lie on the banks of?",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rows, truth = _world()
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), truth


@pytest.fixture(scope="module")
def index(world):
    return BM25Index.build(world[0])


@pytest.fixture(scope="module")
def server(index):
    srv = RetrievalServer(index, port=0).start()
    yield srv
    srv.close()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _sample_questions(truth: dict, n: int, seed: int) -> list[tuple[str, str]]:
    keys = random.Random(seed).sample(sorted(truth), n)
    return [(QUESTIONS[fact].format(name=name), truth[(name, fact)]) for name, fact in keys]


def test_tokenizer_lowercases_and_drops_stopwords():
    assert tokenize("In what YEAR was Velmora-Quillon founded, in 1843?") == [
        "year", "velmora", "quillon", "founded", "1843"]


def test_the_passage_a_question_was_built_from_ranks_first(world, index):
    _, truth = world
    assert len(index) == 300
    questions = _sample_questions(truth, 60, seed=1)
    hits = index.search([q for q, _ in questions], topk=3)
    assert [h[0].id for h in hits] == [pid for _, pid in questions]
    assert all(len(h) == 3 and h[0].score > h[1].score for h in hits)


def test_saved_index_reloads_with_identical_results(world, index):
    corpus, truth = world
    assert os.path.isfile(os.path.join(BM25Index.default_dir(corpus), "fingerprint.json"))
    queries = [q for q, _ in _sample_questions(truth, 20, seed=2)] + ["", "zzz unknown words"]
    reloaded = BM25Index.load(corpus)
    assert reloaded.search(queries, topk=5) == index.search(queries, topk=5)
    reloaded.close()


def test_a_changed_corpus_is_rebuilt(tmp_path):
    rows, _ = _world(seed=3, n_entities=20)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    BM25Index.load_or_build(str(corpus)).close()
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "contents": '"Brandnewtown"\nBrandnewtown was founded in 2024.'}) + "\n")
    with pytest.raises(ValueError, match="different version"):
        BM25Index.load(str(corpus))
    rebuilt = BM25Index.load_or_build(str(corpus))
    assert rebuilt.search(["Brandnewtown founded"], topk=1)[0][0].id == "new"
    rebuilt.close()


def test_bad_corpus_lines_name_the_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "1", "contents": "\\"A\\"\\ntext"}\n{"id": "2", "text": "no contents"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*contents"):
        BM25Index.build(str(corpus))


def test_server_answers_batched_queries_in_search_r1_format(world, server):
    _, truth = world
    questions = _sample_questions(truth, 3, seed=4)
    body = {"queries": [q for q, _ in questions], "topk": 2, "return_scores": True}
    status, reply = _post(server.url, json.dumps(body).encode())
    assert status == 200 and len(reply["result"]) == 3
    for (_, pid), items in zip(questions, reply["result"]):
        assert len(items) == 2 and set(items[0]) == {"document", "score"}
        assert items[0]["document"]["id"] == pid and items[0]["document"]["contents"].startswith('"')
    status, reply = _post(server.url, json.dumps({"queries": [questions[0][0]]}).encode())
    assert status == 200
    items = reply["result"][0]
    assert len(items) == 3 and set(items[0]) == {"id", "contents"}  # default topk 3, bare documents


def test_concurrent_clients_each_get_their_own_answers(world, server):
    _, truth = world
    client = RetrievalSearchTool(server.url, topk=1, timeout_s=10)
    outcomes: dict[int, bool] = {}

    def worker(i):
        questions = _sample_questions(truth, 5, seed=100 + i)
        hits = client.search([q for q, _ in questions])
        outcomes[i] = [h[0].id for h in hits] == [pid for _, pid in questions]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes == {i: True for i in range(8)}


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b'["a"]', "JSON object"),
    (b'{"queries": "one string"}', "list of strings"),
    (b'{"queries": ["q"], "topk": 0}', "topk"),
    (b'{"queries": ["q"], "topk": "3"}', "topk"),
    (b'{"queries": ["q"], "return_scores": "yes"}', "return_scores"),
])
def test_bad_requests_get_400_with_a_json_error(server, body, message):
    status, reply = _post(server.url, body)
    assert status == 400 and message in reply["error"]


def test_unknown_path_gets_404(server):
    status, reply = _post(server.url.replace("/retrieve", "/search"), b"{}")
    assert status == 404 and "/retrieve" in reply["error"]


def test_local_and_remote_tools_format_the_same_readable_text(world, index, server):
    _, truth = world
    (question, pid), = _sample_questions(truth, 1, seed=5)
    local = LocalSearchTool(index, topk=2).run(query=question)
    remote = RetrievalSearchTool(server.url, topk=2).run(query=question)
    assert local == remote
    first = local.split("\n\n")[0]
    title, text = index.document(int(pid))["contents"].split("\n")
    assert first == f"[1] Title: {title.strip(chr(34))}\n{text}"
    assert "\n\n[2] Title: " in local


def test_remote_tool_reports_an_unreachable_server_through_the_toolbox():
    toolbox = build_toolbox(["search"], config={"search": {"url": "http://127.0.0.1:9/retrieve", "timeout_s": 2}})
    result = toolbox.execute(ToolCall("Local_Search_Tool", {"query": "anything"}))
    assert not result.ok and "could not reach the retrieval server" in result.error


def test_build_toolbox_with_a_local_corpus(world):
    corpus, truth = world
    toolbox = build_toolbox(["search"], config={"search": {"corpus_path": corpus, "topk": 1}})
    (question, pid), = _sample_questions(truth, 1, seed=6)
    result = toolbox.execute(ToolCall("local search tool", {"query": question}))
    title = json.loads(open(corpus).readlines()[int(pid)])["contents"].split("\n")[0].strip('"')
    assert result.ok and result.output.startswith(f"[1] Title: {title}\n")
