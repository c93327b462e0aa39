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

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from agentflow_jax import distributed, sharding
from agentflow_jax.agent.rollout import FrozenEngines, RolloutConfig, Trajectory, rollout_batch
from agentflow_jax.config_reader import check_fields, setting
from agentflow_jax.engines import Engine
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.models.tokenizer import Tokenizer
from agentflow_jax.rl import advantages as advantages_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TrainBatch, TurnRecord, microbatch, pack_turns, stack_microbatches
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
      num_minibatches: optimizer updates per epoch, each holding whole trajectories (whole GRPO
        groups when there are at least as many queries as mini-batches).
      minibatch_rows: when > 0, mini-batches are instead consecutive chunks of this many rows
        (planner calls) over all processes, cutting trajectories where they fall, as the reference
        implementation runs it (its "mini-batch of 64 rows").
      micro_batch_rows: rows per gradient micro-batch over all processes (each contributes
        micro_batch_rows / processes); rows are padded to a multiple of it.
      length_bucket: sequence lengths are rounded up to a multiple of this (few compiled shapes).
    """

    group_size: int = setting(8, min=1)
    estimator: str = setting("grpo", choices=tuple(advantages_lib.ADVANTAGE_ESTIMATORS))
    grouping: str = setting("trajectory", choices=advantages_lib.GROUPINGS)
    loss: loss_lib.LossConfig = loss_lib.LossConfig()
    ppo_epochs: int = setting(1, min=1)
    num_minibatches: int = setting(1, min=1)
    minibatch_rows: int = setting(0, min=0)
    micro_batch_rows: int = setting(8, min=1)
    length_bucket: int = setting(128, min=1)

    def __post_init__(self):
        check_fields(self)


FROZEN_ROLES = ("analysis", "executor", "verifier", "generator", "tools")
"""The frozen modules (query analysis, executor, verifier, generator) and the LLM inside the tools."""


class MiniBatch(NamedTuple):
    """One optimizer update: its loss inputs stacked into micro-batches ([M, R, ...] device arrays,
    rows sharded over the mesh's batch axes), and this process's share of it on the host: the
    packed rows, each row's advantage, and the pre-update policy's and the reference's log-probs
    ([B, T] numpy, B = M x R / processes; the reference's None without a KL term in the loss)."""

    inputs: loss_lib.LossInputs
    batch: TrainBatch
    advantages: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did: this process's trajectories and rewards, and the run's metrics."""

    trajectories: list[Trajectory]
    rewards: np.ndarray
    metrics: dict[str, float]


class FlowGRPOTrainer:
    """The run's `TrainState`, the frozen reference parameters and the compiled functions of one run.

    On a mesh, the parameters, the optimizer state and the update's arrays live in the training
    layout (`rules`, e.g. FSDP), and each process samples its own rollouts with the policy (and the
    reference, when it serves frozen roles) moved to the sampling layout (`sampling_rules`) on this
    process's devices (`distributed.local_mesh`), once per step, on device.

    Args:
      graphdef: `nnx.split(model)[0]` of the planner model.
      params: initial policy parameters (also the frozen reference), placed on `mesh` by `rules`.
      tokenizer: the model's tokenizer (chat template, stop ids, pad id).
      toolbox_factory: `engine -> Toolbox`, called once with the tools' engine.
      optimizer: an optax transformation (`optim.make_optimizer`).
      config: `TrainerConfig`; its loss temperature must be the planner's sampling temperature.
      rollout: loop limits and per-module sampling.
      max_cache_length: KV-cache slots per sequence of the samplers.
      max_cache_rows: most sequences per sampler call (`Sampler.max_rows`; None: no limit).
      seed: base seed of the planner's sampling (`TrainState.step_seed`).
      frozen_engines: the engine of each frozen role ("analysis", "executor", "verifier", "generator",
        "tools": the tools' LLM), or one engine for all; a role without one (default: all) is served by
        the reference parameters through the policy's compiled sampler.
      judge: scores queries of kind "judge" (`rewards.LLMJudge`); None when there are none.
      data_iterator: the training data's iterator, kept in the state for checkpoints.
      mesh: the device mesh of every process (None: one device).
      rules, sampling_rules: logical-axis rules (tables or preset names) of training and sampling.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *, tokenizer: Tokenizer, toolbox_factory,
                 optimizer: optax.GradientTransformation, config: TrainerConfig, rollout: RolloutConfig,
                 max_cache_length: int = 4096, max_cache_rows: int | None = None, seed: int = 0,
                 frozen_engines: Engine | Mapping[str, Engine | None] | None = None,
                 judge: LLMJudge | None = None, data_iterator: Any = None, mesh: Mesh | None = None,
                 rules: sharding.Rules | str = "training", sampling_rules: sharding.Rules | str = "sampling"):
        if abs(rollout.planner.temperature - config.loss.temperature) > 1e-9 and rollout.planner.temperature > 0:
            raise ValueError(f"loss temperature {config.loss.temperature} must equal the planner's sampling "
                             f"temperature {rollout.planner.temperature} (the ratio compares the same distribution)")
        processes = jax.process_count()
        if config.micro_batch_rows % processes:
            raise ValueError(f"micro_batch_rows={config.micro_batch_rows} must be a multiple of the {processes} "
                             "processes (each contributes the same share of every micro-batch)")
        self.graphdef, self.config, self.rollout_config = graphdef, config, rollout
        self.tokenizer, self.judge = tokenizer, judge
        self.mesh = mesh
        self.rules, self.sampling_rules = sharding.rules_from(rules), sharding.rules_from(sampling_rules)
        self.sampling_mesh = None if mesh is None else distributed.local_mesh(mesh)
        self._to_sampling_layout = None if mesh is None else jax.jit(
            functools.partial(_cast_floats, dtype=nnx.merge(graphdef, params).dtype),
            out_shardings=sharding.state_shardings(params, mesh, self.sampling_rules))
        # A copy: updates donate the policy's buffers, the reference must outlive them.
        self.ref_params = jax.tree.map(jnp.copy, params)
        self.optimizer = optimizer
        self.state = TrainState.create(params, optimizer, seed=seed, data_iterator=data_iterator)
        if mesh is not None:  # optimizer state sharded like the parameters (Adam's moments mirror them)
            target = sharding.abstract_opt_state(optimizer, params)
            self.state = self.state.replace(opt_state=jax.jit(
                optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, target))(params))
        self.policy_sampler = Sampler.from_state(graphdef, self.sampling_params(params),
                                                 max_cache_length=max_cache_length, max_rows=max_cache_rows,
                                                 mesh=self.sampling_mesh,
                                                 rules=self.sampling_rules)
        if not isinstance(frozen_engines, Mapping):
            frozen_engines = dict.fromkeys(FROZEN_ROLES, frozen_engines)
        unknown = sorted(set(frozen_engines) - set(FROZEN_ROLES))
        if unknown:
            raise ValueError(f"frozen_engines names unknown role(s) {unknown}; roles: {list(FROZEN_ROLES)}")
        reference = None
        if any(frozen_engines.get(role) is None for role in FROZEN_ROLES):
            reference = JaxEngine(self.policy_sampler.with_params(self.sampling_params(self.ref_params)), tokenizer,
                                  seed=seed + 1)
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

    def sampling_params(self, params: nnx.State) -> nnx.State:
        """`params` in the sampling layout on this process's devices: one reshard on device (weights
        replicated over the batch axes, so each process holds them whole, and in the model's compute
        dtype: bf16 weights for float32 masters), then its local copy. Without a mesh: `params`."""
        if self.mesh is None:
            return params
        moved = self._to_sampling_layout(params)
        local = sharding.state_shardings(params, self.sampling_mesh, self.sampling_rules)
        return jax.tree.map(distributed.to_local, moved, local)

    def planner_engine(self, *, seed: int) -> JaxEngine:
        """An engine sampling from the current policy parameters (on this process's devices)."""
        self.policy_sampler.update_params(self.sampling_params(self.state.params))
        return JaxEngine(self.policy_sampler, self.tokenizer, seed=seed)

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, queries: Sequence[Mapping[str, Any]]) -> StepResult:
        """Rollouts of this process's `queries` (dicts with "query", "answer", optional "kind"), then
        the update of the whole step's rows (all processes)."""
        start = time.perf_counter()
        n = self.config.group_size
        trajectories = rollout_batch([q["query"] for q in queries], n=n,
                                     planner=self.planner_engine(seed=self.state.step_seed()),
                                     frozen=self.frozen_engines, toolbox=self.toolbox, config=self.rollout_config,
                                     first_sample_id=jax.process_index() * len(queries) * n)
        rewards = score_trajectories(trajectories, queries, judge=self.judge)
        rollout_s = time.perf_counter() - start
        records = turn_records(trajectories, rewards)
        metrics = rollout_metrics(trajectories, rewards)
        metrics.update(self.update(records))
        metrics.update(rollout_s=rollout_s, step_s=time.perf_counter() - start)
        self.state = self.state.replace(step=self.state.step + 1)
        return StepResult(trajectories=trajectories, rewards=rewards, metrics=metrics)

    def update(self, records: Sequence[TurnRecord]) -> dict[str, float]:
        """PPO epochs x mini-batches of optimizer updates on the step's planner calls (every process
        passes its own; all of them update together)."""
        if not distributed.global_sum(len(records)):
            return {"skipped_updates": 0.0, "updates": 0.0}
        minibatches = self.prepare_minibatches(records)
        parts, skipped, losses = [], 0, []
        params, opt_state = self.state.params, self.state.opt_state
        for _ in range(self.config.ppo_epochs):
            for minibatch in minibatches:
                micro = [microbatch(minibatch.inputs, i) for i in range(minibatch.inputs.input_ids.shape[0])]
                with self._activation_sharding():
                    acc = loss_lib.accumulate_gradients(self._value_and_grad, params, micro)
                if distributed.scalar(acc.is_finite):
                    params, opt_state, grad_norm = self._apply(params, opt_state, acc.grads)
                    parts.append(acc.metrics)
                    losses.append((distributed.scalar(acc.loss), distributed.scalar(grad_norm)))
                else:
                    skipped += 1
        self.state = self.state.replace(params=params, opt_state=opt_state)
        metrics = {"updates": float(len(parts)), "skipped_updates": float(skipped)}
        if parts:
            combined = loss_lib.combine_metrics(parts)
            metrics.update(loss_lib.finalize_metrics({k: distributed.scalar(v) for k, v in combined.items()}))
            metrics["loss"] = float(np.mean([l for l, _ in losses]))
            metrics["grad_norm"] = float(np.mean([g for _, g in losses]))
        return metrics

    def prepare_minibatches(self, records: Sequence[TurnRecord]) -> list[MiniBatch]:
        """The step's mini-batches (this process's `records` and every other process's): packed rows
        placed on the mesh in micro-batches, with advantages and old / reference log-probs.

        Advantages are computed once over the whole step's groups (a query's trajectories are all on
        one process), before the split; with KL in the reward, each record's penalty comes from its
        old and reference log-probs and the advantages over whole groups are computed from all of
        them, so a trajectory gets the same advantage however the step is cut. Token weights use the
        whole update's counts over every process.
        """
        config, processes = self.config, jax.process_count()
        splits = self._minibatch_indices(records)
        turns = collections.Counter(r.trajectory_id for r in records)
        micro_rows = config.micro_batch_rows // processes
        shapes = np.zeros((len(splits), 2), np.int64)
        for k, indices in enumerate(splits):
            if len(indices):
                shapes[k] = (len(indices), max(len(records[i].prompt_ids) + len(records[i].response_ids)
                                               for i in indices))
        agreed = distributed.allgather(shapes).max(axis=0)  # every process packs the same shapes
        prepared = []
        for indices, (rows, length) in zip(splits, agreed):
            batch = pack_turns([records[i] for i in indices], pad_id=self.tokenizer.pad_token_id,
                               length=_round_up(int(length), config.length_bucket),
                               num_rows=_round_up(max(int(rows), 1), micro_rows), turns_per_trajectory=turns)
            stacked = self._on_mesh(stack_microbatches(
                (batch.input_ids, batch.attention_mask, batch.targets, batch.loss_mask), batch.num_rows // micro_rows))
            old = self._stacked_logprobs(self.state.params, stacked)
            ref = self._stacked_logprobs(self.ref_params, stacked) if config.loss.kl_coef > 0 else None
            prepared.append((indices, batch, stacked, old, ref))
        penalties = None
        if config.loss.kl_in_reward:
            penalties = np.zeros(len(records))
            for indices, batch, _, old, ref in prepared:
                penalties[indices] = loss_lib.kl_reward_penalties(old, ref, batch.loss_mask, config.loss)[:len(indices)]
        advantages = compute_record_advantages(records, config, kl_penalties=penalties) if records else np.zeros(0)
        totals = [loss_lib.WeightTotals(*map(distributed.global_sum, dataclasses.astuple(loss_lib.WeightTotals.of(b))))
                  for _, b, _, _, _ in prepared]
        minibatches = []
        for (indices, batch, stacked, old, ref), total in zip(prepared, totals):
            row_advantages = np.zeros(batch.num_rows, np.float32)
            row_advantages[:len(indices)] = advantages[indices]
            ref = None if config.loss.kl_in_reward else ref
            inputs = loss_lib.make_loss_inputs(batch, row_advantages, old, ref, config.loss, totals=total)
            inputs = self._on_mesh(stack_microbatches(inputs, batch.num_rows // micro_rows))
            minibatches.append(MiniBatch(inputs, batch, row_advantages, old, ref))
        return minibatches

    # -- internals --------------------------------------------------------------------------------

    def _minibatch_indices(self, records: Sequence[TurnRecord]) -> list[np.ndarray]:
        """This process's record indices of each mini-batch (the same number on every process)."""
        rows = bool(self.config.minibatch_rows)
        counts = distributed.allgather(len(records) if rows else len({r.trajectory_id for r in records}))
        return minibatch_split(records, num_minibatches=self.config.num_minibatches,
                               minibatch_rows=self.config.minibatch_rows,
                               unit_offset=int(counts[:jax.process_index()].sum()), total_units=int(counts.sum()))

    def _on_mesh(self, stacked: Any) -> Any:
        """Host arrays [M, R_local, ...] of every process -> device arrays [M, R_local x processes, ...]
        with the rows (axis 1) sharded over the training rules' batch axes."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, stacked)

        def place(x: np.ndarray) -> jax.Array:
            axes = (None, "batch") + (None,) * (x.ndim - 2)
            global_shape = (x.shape[0], x.shape[1] * jax.process_count()) + x.shape[2:]
            spec = sharding.partition_spec(global_shape, axes, self.mesh, self.rules)
            return distributed.global_batch(x, NamedSharding(self.mesh, spec), global_shape)

        return jax.tree.map(place, stacked)

    def _stacked_logprobs(self, params: nnx.State, stacked: tuple[jax.Array, ...]) -> np.ndarray:
        """This process's rows' [B, T] log-probs, computed micro-batch by micro-batch on the mesh (the
        loss's shapes: no new compiles). Only loss-mask positions are computed; others read 0."""
        with self._activation_sharding():
            parts = [self._logprobs(params, *(x[i] for x in stacked)) for i in range(stacked[0].shape[0])]
        return np.concatenate([distributed.local_rows(p) for p in parts], axis=0)

    def _activation_sharding(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.activation_sharding(self.mesh, self.rules)

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


def minibatch_split(records: Sequence[TurnRecord], *, num_minibatches: int, minibatch_rows: int = 0,
                    unit_offset: int = 0, total_units: int | None = None) -> list[np.ndarray]:
    """Record indices of each mini-batch: contiguous chunks of the whole step's trajectories in order
    (`num_minibatches` of them, fewer when there are fewer trajectories), or of its rows in chunks of
    `minibatch_rows` (when > 0; trajectories may then be cut).

    When `records` are one process's share of the step, `unit_offset` counts the trajectories (rows)
    of the processes before it and `total_units` those of all processes: each process then gets its
    part of the same chunks a single process would cut (some parts empty), and the same number of them.
    """
    if minibatch_rows:
        units = np.arange(len(records))
    else:
        order = {t: i for i, t in enumerate(dict.fromkeys(r.trajectory_id for r in records))}
        units = np.asarray([order[r.trajectory_id] for r in records], np.int64)
    total = (len(set(units.tolist())) if total_units is None else total_units)
    if minibatch_rows:
        chunks = [np.arange(start, min(start + minibatch_rows, total))
                  for start in range(0, max(total, 1), minibatch_rows)]
    else:
        chunks = np.array_split(np.arange(total), max(1, min(num_minibatches, total)))
    return [np.flatnonzero(np.isin(units + unit_offset, chunk)) for chunk in chunks]


def _cast_floats(params: Any, *, dtype: Any) -> Any:
    """Floating-point arrays of a pytree cast to `dtype` (what the model computes in); others unchanged."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


_STOP_REASONS = ("verifier", "max_turns", "time_limit")


def rollout_metrics(trajectories: Sequence[Trajectory], rewards: np.ndarray) -> dict[str, float]:
    """Reward, accuracy, turns, stop reasons and planner-output health over every process's trajectories."""
    per_trajectory = distributed.gather_ragged(np.asarray(
        [[reward, reward >= 1.0, len(t.turns), t.answer is not None] + [t.stop_reason == r for r in _STOP_REASONS]
         for t, reward in zip(trajectories, rewards)], np.float64).reshape(len(trajectories), 4 + len(_STOP_REASONS)))
    calls = [turn.planner for t in trajectories for turn in t.turns]
    per_call = distributed.gather_ragged(np.asarray(
        [[len(c.token_ids or ()), c.step.parse_error is not None, c.step.tool_name is None] for c in calls],
        np.float64).reshape(len(calls), 3))
    mean = per_trajectory.mean(axis=0)
    call_mean = per_call.mean(axis=0) if len(per_call) else np.zeros(3)
    metrics = {"reward": mean[0], "accuracy": mean[1], "turns": mean[2], "answered": mean[3],
               "planner_calls": float(len(per_call)), "planner_tokens": call_mean[0],
               "planner_unparsable": call_mean[1], "planner_unknown_tool": call_mean[2]}
    metrics.update({f"stop_{reason}": mean[4 + i] for i, reason in enumerate(_STOP_REASONS)})
    return {key: float(value) for key, value in metrics.items()}
