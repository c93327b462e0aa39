"""The agent an evaluation runs, built from a checked config: the planner from an HF directory or a
training checkpoint, the frozen modules, the tools' LLM and the judge from the config's `engines`
section (the same helpers training uses: `experiment.frozen_engines`, `experiment.reward_judge`).

A frozen role named "reference" is served by the planner's initial weights (`model.path`), as in
training; every other role by the engine its spec names (local JAX, OpenAI-compatible endpoint, ...).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax.numpy as jnp

from agentflow_jax import sharding
from agentflow_jax.agent.rollout import FrozenEngines
from agentflow_jax.checkpoint import TrainCheckpointer
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.evaluate.runner import Agent
from agentflow_jax.experiment import Experiment, frozen_engines, reward_judge
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.rl.trainer import FROZEN_ROLES
from agentflow_jax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class PlannerSource:
    """Where the planner's weights come from: an HF-format directory (default: the config's
    `model.path`), optionally overwritten by a training checkpoint (`checkpoints` directory of a run;
    `step` None = its latest)."""

    model_dir: str | None = None
    checkpoint_dir: str | None = None
    step: int | None = None


def build_agent(experiment: Experiment, source: PlannerSource, items: Sequence[Mapping[str, Any]], *,
                max_turns: int, max_time_s: float) -> Agent:
    """The planner, frozen engines, toolbox, evaluation limits and judge of `experiment`.

    `items` are every record to be evaluated (a judge is required when any is of kind "judge");
    `max_turns` / `max_time_s` replace the config's evaluation limits (the paper evaluates with 10 /
    300 s); the planner samples at `eval.planner_temperature` (0: greedy), sample k with seed
    `seed + k`.
    """
    e = experiment
    mesh = sharding.make_mesh(e.mesh) if e.mesh else None
    load = lambda path: hf_io.load_pretrained(path, dtype=jnp.dtype(e.model.dtype),  # noqa: E731
                                              param_dtype=jnp.dtype(e.model.storage_dtype), mesh=mesh)
    graphdef, params = nnx.split(load(source.model_dir or e.model.path))
    if source.checkpoint_dir is not None:
        if not os.path.isdir(source.checkpoint_dir):
            raise FileNotFoundError(f"checkpoint directory {source.checkpoint_dir!r} does not exist")
        with TrainCheckpointer(source.checkpoint_dir, async_save=False) as checkpoints:
            params = checkpoints.restore(source.step, params=params).params
    tokenizer = load_tokenizer(e.model.tokenizer or source.model_dir or e.model.path)
    sampler = Sampler.from_state(graphdef, params, max_cache_length=e.model.max_cache_length,
                                 max_rows=e.model.max_cache_rows or None)

    engines = frozen_engines(e)
    if any(engines[role] is None for role in FROZEN_ROLES):
        initial = params if source.model_dir is None and source.checkpoint_dir is None else nnx.split(
            load(e.model.path))[1]
        reference = JaxEngine(sampler.with_params(initial), tokenizer, seed=e.seed + 1)
        engines = {role: engine or reference for role, engine in engines.items()}
    rollout = dataclasses.replace(e.rollout_config(evaluation=True), max_turns=max_turns, max_time_s=max_time_s)
    return Agent(planner=lambda sample: JaxEngine(sampler, tokenizer, seed=e.seed + sample),
                 frozen=FrozenEngines(**{role: engines[role] for role in FROZEN_ROLES if role != "tools"}),
                 toolbox=e.tools.build(engines["tools"]), rollout=rollout, judge=reward_judge(e, items))
