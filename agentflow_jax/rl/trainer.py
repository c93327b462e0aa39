"""One Flow-GRPO step: rollouts in the agent's own loop -> rewards -> advantages -> updates.

    queries ──rollout_batch──> trajectories (planner on the policy, other modules frozen)
            ──score──────────> one reward per trajectory, broadcast to its planner turns
            ──TurnRecord─────> exact prompt / sampled ids and sampler log-probs of every planner call
            ──pack_turns─────> mini-batches of whole trajectories, rows padded to micro-batch size
            ──token_logprobs─> old (policy before the update) and reference log-probs
            ──policy_loss────> gradients accumulated over micro-batches with global weights
            ──optax──────────> new policy parameters (skipped, and reported, when not finite)

The trainer owns the policy parameters, the frozen reference parameters (the initial policy:
by default they also serve query analysis, executor, verifier, generator and the tools' LLM;
any other engine, e.g. an OpenAI-compatible endpoint, can be passed instead) and the optimizer
state. It holds no I/O: logging, checkpoints and evaluation live in `train.py`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agentflow_jax.engines import Engine
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.agent.rollout import RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.models.tokenizer import Tokenizer
from agentflow_jax.rl import advantages as advantages_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TrainBatch, TurnRecord, pack_turns, split_microbatches
from agentflow_jax.rl.logprobs import token_logprobs
from agentflow_jax.rl.rewards import score
from agentflow_jax.sampling import Sampler
from agentflow_jax.tools.base import Toolbox


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

    group_size: int = 8
    estimator: str = "grpo"
    grouping: str = "trajectory"
    loss: loss_lib.LossConfig = loss_lib.LossConfig()
    ppo_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_rows: int = 8
    length_bucket: int = 128

    def __post_init__(self):
        for name in ("group_size", "ppo_epochs", "num_minibatches", "micro_batch_rows", "length_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.estimator not in advantages_lib.ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; "
                             f"expected one of {sorted(advantages_lib.ADVANTAGE_ESTIMATORS)}")
        if self.grouping not in advantages_lib.GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; expected one of {advantages_lib.GROUPINGS}")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did: its trajectories, their rewards and the metrics to log."""

    trajectories: list[Trajectory]
    rewards: np.ndarray
    metrics: dict[str, float]


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.01,
                   grad_clip: float = 1.0, warmup_steps: int = 0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a linear warm-up to a constant rate (the paper: 1e-6)."""
    schedule = (optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0
                else optax.constant_schedule(learning_rate))
    if warmup_steps > 0:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(learning_rate)], [warmup_steps])
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


class FlowGRPOTrainer:
    """Policy / reference parameters, optimizer state and the compiled functions of one run.

    Args:
      graphdef: `nnx.split(model)[0]` of the planner model.
      params: initial policy parameters (also the frozen reference).
      tokenizer: the model's tokenizer (chat template, stop ids, pad id).
      toolbox_factory: `engine -> Toolbox`, called once with the frozen engine (the tools' LLM).
      optimizer: an optax transformation, e.g. `make_optimizer`.
      config: `TrainerConfig`.
      rollout: loop limits and per-module sampling.
      max_cache_length: KV-cache slots per sequence of the samplers.
      seed: base seed of the planner's sampling; step s samples with a seed derived from (seed, s).
      frozen_engine: the engine of the frozen modules and tools; default: the reference parameters
        through the policy's compiled sampler.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *, tokenizer: Tokenizer, toolbox_factory,
                 optimizer: optax.GradientTransformation, config: TrainerConfig, rollout: RolloutConfig,
                 max_cache_length: int = 4096, seed: int = 0, frozen_engine: Engine | None = None):
        if abs(rollout.planner.temperature - config.loss.temperature) > 1e-9 and rollout.planner.temperature > 0:
            raise ValueError(f"loss temperature {config.loss.temperature} must equal the planner's sampling "
                             f"temperature {rollout.planner.temperature} (the ratio compares the same distribution)")
        self.graphdef, self.config, self.rollout_config, self.seed = graphdef, config, rollout, seed
        self.tokenizer = tokenizer
        self.params = params
        # A copy: updates donate the policy's buffers, the reference must outlive them.
        self.ref_params = jax.tree.map(jnp.copy, params)
        self.optimizer = optimizer
        self.opt_state = optimizer.init(params)
        self.step = 0
        self.policy_sampler = Sampler.from_state(graphdef, params, max_cache_length=max_cache_length)
        if frozen_engine is None:
            frozen_engine = JaxEngine(self.policy_sampler.with_params(self.ref_params), tokenizer, seed=seed + 1)
        self.frozen_engine: Engine = frozen_engine
        self.toolbox: Toolbox = toolbox_factory(self.frozen_engine)
        self._value_and_grad = loss_lib.make_value_and_grad(graphdef, config.loss)
        self._logprobs = jax.jit(lambda p, ids, mask, targets, loss_mask: token_logprobs(
            graphdef, p, ids, mask, targets, temperature=config.loss.temperature,
            chunk_size=config.loss.logits_chunk_size, mask=loss_mask)[0])
        self._apply = jax.jit(self._apply_updates, donate_argnums=(0, 1))

    # -- state (checkpointed) ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the data iterator (a pytree)."""
        return {"params": self.params, "opt_state": self.opt_state, "step": jnp.asarray(self.step, jnp.int32)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.params, self.opt_state, self.step = state["params"], state["opt_state"], int(state["step"])

    def planner_engine(self, *, seed: int) -> JaxEngine:
        """An engine sampling from the current policy parameters."""
        self.policy_sampler.update_params(self.params)
        return JaxEngine(self.policy_sampler, self.tokenizer, seed=seed)

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, queries: Sequence[Mapping[str, Any]]) -> StepResult:
        """Rollouts for `queries` (dicts with "query", "answer" and optional "kind"), then updates."""
        start = time.perf_counter()
        trajectories = rollout_batch([q["query"] for q in queries], n=self.config.group_size,
                                     planner=self.planner_engine(seed=self.seed * 7919 + self.step),
                                     frozen=self.frozen_engine, toolbox=self.toolbox, config=self.rollout_config)
        rewards = score_trajectories(trajectories, queries)
        rollout_s = time.perf_counter() - start
        records = turn_records(trajectories, rewards)
        metrics = rollout_metrics(trajectories, rewards)
        metrics.update(self.update(records))
        metrics.update(rollout_s=rollout_s, step_s=time.perf_counter() - start)
        self.step += 1
        return StepResult(trajectories=trajectories, rewards=rewards, metrics=metrics)

    def update(self, records: Sequence[TurnRecord]) -> dict[str, float]:
        """PPO epochs x mini-batches of optimizer updates on the given planner calls."""
        if not records:
            return {"skipped_updates": 0.0, "updates": 0.0}
        advantages = compute_record_advantages(records, self.config)
        minibatches = []
        for indices in trajectory_minibatches(records, self.config.num_minibatches):
            batch = pack_turns([records[i] for i in indices], pad_id=self.tokenizer.pad_token_id,
                               length_bucket=self.config.length_bucket, row_bucket=self.config.micro_batch_rows)
            row_advantages = np.zeros(batch.num_rows, np.float32)
            row_advantages[:len(indices)] = advantages[indices]
            old = self._batched_logprobs(self.params, batch)
            ref = self._batched_logprobs(self.ref_params, batch) if self.config.loss.kl_coef > 0 else None
            if self.config.loss.kl_in_reward:
                penalties = loss_lib.kl_reward_penalties(old, ref, batch.loss_mask, self.config.loss)
                row_advantages = advantages_lib.batch_advantages(
                    batch, estimator=self.config.estimator, grouping=self.config.grouping, kl_penalties=penalties)
                ref = None
            minibatches.append(loss_lib.make_loss_inputs(batch, row_advantages, old, ref, self.config.loss))
        parts, skipped, losses = [], 0, []
        for _ in range(self.config.ppo_epochs):
            for inputs in minibatches:
                micro = split_microbatches(inputs, inputs.input_ids.shape[0] // self.config.micro_batch_rows)
                acc = loss_lib.accumulate_gradients(self._value_and_grad, self.params, micro)
                if bool(acc.is_finite):
                    self.params, self.opt_state, grad_norm = self._apply(self.params, self.opt_state, acc.grads)
                    parts.append(acc.metrics)
                    losses.append((float(acc.loss), float(grad_norm)))
                else:
                    skipped += 1
        metrics = {"updates": float(len(parts)), "skipped_updates": float(skipped)}
        if parts:
            metrics.update(loss_lib.finalize_metrics(loss_lib.combine_metrics(parts)))
            metrics["loss"] = float(np.mean([l for l, _ in losses]))
            metrics["grad_norm"] = float(np.mean([g for _, g in losses]))
        return metrics

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


def score_trajectories(trajectories: Sequence[Trajectory], queries: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Final-outcome reward of each trajectory: its <answer> scored against its query's gold answer."""
    return np.asarray([score(t.answer, queries[t.query_id]["answer"], queries[t.query_id].get("kind", "exact"),
                             choices=queries[t.query_id].get("choices"), question=queries[t.query_id]["query"])
                       for t in trajectories], np.float32)


def turn_records(trajectories: Sequence[Trajectory], rewards: np.ndarray) -> list[TurnRecord]:
    """One TurnRecord per planner call that produced tokens, with its trajectory's reward."""
    records = []
    for index, (trajectory, reward) in enumerate(zip(trajectories, rewards)):
        for turn in trajectory.turns:
            call = turn.planner
            if not call.token_ids:
                continue
            records.append(TurnRecord(query_id=trajectory.query_id, trajectory_id=index,
                                      prompt_ids=tuple(call.prompt_ids), response_ids=tuple(call.token_ids),
                                      sampler_logprobs=tuple(call.logprobs), reward=float(reward)))
    return records


def compute_record_advantages(records: Sequence[TurnRecord], config: TrainerConfig) -> np.ndarray:
    """[len(records)] advantages over the whole step's groups (before any mini-batch split)."""
    return advantages_lib.compute_advantages(
        np.asarray([r.reward for r in records]), np.asarray([r.query_id for r in records]),
        np.asarray([r.trajectory_id for r in records]), estimator=config.estimator, grouping=config.grouping)


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
