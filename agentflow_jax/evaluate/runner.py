"""Runs a benchmark's items through the agent and writes one JSON line per finished item.

    agent = Agent(planner=lambda sample: engine, frozen=frozen, toolbox=toolbox, rollout=limits, judge=judge)
    runs = run_benchmark(items, agent, out_dir="runs/eval/aime24", samples=3, batch_size=30)
    runs[k]   # sample k's item records, in item order

Items go through `rollout_batch` `batch_size` at a time (one trajectory each, the evaluation limits
of `agent.rollout`: every query timed on its own) and are scored by `rl.rewards.score_details`. Each
finished item is appended to `<out_dir>/items.sample<k>.jsonl` as soon as its batch is scored; a
rerun reads those files and runs only the items not there yet, so an interrupted evaluation resumed
gives the records an uninterrupted one gives.

An item record (one JSON line):

  pid, sample, kind, query, gold     the item, the sample index, its scorer and gold answer
  answer                             what was scored: the <answer> text, or what the scorer read from
                                     a reply without one (`rewards.answer_from_reply`); null if nothing
  tagged                             whether the reply had <answer>
  correct, verdict                   the score as a bool and as "correct" / "incorrect"
  judge                              the judge's words (kind "judge" only)
  exact, f1                          exact match and token F1 of the answer (open QA: kinds judge, exact, f1)
  turns, tools, stop_reason          planner turns, the tool of each turn (null: unusable), why it stopped
  seconds                            the query's own time (`agent.rollout` docstring)
  generator_text                     the generator's whole reply
  qtype, expected_tools              copied from the item when it has "qtype" / "tools"
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

from agentflow_jax.agent.rollout import FrozenEngines, RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.engines import Engine
from agentflow_jax.rl.rewards import LLMJudge, ScoredAnswer, exact_match, score_details, split_gold, token_f1
from agentflow_jax.tools.base import Toolbox

OPEN_QA_KINDS = ("judge", "exact", "f1")
"""Scorer kinds whose items also get exact match and token F1."""


@dataclasses.dataclass(frozen=True)
class Agent:
    """What answers a benchmark: the planner's engine per sample (sample index -> engine, e.g. a seed
    of its own), the frozen modules, the tools, the loop limits and sampling, and the judge."""

    planner: Callable[[int], Engine]
    frozen: Engine | FrozenEngines
    toolbox: Toolbox
    rollout: RolloutConfig
    judge: LLMJudge | None = None


def items_path(out_dir: str, sample: int) -> str:
    """Where sample `sample`'s item records go."""
    return os.path.join(out_dir, f"items.sample{sample}.jsonl")


def read_finished(path: str) -> dict[str, dict[str, Any]]:
    """pid -> record of a results file (empty when absent); a torn last line (a run killed while
    writing) is ignored, so that item runs again."""
    if not os.path.isfile(path):
        return {}
    finished = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            finished[record["pid"]] = record
    return finished


def run_benchmark(items: Sequence[Mapping[str, Any]], agent: Agent, *, out_dir: str, samples: int = 1,
                  batch_size: int = 32, progress: bool = True, description: str = "evaluate",
                  clock: Callable[[], float] = time.monotonic) -> list[list[dict[str, Any]]]:
    """Runs every unfinished item of every sample; returns each sample's records in item order.

    Args:
      items: benchmark records (`data.benchmarks.load_benchmark`), unique pids.
      agent: engines, tools, limits and judge.
      out_dir: the benchmark's result directory (created).
      samples: independent runs over all items (K in "mean and standard deviation over K runs").
      batch_size: items per batched rollout.
      progress: show a tqdm bar over items x samples.
      description: the bar's label.
      clock: the rollout's clock (injectable for tests).
    """
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    os.makedirs(out_dir, exist_ok=True)
    pids = [str(item["pid"]) for item in items]
    finished = [read_finished(items_path(out_dir, k)) for k in range(samples)]
    done = sum(pid in f for f in finished for pid in pids)
    with tqdm(total=len(pids) * samples, initial=done, desc=description, disable=not progress,
              dynamic_ncols=True) as bar:
        for sample in range(samples):
            todo = [item for item in items if str(item["pid"]) not in finished[sample]]
            with open(items_path(out_dir, sample), "a", encoding="utf-8") as f:
                for start in range(0, len(todo), batch_size):
                    for record in _run_batch(todo[start:start + batch_size], agent, sample, clock):
                        finished[sample][record["pid"]] = record
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                    bar.update(len(todo[start:start + batch_size]))
    return [[f[pid] for pid in pids] for f in finished]


def _run_batch(batch: Sequence[Mapping[str, Any]], agent: Agent, sample: int,
               clock: Callable[[], float]) -> list[dict[str, Any]]:
    trajectories = rollout_batch([item["query"] for item in batch], n=1, planner=agent.planner(sample),
                                 frozen=agent.frozen, toolbox=agent.toolbox, config=agent.rollout, clock=clock)
    details = score_details(trajectories, batch, judge=agent.judge)
    return [item_record(item, t, d, sample) for item, t, d in zip(batch, trajectories, details)]


def item_record(item: Mapping[str, Any], trajectory: Trajectory, scored: ScoredAnswer, sample: int) -> dict[str, Any]:
    """The JSON-able record of one finished item (module docstring)."""
    correct = scored.score >= 1.0
    record: dict[str, Any] = {
        "pid": str(item["pid"]), "sample": sample, "kind": item.get("kind", "exact"), "query": item["query"],
        "gold": item["answer"], "answer": scored.scored_text, "tagged": trajectory.answer is not None,
        "correct": correct, "verdict": "correct" if correct else "incorrect"}
    if scored.verdict is not None:
        record["judge"] = scored.verdict.reason
    if record["kind"] in OPEN_QA_KINDS:
        golds, text = split_gold(item["answer"]), scored.scored_text or ""
        record["exact"] = float(any(exact_match(text, g) for g in golds)) if text else 0.0
        record["f1"] = max(token_f1(text, g) for g in golds) if text else 0.0
    record.update(turns=len(trajectory.turns), tools=[turn.planner.step.tool_name for turn in trajectory.turns],
                  stop_reason=trajectory.stop_reason, seconds=round(trajectory.elapsed_s, 3),
                  generator_text=trajectory.generator_text)
    if item.get("qtype") is not None:
        record["qtype"] = item["qtype"]
    if item.get("tools") is not None:
        record["expected_tools"] = list(item["tools"])
    return record
