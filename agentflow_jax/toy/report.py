"""The warm start's report: held-out demonstrations decoded per role, the planner's tool choices
(greedy and sampled), and the whole agent on held-out questions (`evaluate.evaluate_queries`)."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np

from agentflow_jax.agent import modules
from agentflow_jax.agent.rollout import RolloutConfig
from agentflow_jax.engines import Engine, GenerationRequest
from agentflow_jax.evaluate import evaluate_queries
from agentflow_jax.tools.base import Toolbox
from agentflow_jax.tools.generator import GENERALIST_METADATA
from agentflow_jax.tools.python_coder import PYTHON_CODER_METADATA
from agentflow_jax.tools.search import LOCAL_SEARCH_METADATA
from agentflow_jax.toy.demonstrations import Demo
from agentflow_jax.toy.frozen import ROLES
from agentflow_jax.toy.world import KINDS, Question, World, query_records, spread_sample

TOOL_METADATA = (LOCAL_SEARCH_METADATA, PYTHON_CODER_METADATA, GENERALIST_METADATA)


def evaluate_roles(engine: Engine, demos: Sequence[Demo], world: World, *, max_new_tokens: Mapping[str, int],
                   per_role: int, sampled_n: int, batch_size: int, roles: Sequence[str] = ROLES,
                   seed: int = 0) -> dict[str, Any]:
    """Greedy exact match per role on held-out demonstrations (and the decision parsed from the reply);
    for the planner also its tool choice, greedy and with `sampled_n` samples at T = 1."""
    questions = {q.id: q for q in world.heldout}
    rng = random.Random(seed)
    report: dict[str, Any] = {}
    for role in roles:
        rows = sorted((d for d in demos if d.role == role), key=lambda d: (d.question_id, d.step))
        limit = per_role * (2 if role == "planner" else 1)  # the planner's tool choice is what RL starts from
        if len(rows) > limit:
            rows = rng.sample(rows, limit)
        if not rows:
            continue
        texts = _replies(engine, rows, max_new_tokens[role], temperature=0.0, n=1, batch_size=batch_size)
        entry: dict[str, Any] = {"n": len(rows), "exact_match": round(float(np.mean(
            [t == d.target for t, d in zip(texts, rows)])), 3)}
        if role != "planner":
            entry["decision_match"] = round(float(np.mean(
                [_decision(role, t, d) == _decision(role, d.target, d) for t, d in zip(texts, rows)])), 3)
            entry["examples_wrong"] = [{"target": d.target, "output": t} for t, d in zip(texts, rows)
                                       if t != d.target][:3]
        else:
            entry.update(_planner_report(texts, rows, questions))
            if sampled_n > 0:
                sampled = _replies(engine, rows, max_new_tokens[role], temperature=1.0, n=sampled_n,
                                   batch_size=batch_size)
                expanded = [d for d in rows for _ in range(sampled_n)]
                entry["sampled_t1"] = {k: v for k, v in _planner_report(sampled, expanded, questions).items()
                                       if k.startswith("tool")}
        report[role] = entry
    return report


def _replies(engine: Engine, demos: Sequence[Demo], max_new_tokens: int, *, temperature: float, n: int,
             batch_size: int) -> list[str]:
    """`n` replies per demonstration prompt (consecutive), `batch_size` requests per engine call."""
    requests = [GenerationRequest(messages=d.messages, max_new_tokens=max_new_tokens, temperature=temperature)
                for d in demos for _ in range(n)]
    texts = []
    for start in range(0, len(requests), batch_size):
        texts += [g.text for g in engine.generate(requests[start:start + batch_size])]
    return texts


def _decision(role: str, text: str, demo: Demo) -> Any:
    """The parsed decision of a reply (what the agent acts on)."""
    if role == "planner":
        step = modules.parse_planner_output(text, TOOL_METADATA)
        return (step.tool_name, step.sub_goal, step.context)
    if role == "executor":
        tool = re.search(r"^Tool: (\S+)$", demo.messages[-1]["content"], re.MULTILINE).group(1)
        call = modules.parse_executor_output(text, expected_tool=tool).tool_call
        return None if call is None else (call.tool_name, json.dumps(dict(call.arguments), sort_keys=True))
    if role == "verifier":
        return modules.parse_verifier_output(text).stop
    if role == "generator":
        return modules.parse_generator_output(text).answer
    return text.strip()


def _planner_report(texts: Sequence[str], rows: Sequence[Demo], questions: Mapping[str, Question]) -> dict[str, Any]:
    steps = [modules.parse_planner_output(t, TOOL_METADATA) for t in texts]
    right = [s.tool_name == d.oracle_tool for s, d in zip(steps, rows)]
    by: dict[str, list[bool]] = collections.defaultdict(list)
    fields_ok = []
    for s, d, ok in zip(steps, rows, right):
        q = questions[d.question_id]
        by[f"tool_choice/{q.kind}"].append(ok)
        by[f"tool_choice/{'tempting' if q.tempting else 'plain'}"].append(ok)
        by[f"tool_choice/step{d.step}"].append(ok)
        if ok:
            oracle = q.plan[d.step - 1]
            fields_ok.append(s.sub_goal == oracle.sub_goal and s.context == oracle.context)
    return {"parse_ok": round(float(np.mean([s.parse_error is None and s.tool_name is not None for s in steps])), 3),
            "tool_choice": round(float(np.mean(right)), 3),
            **{k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())},
            "fields_match_when_tool_right": round(float(np.mean(fields_ok)), 3) if fields_ok else None}


def evaluate_agent(world: World, *, planner: Engine, frozen: Engine, toolbox: Toolbox, rollout: RolloutConfig,
                   num_questions: int, planner_temperature: float) -> dict[str, Any]:
    """The whole agent on `num_questions` held-out questions (spread over kinds), the planner at
    `planner_temperature`: accuracy overall, per kind and phrasing, and when the planner took the
    oracle's tools."""
    questions = spread_sample(world.heldout, num_questions)
    planner_sampling = dataclasses.replace(rollout.planner, temperature=planner_temperature)
    rollout = dataclasses.replace(rollout, planner=planner_sampling)
    start = time.perf_counter()
    result = evaluate_queries(query_records(questions), planner=planner, frozen=frozen, toolbox=toolbox,
                              rollout=rollout, batch_size=len(questions))
    seconds = time.perf_counter() - start
    correct = result.rewards >= 1.0
    by_phrasing = {"plain": [c for c, q in zip(correct, questions) if not q.tempting],
                   "tempting": [c for c, q in zip(correct, questions) if q.tempting]}
    oracle_path = [c for c, q, t in zip(correct, questions, result.trajectories)
                   if [turn.planner.step.tool_name for turn in t.turns] == [s.tool_name for s in q.plan]]
    return {"questions": len(questions), "planner_temperature": planner_temperature,
            "accuracy": round(result.metrics["accuracy"], 3),
            **{f"accuracy/{k}": round(result.metrics[f"accuracy/{k}"], 3) for k in KINDS
               if f"accuracy/{k}" in result.metrics},
            **{f"accuracy/{k}": round(float(np.mean(v)), 3) for k, v in by_phrasing.items() if v},
            "accuracy_when_oracle_tools": round(float(np.mean(oracle_path)), 3) if oracle_path else None,
            "oracle_tool_paths": len(oracle_path), "turns": round(result.metrics["turns"], 2),
            "seconds": round(seconds, 1)}
