"""Evaluation: run the agent on held-out queries and report accuracy, turns and tool choices.

The paper's benchmarks from the command line (`__main__.py`; benchmark files: `data.benchmarks`):

    python -m agentflow_jax.evaluate --config=FILE --benchmark=aime24 --data=aime24.json [--samples=3]
    python -m agentflow_jax.evaluate --config=FILE --all --data_dir=DIR

  runner.py   batched rollouts of a benchmark's items, one JSON line per finished item (a rerun skips them)
  report.py   summaries (mean and standard deviation over samples), the markdown table with the
              paper's numbers beside ours, the bar chart

Library use (the trainer's periodic evaluation):

    result = evaluate_queries(records, planner=engine, frozen=engine, toolbox=toolbox, rollout=config)
    result.metrics   # {"accuracy": ..., "turns": ..., "accuracy/<qtype>": ..., "tool_choice/<qtype>": ...}

A record is a dict with "query", "answer", optional "kind" (scoring rule, default "exact"),
optional "qtype" (a category to break metrics down by) and optional "tools" (the expected tool
sequence, canonical names; gives tool-choice accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from agentflow_jax.agent.rollout import RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.engines import Engine
from agentflow_jax.rl.rewards import LLMJudge, score_trajectories
from agentflow_jax.tools.base import Toolbox


@dataclasses.dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    trajectories: list[Trajectory]
    rewards: np.ndarray


def chosen_tools(trajectory: Trajectory) -> tuple[str | None, ...]:
    """The planner's tool per turn (canonical name, None when unknown or unparsable)."""
    return tuple(turn.planner.step.tool_name for turn in trajectory.turns)


def evaluate_queries(records: Sequence[Mapping[str, Any]], *, planner: Engine, frozen: Engine, toolbox: Toolbox,
                     rollout: RolloutConfig, batch_size: int = 64, judge: LLMJudge | None = None) -> EvalResult:
    """One trajectory per record (in batches of `batch_size` queries); metrics over all of them.
    `judge` scores the records of kind "judge"."""
    if not records:
        raise ValueError("evaluate_queries needs at least one record")
    trajectories: list[Trajectory] = []
    rewards = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        batch = rollout_batch([r["query"] for r in chunk], n=1, planner=planner, frozen=frozen, toolbox=toolbox,
                              config=rollout)
        rewards.append(score_trajectories(batch, chunk, judge=judge))
        trajectories += [dataclasses.replace(t, query_id=start + t.query_id) for t in batch]
    rewards_array = np.concatenate(rewards)
    return EvalResult(metrics=eval_metrics(records, trajectories, rewards_array), trajectories=trajectories,
                      rewards=rewards_array)


def eval_metrics(records: Sequence[Mapping[str, Any]], trajectories: Sequence[Trajectory],
                 rewards: np.ndarray) -> dict[str, float]:
    """Accuracy, mean reward and turns overall and per "qtype"; tool-choice accuracy where "tools" is given."""
    correct = rewards >= 1.0
    metrics = {"accuracy": float(correct.mean()), "reward": float(rewards.mean()),
               "turns": float(np.mean([len(t.turns) for t in trajectories])), "count": float(len(trajectories))}
    qtypes = [r.get("qtype") for r in records]
    for qtype in sorted({q for q in qtypes if q is not None}):
        rows = [i for i, q in enumerate(qtypes) if q == qtype]
        metrics[f"accuracy/{qtype}"] = float(correct[rows].mean())
        with_tools = [i for i in rows if records[i].get("tools") is not None]
        if with_tools:
            metrics[f"tool_choice/{qtype}"] = float(np.mean(
                [chosen_tools(trajectories[i]) == tuple(records[i]["tools"]) for i in with_tools]))
    with_tools = [i for i, r in enumerate(records) if r.get("tools") is not None]
    if with_tools:
        metrics["tool_choice"] = float(np.mean(
            [chosen_tools(trajectories[i]) == tuple(records[i]["tools"]) for i in with_tools]))
    return metrics
