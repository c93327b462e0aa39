"""One Flow-GRPO step: rollouts in the agent's own loop -> rewards -> advantages -> updates.

    queries ──rollout_batch──> trajectories (planner on the policy, other modules frozen)
            ──score──────────> one reward per trajectory, broadcast to its planner turns
            ──TurnRecord─────> exact prompt / sampled ids and sampler log-probs of every planner call
            ──pack_turns─────> mini-batches of whole trajectories, rows padded to micro-batch size
            ──token_logprobs─> old (policy before the update) and reference log-probs
            ──advantages─────> once over the step's whole groups (KL-in-reward penalties included)
            ──policy_loss────> gradients accumulated over micro-batches with global weights
            ──optax──────────> new policy parameters (skipped, and reported, when not finite)

The trainer owns the run's `TrainState` (policy parameters, optimizer state, step, base seed, data
iterator) and the frozen reference parameters (the initial policy: by default they also serve
query analysis, executor, verifier, generator and the tools' LLM; any other engine, e.g. an
OpenAI-compatible endpoint, can be passed instead). It holds no I/O: logging, checkpoints and
evaluation live in `train.py`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agentflow_jax.agent.rollout import FrozenEngines, RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.config_reader import check_fields, setting
from agentflow_jax.engines import Engine
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.models.tokenizer import Tokenizer
from agentflow_jax.rl import advantages as advantages_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TrainBatch, TurnRecord, pack_turns, split_microbatches
from agentflow_jax.rl.logprobs import token_logprobs
from agentflow_jax.rl.rewards import LLMJudge, score_trajectories
from agentflow_jax.sampling import Sampler
from agentflow_jax.tools.base import Toolbox
from agentflow_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How one step turns rollouts into updates.

    Attributes:
      group_size: trajectories sampled per query (the GRPO group, n).
      estimator, grouping: advantage estimator and grouping (`rl.advantages`).
      loss: the Flow-GRPO loss configuration; its temperature must equal the planner's.
      ppo_epochs: passes over the step's data.
      num_minibatches: optimizer updates per epoch; each holds whole trajectories.
      micro_batch_rows: rows per gradient micro-batch (rows are padded to a multiple of it).
      length_bucket: sequence lengths are rounded up to a multiple of this (few compiled shapes).
    """

    group_size: int = setting(8, min=1)
    estimator: str = setting("grpo", choices=tuple(advantages_lib.ADVANTAGE_ESTIMATORS))
    grouping: str = setting("trajectory", choices=advantages_lib.GROUPINGS)
    loss: loss_lib.LossConfig = loss_lib.LossConfig()
    ppo_epochs: int = setting(1, min=1)
    num_minibatches: int = setting(1, min=1)
    micro_batch_rows: int = setting(8, min=1)
    length_bucket: int = setting(128, min=1)

    def __post_init__(self):
        check_fields(self)


FROZEN_ROLES = ("analysis", "executor", "verifier", "generator", "tools")
"""The frozen modules (query analysis, executor, verifier, generator) and the LLM inside the tools."""


