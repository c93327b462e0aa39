"""The benchmark evaluation: reading benchmark files, batched runs that resume, samples, reports."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from agentflow_jax.agent import prompts
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams
from agentflow_jax.data.benchmarks import BENCHMARKS, PAPER_SYSTEMS, load_benchmark
from agentflow_jax.data.pipeline import DataFileError
from agentflow_jax.engines import ScriptedEngine
from agentflow_jax.evaluate import report, runner
from agentflow_jax.rl.rewards import LLMJudge
from agentflow_jax.tools.base import Tool, ToolArgument, Toolbox, ToolMetadata


# ----------------------------------------------------------------------------- benchmark files

def write_json(path, value):
    path.write_text(json.dumps(value, indent=1))
    return path


def test_reference_format_items_become_records_with_the_benchmark_scorer(tmp_path):
    bamboogle = write_json(tmp_path / "b.json", [
        {"pid": "0", "query": "Who was president when Citibank was founded?", "answer": ["james madison"],
         "image": None},
        {"pid": "1", "question": "Which rocket?", "answer": "['Titan IIIE', 'Titan 3E']"}])
    records = load_benchmark(bamboogle, "bamboogle")
    assert [(r["pid"], r["query"], r["answer"], r["kind"]) for r in records] == [
        ("0", "Who was president when Citibank was founded?", "james madison", "judge"),
        ("1", "Which rocket?", "Titan IIIE; Titan 3E", "judge")]
    assert "image" in records[0]  # other fields are kept

    medqa = tmp_path / "m.jsonl"
    medqa.write_text(json.dumps({"idx": 0, "query": "Q?\nA. x\nB. y", "options": ["A. x", "B. y"], "answer": "y"})
                     + "\n\n" + json.dumps({"idx": 0, "query": "Q2?", "options": "['A. u', 'B. v']", "answer": "A"})
                     + "\n")
    records = load_benchmark(medqa, "medqa")
    assert [(r["pid"], r["kind"], r["choices"]) for r in records] == [
        ("0", "choice", ["A. x", "B. y"]), ("0#1", "choice", ["A. u", "B. v"])]  # a repeated pid stays unique

    game = write_json(tmp_path / "g.json", [
        {"pid": "0", "question": [1, 1, 2, 7], "answer": ["(7+1)×(2+1)", "(1+7)*(1+2)"], "query": "Use [1, 1, 2, 7]"},
        {"pid": "1", "query": "Use 4 7 8 8", "answer": ["(7-8/8)*4"]}])
    records = load_benchmark(game, "gameof24")
    assert [(r["answer"], r["kind"]) for r in records] == [("1 1 2 7", "game24"), ("7 8 8 4", "game24")]
    assert records[0]["solutions"] == ["(7+1)×(2+1)", "(1+7)*(1+2)"]


@pytest.mark.parametrize("text, name, message", [
    ('[{"pid": 1, "query": "q", "answer": "a"},\n {"pid": 2, "query": "q"\n "answer": "b"}]', "aime24",
     r"bad\.json:3 is not valid JSON"),
    ('{"pid": 1, "query": "q", "answer": "a"}\n{"pid": 2, "query": \n', "aime24", r"bad\.json:2 is not valid JSON"),
    ('[{"pid": 1, "query": "q", "answer": "a"},\n\n {"pid": 2, "answer": "b"}]', "aime24",
     r"bad\.json:3: the item has no 'query'"),
    ('{"pid": 1, "query": "q", "answer": ""}\n', "aime24", r"bad\.json:1: the item has no 'answer'"),
    ('{"pid": 1, "query": "q", "answer": "B"}\n', "gpqa", r"bad\.json:1: a multiple-choice item needs 'choices'"),
    ('{"pid": 1, "query": "q", "answer": "7"}\n{"pid": 2, "query": "q", "answer": "7", "kind": "fuzzy"}\n',
     "custom", r"bad\.json:1: the item's 'kind' is None; a custom benchmark needs one of"),
    ('[1, 2]', "aime24", r"bad\.json:1 holds a int, not a JSON object"),
    ("", "aime24", r"bad\.json holds no items"),
])
def test_a_bad_benchmark_file_is_an_error_naming_the_file_and_the_line(tmp_path, text, name, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFileError, match=message):
        load_benchmark(path, name)


def test_the_ten_benchmarks_and_their_paper_numbers():
    assert list(BENCHMARKS) == ["bamboogle", "2wiki", "hotpotqa", "musique", "gaia", "aime24", "amc23", "gameof24",
                                "gpqa", "medqa"]
    assert [b.items for b in BENCHMARKS.values()] == [125, 100, 100, 100, 127, 30, 40, 100, 100, 100]
    trained = [b.paper[PAPER_SYSTEMS.index("AgentFlow + Flow-GRPO")] for b in BENCHMARKS.values()]
    # SPEC section 4: group averages after Flow-GRPO, search 57.3, math 51.5, science 63.5
    assert round(np.mean(trained[:4]), 1) == 57.3 and round(np.mean(trained[5:8]), 1) == 51.5
    assert round(np.mean(trained[8:]), 1) == 63.5


# ----------------------------------------------------------------------------- runs

class EchoTool(Tool):
    metadata = ToolMetadata(name="Echo_Tool", description="Repeats text.",
                            inputs=(ToolArgument("text", "str", "text"),), output_type="str")

    def run(self, text):
        return text


class FixedTimeToolbox(Toolbox):
    """Every tool call reports 0.25 s of its own (with a constant engine clock, seconds are exact)."""

    def execute_many(self, calls):
        return [dataclasses.replace(r, elapsed_s=0.25) for r in super().execute_many(calls)]


def _user(request):
    return request.messages[-1]["content"]


def planner_reply(request):
    return "Justification: j\nContext: c\nSub-Goal: echo\nTool Name: Echo_Tool"


def frozen_reply(request):
    """Answers "What is A + B?" with A + B, except when the sample tag says to be wrong."""
    system = request.messages[0]["content"]
    if system == prompts.EXECUTOR_SYSTEM:
        return '{"tool_name": "Echo_Tool", "arguments": {"text": "x"}}'
    if system == prompts.VERIFIER_SYSTEM:
        return "Conclusion: STOP"
    if system == prompts.GENERATOR_SYSTEM:
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", _user(request)).groups())
        return f"<answer>{a + b + (1 if a % 3 == 0 else 0)}</answer>"  # wrong when a is a multiple of 3
    return "analysis"


class Interrupted(Exception):
    """Stands for a run killed half-way (Ctrl-C, a lost machine)."""


class CountingPlanner:
    """A scripted planner that fails on its `fail_on`-th call (an interruption) and counts requests."""

    def __init__(self, fail_on=None):
        self.engine, self.calls, self.requests, self.fail_on = ScriptedEngine(planner_reply), 0, 0, fail_on

    def generate(self, requests):
        self.calls += 1
        if self.calls == self.fail_on:
            raise Interrupted("interrupted")
        self.requests += len(requests)
        return self.engine.generate(requests)


ITEMS = [{"pid": f"p{i}", "query": f"What is {i} + {2 * i}?", "answer": str(3 * i), "kind": "math",
          "qtype": "even" if i % 2 == 0 else "odd"} for i in range(10)]
LIMITS = RolloutConfig(max_turns=2, max_time_s=300.0, planner=SamplingParams(max_new_tokens=16))


def agent(planner):
    return runner.Agent(planner=lambda sample: planner, frozen=ScriptedEngine(frozen_reply),
                        toolbox=FixedTimeToolbox([EchoTool()]), rollout=LIMITS)


def run(planner, out_dir, **kw):
    return runner.run_benchmark(ITEMS, agent(planner), out_dir=str(out_dir), batch_size=4, progress=False,
                                clock=lambda: 0.0, **kw)


def test_an_interrupted_evaluation_resumed_gives_the_uninterrupted_summary(tmp_path):
    whole = report.summarize("custom", run(CountingPlanner(), tmp_path / "whole"))
    interrupted = CountingPlanner(fail_on=2)  # the second batch's planner call
    with pytest.raises(Interrupted):
        run(interrupted, tmp_path / "resumed")
    with open(runner.items_path(str(tmp_path / "resumed"), 0), encoding="utf-8") as f:
        assert [json.loads(line)["pid"] for line in f] == ["p0", "p1", "p2", "p3"]  # the first batch was kept
    rest = CountingPlanner()
    resumed = report.summarize("custom", run(rest, tmp_path / "resumed"))
    assert rest.requests == 6  # only the 6 unfinished items ran again
    assert resumed == whole
    # Independently: the answer is wrong exactly when i is a multiple of 3 (0, 3, 6, 9).
    assert whole["accuracy"] == pytest.approx(6 / 10)
    assert whole["accuracy/even"] == pytest.approx(3 / 5) and whole["accuracy/odd"] == pytest.approx(3 / 5)
    assert whole["tool_use"] == {"Echo_Tool": 1.0} and whole["turns"] == 1.0


def test_records_say_what_was_scored_and_how(tmp_path):
    (records,) = run(CountingPlanner(), tmp_path)
    first, second = records[0], records[1]
    assert first["pid"] == "p0" and first["answer"] == "1" and first["gold"] == "0" and not first["correct"]
    assert first["verdict"] == "incorrect" and second["verdict"] == "correct" and second["answer"] == "3"
    assert first["tools"] == ["Echo_Tool"] and first["turns"] == 1 and first["stop_reason"] == "verifier"
    assert first["seconds"] == 0.25 and first["tagged"] and first["qtype"] == "even"
    assert "exact" not in first  # math items get no exact match / F1


def test_samples_give_mean_and_standard_deviation(tmp_path):
    per_sample = {0: "Verdict: True", 1: "Verdict: False", 2: "Verdict: True"}
    engines = {k: ScriptedEngine(lambda request, k=k: per_sample[k]) for k in per_sample}
    items = [dict(item, kind="judge") for item in ITEMS[:3]]
    runs = []
    for sample in range(3):  # the judge differs per sample: run each sample with its own judge
        sample_agent = runner.Agent(planner=lambda s: CountingPlanner(), frozen=ScriptedEngine(frozen_reply),
                                    toolbox=FixedTimeToolbox([EchoTool()]), rollout=LIMITS, judge=LLMJudge(engines[sample]))
        runs.append(runner.run_benchmark(items, sample_agent, out_dir=str(tmp_path / f"s{sample}"),
                                         progress=False, clock=lambda: 0.0)[0])
    summary = report.summarize("bamboogle", runs)
    assert summary["accuracy_per_sample"] == [1.0, 0.0, 1.0]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy_std"] == pytest.approx(np.sqrt(((1 - 2 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2))
    # Open QA: exact match and F1 of the answers ("0" vs "0"; "4" vs "3"; "6" vs "6") beside the judge.
    assert summary["exact"] == pytest.approx(2 / 3) and summary["f1"] == pytest.approx(2 / 3)
    assert summary["paper"]["AgentFlow + Flow-GRPO"] == 69.6


def test_a_rerun_with_more_samples_runs_only_the_new_sample(tmp_path):
    run(CountingPlanner(), tmp_path)
    again = CountingPlanner()
    runs = run(again, tmp_path, samples=2)
    assert again.requests == len(ITEMS) and len(runs) == 2 and [r["sample"] for r in runs[1]] == [1] * len(ITEMS)


# ----------------------------------------------------------------------------- reports

def summary_of(name, accuracy, samples=1, std=0.0):
    return {"benchmark": name, "title": BENCHMARKS[name].title if name in BENCHMARKS else name, "items": 10,
            "samples": samples, "accuracy": accuracy, "accuracy_std": std,
            **({"paper": dict(zip(PAPER_SYSTEMS, BENCHMARKS[name].paper))} if name in BENCHMARKS else {})}


def test_table_puts_the_paper_beside_ours_with_group_averages(tmp_path):
    names = ["gpqa", "medqa", "aime24"]
    for name, accuracy in zip(names, (0.5, 0.75, 0.25)):
        report.write_summary(summary_of(name, accuracy, samples=3 if name == "gpqa" else 1, std=0.1), tmp_path / name)
    report.write_summary(summary_of("heldout", 1.0), tmp_path / "heldout")
    paths = report.write_table_and_chart(str(tmp_path))
    table = open(paths["table"], encoding="utf-8").read().splitlines()
    assert table[0] == "| system | AIME24 | GPQA | MedQA | heldout | science avg |"
    assert table[2] == "| Qwen2.5-7B-Instruct alone | 6.7 | 34.0 | 66.0 | — | 50.0 |"
    assert table[5] == "| AgentFlow + Flow-GRPO | 40.0 | 47.0 | 80.0 | — | 63.5 |"
    assert table[6] == f"| **{report.OURS}** | 25.0 | 50.0 ± 10.0 | 75.0 | 100.0 | 62.5 |"
    with open(paths["chart"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(json.load(open(paths["summary"], encoding="utf-8"))) == {"aime24", "gpqa", "medqa", "heldout"}
    assert os.path.isfile(os.path.join(tmp_path, "gpqa", report.SUMMARY_FILE))
