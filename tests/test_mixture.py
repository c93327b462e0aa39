"""The training-mixture command on small generated NQ (Search-R1 layout), DeepMath-103K and reference files."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agentflow_jax.data import mixture
from agentflow_jax.data.pipeline import DataFileError, load_queries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = ("Answer the given question. You can call a search engine by <search> query </search>. "
          "Question: ")


def nq_rows():
    """Search-R1's layout: 6 usable rows (the question column or only the prompt), 3 unusable."""
    rows = []
    for i in range(6):
        question = f"who wrote play number {i}?"
        rows.append({"id": f"train_{i}", "question": question, "golden_answers": ["William Shakespeare", "Shakespeare"],
                     "data_source": "nq", "prompt": [{"role": "user", "content": PREFIX + question + "\n"}],
                     "ability": "fact-reasoning",
                     "reward_model": {"style": "rule", "ground_truth": {"target": ["William Shakespeare"]}},
                     "extra_info": {"split": "train", "index": i}})
    rows[4]["question"] = None  # the question is read from the prompt instead
    rows += [{**rows[0], "id": "train_6", "question": "  ", "prompt": []},                       # no question
             {**rows[0], "id": "train_7", "golden_answers": [], "reward_model": {"style": "rule",
                                                                                 "ground_truth": {"target": []}}},
             {**rows[0], "id": "train_8", "golden_answers": None,
              "reward_model": {"style": "rule", "ground_truth": {"target": [None, ""]}}}]  # no gold answer
    return rows


def deepmath_rows():
    """5 usable rows (3 numeric golds, 2 symbolic), 2 unusable."""
    answers = ["42", "\\frac{3}{4}", "1,000", "\\frac{\\pi}{4}", "x^2 + 1", "", "7"]
    rows = [{"question": f"Problem {i}", "final_answer": a, "difficulty": 5.0 + i, "topic": "Algebra",
             "r1_solution_1": "long " * 50, "r1_solution_2": "long", "r1_solution_3": "long"}
            for i, a in enumerate(answers)]
    rows[6]["question"] = ""
    return rows


@pytest.fixture()
def sources(tmp_path):
    nq = tmp_path / "nq.parquet"
    pq.write_table(pa.Table.from_pylist(nq_rows()), nq)
    deepmath = tmp_path / "deepmath"
    deepmath.mkdir()
    rows = deepmath_rows()
    pq.write_table(pa.Table.from_pylist(rows[:4]), deepmath / "train-00000.parquet")
    (deepmath / "train-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    return nq, deepmath


def test_the_mixture_counts_kinds_and_rejected_rows(sources):
    nq, deepmath = sources
    rows, (nq_report, math_report) = mixture.build_mixture([("nq", str(nq)), ("deepmath", str(deepmath))], seed=0)
    assert (nq_report.read, nq_report.kept, dict(nq_report.rejected)) == (9, 6, {"no question": 1,
                                                                                 "no gold answer": 2})
    assert (math_report.read, math_report.kept, dict(math_report.rejected)) == (7, 5, {"no gold answer": 1,
                                                                                      "no question": 1})
    assert dict(nq_report.kinds) == {"judge": 6}
    assert dict(math_report.kinds) == {"math": 3, "judge": 2}  # numbers get the exact scorer, symbols the judge
    assert len(rows) == 11 and len({r["pid"] for r in rows}) == 11
    by_pid = {r["pid"]: r for r in rows}
    assert by_pid["nq-train_0"] == {"pid": "nq-train_0", "query": "who wrote play number 0?",
                                    "answer": "William Shakespeare; Shakespeare", "kind": "judge", "source": "nq"}
    assert by_pid["nq-train_4"]["query"] == "who wrote play number 4?"  # from the chat prompt
    assert by_pid["math-1"] == {"pid": "math-1", "query": "Problem 1", "answer": "\\frac{3}{4}", "kind": "math",
                                "source": "deepmath", "difficulty": 6.0, "topic": "Algebra"}
    assert by_pid["math-3"]["kind"] == "judge" and by_pid["math-4"]["source"] == "deepmath"
    unshuffled, _ = mixture.build_mixture([("nq", str(nq)), ("deepmath", str(deepmath))], seed=None)
    assert [r["pid"] for r in unshuffled][:2] == ["nq-train_0", "nq-train_1"]
    assert sorted(r["pid"] for r in unshuffled) == sorted(by_pid)


def test_the_reference_training_schema(tmp_path):
    rows = [{"id": 0, "question": "who wrote hamlet?", "chain": "", "result": "William Shakespeare; Shakespeare",
             "source": "nq", "extra_info": {"ground_truth": "William Shakespeare; Shakespeare", "idx": 0}},
            {"id": 1, "question": "Compute 6*7.", "chain": "", "result": "42", "source": "mathhard",
             "extra_info": {"ground_truth": "42", "idx": 0}},
            {"id": 2, "question": "Area?", "chain": "", "result": "", "source": "mathhard",
             "extra_info": {"ground_truth": "", "idx": 1}},
            {"id": 3, "question": "Q", "chain": "", "result": "1", "source": "aime", "extra_info": {}}]
    path = tmp_path / "combined_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    kept, (report,) = mixture.build_mixture([("reference", str(path))], kinds=mixture.Kinds("f1", "math"), seed=None)
    assert [(r["pid"], r["answer"], r["kind"], r["source"]) for r in kept] == [
        ("nq-0", "William Shakespeare; Shakespeare", "f1", "nq"), ("mathhard-1", "42", "math", "deepmath")]
    assert dict(report.rejected) == {"no gold answer": 1, "unknown source 'aime'": 1}


def test_a_file_in_another_layout_or_missing_is_a_clear_error(sources, tmp_path):
    nq, deepmath = sources
    with pytest.raises(DataFileError, match=r"nq\.parquet is not in the deepmath layout: it has none of the fields "
                                            r"\['final_answer'\]"):
        mixture.build_mixture([("deepmath", str(nq))])
    with pytest.raises(FileNotFoundError, match="source file '/nope/nq.parquet' does not exist"):
        mixture.build_mixture([("nq", "/nope/nq.parquet")])
    with pytest.raises(DataFileError, match="pids occur more than once"):
        mixture.build_mixture([("nq", str(nq)), ("nq", str(nq))])


def test_the_command_writes_the_training_file_and_its_report(sources, tmp_path):
    nq, deepmath = sources
    output = tmp_path / "out" / "train.jsonl"
    result = subprocess.run([sys.executable, "-m", "agentflow_jax.data.mixture", f"--nq={nq}",
                             f"--deepmath={deepmath}", f"--output={output}", "--math_kind=judge"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "nq (1 file(s)): read 9, kept 6 (judge 6); rejected 3 (no gold answer: 2, no question: 1)" in result.stdout
    assert "deepmath (2 file(s)): read 7, kept 5 (judge 5); rejected 2" in result.stdout
    dataset = load_queries(output)  # the training pipeline reads it as it is
    assert len(dataset) == 11 and dataset.skipped_without_answer == 0
    assert {r["kind"] for r in dataset.records} == {"judge"}
    report = json.load(open(str(output) + ".report.json", encoding="utf-8"))
    assert report["rows"] == 11 and [s["rejected"] for s in report["sources"]] == [
        {"no question": 1, "no gold answer": 2}, {"no gold answer": 1, "no question": 1}]