class MiniBatch(NamedTuple):
    """One optimizer update's rows: packed planner calls, [B] advantages (0 on padding rows), the
    pre-update policy's and the reference's log-probs [B, T] (None without a KL term in the loss)."""

    batch: TrainBatch
    advantages: np.ndarray
    old_logprobs: jax.Array
    ref_logprobs: jax.Array | None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did: its trajectories, their rewards and the metrics to log."""

    trajectories: list[Trajectory]
    rewards: np.ndarray
    metrics: dict[str, float]


class FlowGRPOTrainer:
    """The run's `TrainState`, the frozen reference parameters and the compiled functions of one run.

    Args:
      graphdef: `nnx.split(model)[0]` of the planner model.
      params: initial policy parameters (also the frozen reference).
      tokenizer: the model's tokenizer (chat template, stop ids, pad id).
      toolbox_factory: `engine -> Toolbox`, called once with the frozen engine (the tools' LLM).
      optimizer: an optax transformation (`optim.make_optimizer`).
      config: `TrainerConfig`; its loss temperature must be the planner's sampling temperature.
      rollout: loop limits and per-module sampling.
      max_cache_length: KV-cache slots per sequence of the samplers.
      seed: base seed of the planner's sampling (`TrainState.step_seed`).
      frozen_engines: the engine of each frozen role ("analysis", "executor", "verifier", "generator",
        "tools": the tools' LLM), or one engine for all; a role without one (default: all) is served by
        the reference parameters through the policy's compiled sampler.
      judge: scores queries of kind "judge" (`rewards.LLMJudge`); None when there are none.
      data_iterator: the training data's iterator, kept in the state for checkpoints.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *, tokenizer: Tokenizer, toolbox_factory,
                 optimizer: optax.GradientTransformation, config: TrainerConfig, rollout: RolloutConfig,
                 max_cache_length: int = 4096, seed: int = 0,
                 frozen_engines: Engine | Mapping[str, Engine | None] | None = None,
                 judge: LLMJudge | None = None, data_iterator: Any = None):
        if abs(rollout.planner.temperature - config.loss.temperature) > 1e-9 and rollout.planner.temperature > 0:
            raise ValueError(f"loss temperature {config.loss.temperature} must equal the planner's sampling "
                             f"temperature {rollout.planner.temperature} (the ratio compares the same distribution)")
        self.graphdef, self.config, self.rollout_config = graphdef, config, rollout
        self.tokenizer, self.judge = tokenizer, judge
        # A copy: updates donate the policy's buffers, the reference must outlive them.
        self.ref_params = jax.tree.map(jnp.copy, params)
        self.optimizer = optimizer
        self.state = TrainState.create(params, optimizer, seed=seed, data_iterator=data_iterator)
        self.policy_sampler = Sampler.from_state(graphdef, params, max_cache_length=max_cache_length)
        if not isinstance(frozen_engines, Mapping):
            frozen_engines = dict.fromkeys(FROZEN_ROLES, frozen_engines)
        unknown = sorted(set(frozen_engines) - set(FROZEN_ROLES))
        if unknown:
            raise ValueError(f"frozen_engines names unknown role(s) {unknown}; roles: {list(FROZEN_ROLES)}")
        reference = None
        if any(frozen_engines.get(role) is None for role in FROZEN_ROLES):
            reference = JaxEngine(self.policy_sampler.with_params(self.ref_params), tokenizer, seed=seed + 1)
        engines = {role: frozen_engines.get(role) or reference for role in FROZEN_ROLES}
        self.frozen_engines = FrozenEngines(**{role: engines[role] for role in FROZEN_ROLES if role != "tools"})
        self.toolbox: Toolbox = toolbox_factory(engines["tools"])
        self._value_and_grad = loss_lib.make_value_and_grad(graphdef, config.loss)
        self._logprobs = jax.jit(lambda p, ids, mask, targets, loss_mask: token_logprobs(
            graphdef, p, ids, mask, targets, temperature=config.loss.temperature,
            chunk_size=config.loss.logits_chunk_size, mask=loss_mask)[0])
        self._apply = jax.jit(self._apply_updates, donate_argnums=(0, 1))

    @property
    def params(self) -> nnx.State:
        return self.state.params

    @property
    def step(self) -> int:
        return self.state.step

    def planner_engine(self, *, seed: int) -> JaxEngine:
        """An engine sampling from the current policy parameters."""
        self.policy_sampler.update_params(self.state.params)
        return JaxEngine(self.policy_sampler, self.tokenizer, seed=seed)

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, queries: Sequence[Mapping[str, Any]]) -> StepResult:
        """Rollouts for `queries` (dicts with "query", "answer" and optional "kind"), then updates."""
        start = time.perf_counter()
        trajectories = rollout_batch([q["query"] for q in queries], n=self.config.group_size,
                                     planner=self.planner_engine(seed=self.state.step_seed()),
                                     frozen=self.frozen_engines, toolbox=self.toolbox, config=self.rollout_config)
        rewards = score_trajectories(trajectories, queries, judge=self.judge)
        rollout_s = time.perf_counter() - start
        records = turn_records(trajectories, rewards)
        metrics = rollout_metrics(trajectories, rewards)
        metrics.update(self.update(records))
        metrics.update(rollout_s=rollout_s, step_s=time.perf_counter() - start)
        self.state = self.state.replace(step=self.state.step + 1)
        return StepResult(trajectories=trajectories, rewards=rewards, metrics=metrics)

    def update(self, records: Sequence[TurnRecord]) -> dict[str, float]:
        """PPO epochs x mini-batches of optimizer updates on the given planner calls."""
        if not records:
            return {"skipped_updates": 0.0, "updates": 0.0}
        minibatches = [loss_lib.make_loss_inputs(batch, advantages, old, ref, self.config.loss)
                       for batch, advantages, old, ref in self.prepare_minibatches(records)]
        parts, skipped, losses = [], 0, []
        params, opt_state = self.state.params, self.state.opt_state
        for _ in range(self.config.ppo_epochs):
            for inputs in minibatches:
                micro = split_microbatches(inputs, inputs.input_ids.shape[0] // self.config.micro_batch_rows)
                acc = loss_lib.accumulate_gradients(self._value_and_grad, params, micro)
                if bool(acc.is_finite):
                    params, opt_state, grad_norm = self._apply(params, opt_state, acc.grads)
                    parts.append(acc.metrics)
                    losses.append((float(acc.loss), float(grad_norm)))
                else:
                    skipped += 1
        self.state = self.state.replace(params=params, opt_state=opt_state)
        metrics = {"updates": float(len(parts)), "skipped_updates": float(skipped)}
        if parts:
            metrics.update(loss_lib.finalize_metrics(loss_lib.combine_metrics(parts)))
            metrics["loss"] = float(np.mean([l for l, _ in losses]))
            metrics["grad_norm"] = float(np.mean([g for _, g in losses]))
        return metrics

    def prepare_minibatches(self, records: Sequence[TurnRecord]) -> list[MiniBatch]:
        """The step's mini-batches of whole trajectories: (packed rows, [B] advantages, old and reference
        log-probs [B, T]).

        Advantages are computed once over the whole step's groups, before the split; with KL in the
        reward, each record's penalty comes from its mini-batch's old and reference log-probs and
        the advantages over whole groups are computed from all of them, so a trajectory gets the same
        advantage however the step is cut.
        """
        batches = []
        for indices in trajectory_minibatches(records, self.config.num_minibatches):
            batch = pack_turns([records[i] for i in indices], pad_id=self.tokenizer.pad_token_id,
                               length_bucket=self.config.length_bucket, row_bucket=self.config.micro_batch_rows)
            old = self._batched_logprobs(self.state.params, batch)
            ref = self._batched_logprobs(self.ref_params, batch) if self.config.loss.kl_coef > 0 else None
            batches.append((indices, batch, old, ref))
        penalties = None
        if self.config.loss.kl_in_reward:
            penalties = np.zeros(len(records))
            for indices, batch, old, ref in batches:
                penalties[indices] = loss_lib.kl_reward_penalties(old, ref, batch.loss_mask,
                                                                  self.config.loss)[:len(indices)]
        advantages = compute_record_advantages(records, self.config, kl_penalties=penalties)
        minibatches = []
        for indices, batch, old, ref in batches:
            row_advantages = np.zeros(batch.num_rows, np.float32)
            row_advantages[:len(indices)] = advantages[indices]
            minibatches.append(MiniBatch(batch, row_advantages, old, None if self.config.loss.kl_in_reward else ref))
        return minibatches

    # -- internals --------------------------------------------------------------------------------

    def _batched_logprobs(self, params: nnx.State, batch: TrainBatch) -> jax.Array:
        """[B, T] log-probs computed micro-batch by micro-batch (same shapes as the loss: no new compiles).

        Only loss-mask positions are computed (the LM head runs on response tokens); others read 0.
        """
        rows = self.config.micro_batch_rows
        parts = [self._logprobs(params, *(x[i:i + rows] for x in (batch.input_ids, batch.attention_mask,
                                                                   batch.targets, batch.loss_mask)))
                 for i in range(0, batch.num_rows, rows)]
        return jnp.concatenate(parts, axis=0)

    def _apply_updates(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


# ------------------------------------------------------------------------------------------------
# Pure helpers (tested on their own)
# ------------------------------------------------------------------------------------------------


def turn_records(trajectories: Sequence[Trajectory], rewards: np.ndarray) -> list[TurnRecord]:
    """One TurnRecord per planner call, with its trajectory's reward.

    Raises:
      ValueError: a planner call without exact token ids (an engine that reports only text, such
        as an OpenAI-compatible server, cannot be the trained planner).
    """
    records = []
    for index, (trajectory, reward) in enumerate(zip(trajectories, rewards)):
        for turn in trajectory.turns:
            call = turn.planner
            if not call.token_ids or call.prompt_ids is None or call.logprobs is None:
                raise ValueError("a planner call came back without exact token ids and log-probs: the planner "
                                 "being trained must run in-process (a JAX engine); engines that return text "
                                 "only (OpenAI-compatible servers) can serve the frozen modules and the judge")
            records.append(TurnRecord(query_id=trajectory.query_id, trajectory_id=index,
                                      prompt_ids=tuple(call.prompt_ids), response_ids=tuple(call.token_ids),
                                      sampler_logprobs=tuple(call.logprobs), reward=float(reward)))
    return records


def compute_record_advantages(records: Sequence[TurnRecord], config: TrainerConfig,
                              kl_penalties: np.ndarray | None = None) -> np.ndarray:
    """[len(records)] advantages over the whole step's groups (before any mini-batch split);
    `kl_penalties` [len(records)]: KL-in-reward penalties (`loss.kl_reward_penalties`)."""
    return advantages_lib.compute_advantages(
        np.asarray([r.reward for r in records]), np.asarray([r.query_id for r in records]),
        np.asarray([r.trajectory_id for r in records]), estimator=config.estimator, grouping=config.grouping,
        kl_penalties=kl_penalties)


def trajectory_minibatches(records: Sequence[TurnRecord], num_minibatches: int) -> list[np.ndarray]:
    """Record indices split into up to `num_minibatches` groups of whole trajectories (in order)."""
    trajectories = list(dict.fromkeys(r.trajectory_id for r in records))
    groups = [g for g in np.array_split(np.asarray(trajectories), min(num_minibatches, len(trajectories))) if len(g)]
    trajectory_ids = np.asarray([r.trajectory_id for r in records])
    return [np.flatnonzero(np.isin(trajectory_ids, g)) for g in groups]


def rollout_metrics(trajectories: Sequence[Trajectory], rewards: np.ndarray) -> dict[str, float]:
    """Reward, accuracy, turns, stop reasons and planner-output health of a batch of trajectories."""
    turns = [len(t.turns) for t in trajectories]
    calls = [turn.planner for t in trajectories for turn in t.turns]
    metrics = {
        "reward": float(np.mean(rewards)),
        "accuracy": float(np.mean(rewards >= 1.0)),
        "turns": float(np.mean(turns)),
        "planner_calls": float(len(calls)),
        "planner_tokens": float(np.mean([len(c.token_ids or ()) for c in calls])) if calls else 0.0,
        "planner_unparsable": float(np.mean([c.step.parse_error is not None for c in calls])) if calls else 0.0,
        "planner_unknown_tool": float(np.mean([c.step.tool_name is None for c in calls])) if calls else 0.0,
        "answered": float(np.mean([t.answer is not None for t in trajectories])),
    }
    for reason in ("verifier", "max_turns", "time_limit"):
        metrics[f"stop_{reason}"] = float(np.mean([t.stop_reason == reason for t in trajectories]))
    return metrics
