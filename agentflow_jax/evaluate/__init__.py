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
                     rollout: RolloutConfig, batch_size: int = 64, judge: LLMJudge | None = None,
                     first_sample_id: int = 0) -> EvalResult:
    """One trajectory per record (in batches of `batch_size` queries); metrics over all of them.
    `judge` scores the records of kind "judge"; record i samples as sample id first_sample_id + i
    (`rollout_batch`), so a process evaluating its share gives what one process would."""
    if not records:
        raise ValueError("evaluate_queries needs at least one record")
    trajectories: list[Trajectory] = []
    rewards = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        batch = rollout_batch([r["query"] for r in chunk], n=1, planner=planner, frozen=frozen, toolbox=toolbox,
                              config=rollout, first_sample_id=first_sample_id + start)
        rewards.append(score_trajectories(batch, chunk, judge=judge))
        trajectories += [dataclasses.replace(t, query_id=start + t.query_id) for t in batch]
    rewards_array = np.concatenate(rewards)
    return EvalResult(metrics=eval_metrics(records, trajectories, rewards_array), trajectories=trajectories,
                      rewards=rewards_array)


def eval_metrics(records: Sequence[Mapping[str, Any]], trajectories: Sequence[Trajectory],
                 rewards: np.ndarray) -> dict[str, float]:
    """Accuracy, mean reward and turns overall and per "qtype"; tool-choice accuracy where "tools" is given."""
    return metrics_from_outcomes(records, record_outcomes(records, trajectories, rewards))


def record_outcomes(records: Sequence[Mapping[str, Any]], trajectories: Sequence[Trajectory],
                    rewards: np.ndarray) -> np.ndarray:
    """[N, 3] float64 per record: reward, turns, tool choice (1 right, 0 wrong, -1 no "tools" given).
    Rows of several processes' shares concatenate into the whole evaluation's."""
    return np.asarray([[reward, len(t.turns), -1.0 if r.get("tools") is None else
                        float(chosen_tools(t) == tuple(r["tools"]))]
                       for r, t, reward in zip(records, trajectories, rewards)], np.float64).reshape(len(records), 3)


def metrics_from_outcomes(records: Sequence[Mapping[str, Any]], outcomes: np.ndarray) -> dict[str, float]:
    """`eval_metrics` from `record_outcomes` rows (one per record, in order)."""
    rewards, turns, tools = outcomes[:, 0], outcomes[:, 1], outcomes[:, 2]
    correct = rewards >= 1.0
    metrics = {"accuracy": float(correct.mean()), "reward": float(rewards.mean()), "turns": float(turns.mean()),
               "count": float(len(records))}
    qtypes = [r.get("qtype") for r in records]
    for qtype in sorted({q for q in qtypes if q is not None}):
        rows = np.asarray([q == qtype for q in qtypes])
        metrics[f"accuracy/{qtype}"] = float(correct[rows].mean())
        if (tools[rows] >= 0).any():
            metrics[f"tool_choice/{qtype}"] = float(tools[rows & (tools >= 0)].mean())
    if (tools >= 0).any():
        metrics["tool_choice"] = float(tools[tools >= 0].mean())
    return metrics
