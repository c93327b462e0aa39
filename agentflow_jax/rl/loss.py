"""Flow-GRPO policy loss: clipped ratio with dual clip, KL to a frozen reference, entropy bonus.

Per response token (targets under `loss_mask`), with A the row's advantage:

  ratio   = exp(clamp(logp - old_logp, -log_ratio_clamp, +log_ratio_clamp))
  pg      = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
  pg      = min(pg, -A * dual_clip)                  only where A < 0 (dual clip; None disables)
  kl      = k1: d,  k2: d^2 / 2,  k3: exp(-d) + d - 1 (then clamped to +-k3_value_clamp),
            with d = clamp(logp - ref_logp, +-log_ratio_clamp)
  loss    = pg + kl_coef * kl - entropy_coef * entropy          (kl term absent when kl_in_reward)

KL in the reward (`kl_in_reward=True`, as verl's `use_kl_in_reward`): the KL term leaves the loss.
Instead each row's reward is lowered by `kl_coef * sum over its response tokens of kl(old, ref)`
(`kl_reward_penalties`, computed once from the trainer's old log-probs, no gradient), and the
advantage estimator sees `reward - penalty` per row ("turn" grouping) or
`reward - sum of its rows' penalties` per trajectory ("trajectory" grouping; see advantages.py).

Aggregation uses GLOBAL denominators: `token_weights(batch, mode)` gives each token its weight in
the loss of the whole optimizer batch, before it is cut into micro-batches, so a micro-batch's loss
is `sum(weights * per_token_loss)` and summing micro-batch losses (and gradients) reproduces the
full-batch loss (and gradient) exactly. Modes, with m the loss mask, R the rows, |a_r| = sum_t m[r, t]:

  "token-mean"               m / sum(m)                          (verl default; the reference run)
  "flow"                     m / (N_traj * T_i * |a_r|)          (the paper: mean over trajectories,
                                                                  over each trajectory's T_i turns,
                                                                  over each turn's tokens)
  "seq-mean-token-mean"      m / (R * |a_r|)
  "seq-mean-token-sum"       m / R
  "seq-mean-token-sum-norm"  m / (R * norm_length)               (Dr. GRPO: constant length normaliser)

In "flow", N_traj counts the trajectories present in the batch and T_i is the row's
`turns_in_trajectory` (its trajectory's planner calls in the packed step batch). When an optimizer
batch is the whole step, or holds whole trajectories, this is exactly the paper's mean; a batch
that holds only some turns of a trajectory still weighs each turn by 1 / T_i as the full objective does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from agentflow_jax.config_reader import check_fields, setting
from agentflow_jax.rl import logprobs as logprobs_lib
from agentflow_jax.rl.batch import TrainBatch

Array = jax.Array
Metrics = dict[str, Array]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "flow", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Flow-GRPO loss settings; defaults follow the reference run (verl 0.5, SPEC section 3).

    Attributes:
      clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
      dual_clip: for A < 0 the per-token loss is capped at -A * dual_clip (> 1); None disables.
      log_ratio_clamp: log-ratios (policy/old and policy/reference) are clamped to +- this before exp.
      kl_coef: beta, weight of KL(policy || reference); 0 disables the KL term.
      kl_estimator: "k1" (log-ratio), "k2" (half squared log-ratio), "k3" (low-variance, the reference's).
      k3_value_clamp: the k3 value is clamped to +- this, as verl does; None disables.
      kl_in_reward: subtract the KL from the reward instead of adding it to the loss (module docstring).
      entropy_coef: weight of the entropy bonus (subtracted from the loss).
      aggregation: one of AGGREGATIONS; "token-mean" (reference) or "flow" (the paper's objective).
      norm_length: the constant token count of "seq-mean-token-sum-norm" (the max response length).
      temperature: log-probs are of softmax(logits / temperature); set it to the rollout temperature.
      logits_chunk_size: positions per LM-head chunk in `logprobs.token_logprobs`.
    """

    clip_low: float = setting(0.2, min=0.0, max=0.999)
    clip_high: float = setting(0.3, min=0.0)
    dual_clip: float | None = setting(3.0, above=1.0)
    log_ratio_clamp: float = setting(20.0, above=0.0)
    kl_coef: float = setting(0.001, min=0.0)
    kl_estimator: str = setting("k3", choices=KL_ESTIMATORS)
    k3_value_clamp: float | None = setting(10.0, above=0.0)
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    aggregation: str = setting("token-mean", choices=AGGREGATIONS)
    norm_length: int = setting(2048, min=1)
    temperature: float = setting(1.0, above=0.0, set_by="rollout.planner_temperature")
    logits_chunk_size: int = setting(logprobs_lib.DEFAULT_CHUNK_SIZE, min=1)

    def __post_init__(self):
        check_fields(self)

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_coef > 0 and not self.kl_in_reward


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Everything the loss needs for B rows of T positions (split into micro-batches by rows).

    Attributes:
      input_ids, attention_mask, targets: [B, T] int32, as in `TrainBatch`.
      loss_mask: [B, T] float32, 1 on response-token targets.
      token_weights: [B, T] float32, each token's weight in the full-batch loss (`token_weights`).
      advantages: [B] float32, one per row.
      old_logprobs: [B, T] float32, the trainer's log-probs of the sampled tokens under the pre-update
        policy at the rollout temperature: log_softmax(logits / T), with no frequency penalty and no
        top-k / top-p truncation. The PPO ratio compares the policy with itself.
      sampler_logprobs: [B, T] float32, the sampler's log-probs: of the distribution the tokens were
        drawn from (tempered and frequency-penalised), which differs from `old_logprobs` when the
        rollouts use a penalty (metrics only: `sampler_old_abs_gap`).
      ref_logprobs: [B, T] float32 under the frozen reference, or None when no KL is needed.
    """

    input_ids: Array
    attention_mask: Array
    targets: Array
    loss_mask: Array
    token_weights: Array
    advantages: Array
    old_logprobs: Array
    sampler_logprobs: Array
    ref_logprobs: Array | None


@dataclasses.dataclass(frozen=True)
class WeightTotals:
    """The counts the aggregation divides by, over a whole optimizer batch (all processes): loss
    tokens, rows with loss tokens, trajectories with loss tokens."""

    tokens: float
    rows: float
    trajectories: float

    @classmethod
    def of(cls, batch: TrainBatch) -> "WeightTotals":
        """The counts of one packed batch (on one process)."""
        tokens_per_row = batch.loss_mask.sum(axis=1)
        return cls(tokens=float(batch.loss_mask.sum()), rows=float(np.count_nonzero(tokens_per_row)),
                   trajectories=float(len(np.unique(batch.trajectory_id[tokens_per_row > 0]))))


def token_weights(batch: TrainBatch, mode: str, *, norm_length: int = 2048,
                  totals: WeightTotals | None = None) -> np.ndarray:
    """Each token's weight in the full-batch loss, [B, T] float32 (0 off the loss mask); see module docstring.

    `batch` must be the rows of one optimizer update, before splitting into micro-batches; when
    they are one process's share of it, `totals` are the whole update's counts (default: `batch`'s).
    """
    mask = batch.loss_mask.astype(np.float64)
    tokens_per_row = mask.sum(axis=1)
    totals = WeightTotals.of(batch) if totals is None else totals
    if totals.tokens == 0:
        raise ValueError("the batch has no loss tokens")
    if mode == "token-mean":
        row_denominator = np.full_like(tokens_per_row, totals.tokens)
    elif mode == "flow":
        row_denominator = totals.trajectories * batch.turns_in_trajectory * tokens_per_row
    elif mode == "seq-mean-token-mean":
        row_denominator = totals.rows * tokens_per_row
    elif mode == "seq-mean-token-sum":
        row_denominator = np.full_like(tokens_per_row, totals.rows)
    elif mode == "seq-mean-token-sum-norm":
        row_denominator = np.full_like(tokens_per_row, totals.rows * norm_length)
    else:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    row_scale = np.divide(1.0, row_denominator, out=np.zeros_like(row_denominator), where=tokens_per_row > 0)
    return (mask * row_scale[:, None]).astype(np.float32)


def make_loss_inputs(batch: TrainBatch, advantages: np.ndarray, old_logprobs: Any, ref_logprobs: Any | None,
                     config: LossConfig, totals: WeightTotals | None = None) -> LossInputs:
    """Assembles `LossInputs` for one optimizer batch, with token weights of `config.aggregation`.

    Args:
      batch: the packed rows.
      advantages: [B] per row (`advantages.compute_advantages`; 0 on padding rows).
      old_logprobs, ref_logprobs: [B, T] from `logprobs.token_logprobs` (policy before the update,
        frozen reference); ref_logprobs may be None when kl_coef is 0.
      totals: the whole update's counts when `batch` is one process's share (`token_weights`).
    Returns host (numpy) arrays; the trainer places them on its mesh.
    """
    if config.kl_in_loss and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} puts a KL term in the loss: pass reference log-probs")
    weights = token_weights(batch, config.aggregation, norm_length=config.norm_length, totals=totals)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return LossInputs(input_ids=np.asarray(batch.input_ids), attention_mask=np.asarray(batch.attention_mask),
                      targets=np.asarray(batch.targets), loss_mask=f32(batch.loss_mask), token_weights=f32(weights),
                      advantages=f32(advantages), old_logprobs=f32(old_logprobs),
                      sampler_logprobs=f32(batch.sampler_logprobs),
                      ref_logprobs=None if ref_logprobs is None else f32(ref_logprobs))


def kl_divergence(logp: Array, ref_logp: Array, config: LossConfig) -> Array:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens, [B, T]."""
    log_ratio = jnp.clip(logp - ref_logp, -config.log_ratio_clamp, config.log_ratio_clamp)
    if config.kl_estimator == "k1":
        return log_ratio
    if config.kl_estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    k3 = jnp.exp(-log_ratio) + log_ratio - 1.0
    if config.k3_value_clamp is not None:
        k3 = jnp.clip(k3, -config.k3_value_clamp, config.k3_value_clamp)
    return k3


def kl_reward_penalties(old_logprobs: Any, ref_logprobs: Any, loss_mask: np.ndarray,
                        config: LossConfig) -> np.ndarray:
    """KL-in-reward penalty of each row: kl_coef * sum of kl(old, ref) over its response tokens, [B] float64."""
    kl = np.asarray(kl_divergence(jnp.asarray(old_logprobs, jnp.float32), jnp.asarray(ref_logprobs, jnp.float32),
                                  config), np.float64)
    return config.kl_coef * (kl * loss_mask).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class ClippedObjective:
    """Per-token pieces of the clipped surrogate, all [B, T]."""

    loss: Array
    ratio: Array
    clipped_low: Array
    clipped_high: Array
    dual_clipped: Array


def clipped_policy_loss(logp: Array, old_logp: Array, advantages: Array, config: LossConfig) -> ClippedObjective:
    """PPO clipped loss with asymmetric clip and dual clip; advantages [B] or [B, T], log-probs [B, T]."""
    advantages = jnp.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages, logp.shape)
    log_ratio = jnp.clip(logp - old_logp, -config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    loss = jnp.maximum(unclipped, clipped)
    dual_clipped = jnp.zeros(logp.shape, bool)
    if config.dual_clip is not None:
        cap = -advantages * config.dual_clip
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = jnp.where(dual_clipped, cap, loss)
    return ClippedObjective(loss=loss, ratio=ratio,
                            clipped_low=(advantages < 0) & (ratio < 1.0 - config.clip_low),
                            clipped_high=(advantages > 0) & (ratio > 1.0 + config.clip_high),
                            dual_clipped=dual_clipped)


def policy_loss(graphdef: nnx.GraphDef, params: Any, inputs: LossInputs, config: LossConfig) -> tuple[Array, Metrics]:
    """This micro-batch's share of the full-batch loss, and its metric sums.

    Args:
      graphdef, params: `nnx.split` of the policy (differentiate with respect to params).
      inputs: a micro-batch of `LossInputs` (token weights computed on the full batch).
      config: loss settings.
    Returns:
      (loss, metrics): loss = sum(token_weights * per-token loss), a float32 scalar that sums over
      micro-batches to the full-batch loss; metrics as described in `loss_metrics`.
    """
    # Only loss-mask positions carry weight or metrics: the LM head runs on those alone (others read 0).
    logp, entropy = logprobs_lib.token_logprobs(
        graphdef, params, inputs.input_ids, inputs.attention_mask, inputs.targets,
        temperature=config.temperature, chunk_size=config.logits_chunk_size, with_entropy=True,
        mask=inputs.loss_mask)
    return policy_loss_from_logprobs(logp, entropy, inputs, config)


def policy_loss_from_logprobs(logp: Array, entropy: Array, inputs: LossInputs,
                              config: LossConfig) -> tuple[Array, Metrics]:
    """`policy_loss` given the policy's log-probs and entropies [B, T] float32 (the model-free part)."""
    if config.kl_in_loss and inputs.ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} puts a KL term in the loss, but inputs.ref_logprobs is None")
    if config.entropy_coef == 0:
        entropy = jax.lax.stop_gradient(entropy)
    # Values off the loss mask are selected away before any arithmetic (a NaN there, e.g. in a
    # reference log-prob of a padding position, must not reach the loss or its gradient).
    on_mask = inputs.loss_mask > 0
    select = lambda x: jnp.where(on_mask, x, 0.0)  # noqa: E731
    logp, entropy = select(logp), select(entropy)
    inputs = dataclasses.replace(inputs, old_logprobs=select(inputs.old_logprobs),
                                 sampler_logprobs=select(inputs.sampler_logprobs),
                                 token_weights=select(inputs.token_weights),
                                 ref_logprobs=None if inputs.ref_logprobs is None else select(inputs.ref_logprobs))
    objective = clipped_policy_loss(logp, inputs.old_logprobs, inputs.advantages, config)
    kl = None if inputs.ref_logprobs is None else kl_divergence(logp, inputs.ref_logprobs, config)
    per_token = objective.loss - config.entropy_coef * entropy
    if config.kl_in_loss:
        per_token = per_token + config.kl_coef * kl
    loss = jnp.sum(jnp.where(on_mask, inputs.token_weights * per_token, 0.0))
    return loss, loss_metrics(inputs, logp, entropy, kl, objective)


def loss_metrics(inputs: LossInputs, logp: Array, entropy: Array, kl: Array | None,
                 objective: ClippedObjective) -> Metrics:
    """Sums over loss-mask tokens ("sum/<name>"), their count ("count"), and extremes ("min/", "max/").

    Combine micro-batches with `combine_metrics`, then `finalize_metrics` for token means.
    """
    mask = inputs.loss_mask
    on_mask = mask > 0
    advantages = jnp.broadcast_to(inputs.advantages[:, None], mask.shape)
    per_token = {
        "pg_loss": objective.loss,
        "pg_clipfrac_low": objective.clipped_low,
        "pg_clipfrac_high": objective.clipped_high,
        "dual_clipfrac": objective.dual_clipped,
        "ratio": objective.ratio,
        "ppo_kl": inputs.old_logprobs - logp,
        "entropy": entropy,
        "advantage": advantages,
        "advantage_sq": jnp.square(advantages),
        "sampler_old_abs_gap": jnp.abs(inputs.sampler_logprobs - inputs.old_logprobs),
    }
    if kl is not None:
        per_token["kl"] = kl
    metrics = {f"sum/{name}": jnp.sum(jnp.where(on_mask, value, 0.0)) for name, value in per_token.items()}
    metrics["count"] = jnp.sum(mask)
    for name, value in (("ratio", objective.ratio), ("advantage", advantages)):
        metrics[f"min/{name}"] = jnp.min(jnp.where(on_mask, value, jnp.inf))
        metrics[f"max/{name}"] = jnp.max(jnp.where(on_mask, value, -jnp.inf))
    return metrics


def combine_metrics(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Exact combination of micro-batch metrics: sums and counts add, minima and maxima combine."""
    if not parts:
        raise ValueError("combine_metrics needs at least one metrics dict")
    combined = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key.startswith("min/"):
                combined[key] = jnp.minimum(combined[key], value)
            elif key.startswith("max/"):
                combined[key] = jnp.maximum(combined[key], value)
            else:
                combined[key] = combined[key] + value
    return combined


def finalize_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Token means of the summed metrics, plus advantage std and the ratio/advantage extremes.

    Keys: pg_loss, pg_clipfrac_low, pg_clipfrac_high, dual_clipfrac, ratio_mean, ratio_min, ratio_max,
    ppo_kl, entropy, kl (when a reference was given), advantage_mean, advantage_std, advantage_min,
    advantage_max, sampler_old_abs_gap, tokens. Means are NaN when there are no tokens.
    """
    count = float(metrics["count"])
    mean = {key[len("sum/"):]: float(value) / count if count else float("nan")
            for key, value in metrics.items() if key.startswith("sum/")}
    advantage_mean, advantage_sq = mean.pop("advantage"), mean.pop("advantage_sq")
    result = dict(mean, tokens=count, advantage_mean=advantage_mean,
                  advantage_std=float(np.sqrt(max(advantage_sq - advantage_mean ** 2, 0.0))))
    result["ratio_mean"] = result.pop("ratio")
    for key, value in metrics.items():
        if key.startswith(("min/", "max/")):
            kind, name = key.split("/")
            result[f"{name}_{kind}"] = float(value)
    return result


ValueAndGrad = Callable[[Any, LossInputs], tuple[tuple[Array, Metrics], Any]]


def make_value_and_grad(graphdef: nnx.GraphDef, config: LossConfig) -> ValueAndGrad:
    """jitted `(params, micro-batch) -> ((loss, metrics), grads)` of `policy_loss`; compiles once per shape."""
    return jax.jit(jax.value_and_grad(lambda params, inputs: policy_loss(graphdef, params, inputs, config),
                                      has_aux=True))


@dataclasses.dataclass(frozen=True)
class AccumulatedGradients:
    """Sum over micro-batches of losses, gradients and metrics (equal to the full-batch values).

    Attributes:
      grads: pytree like params.
      loss: float32 scalar.
      metrics: combined metric sums (`finalize_metrics` turns them into means).
      is_finite: bool scalar, False when the loss or any gradient is NaN or infinite: skip the update.
    """

    grads: Any
    loss: Array
    metrics: Metrics
    is_finite: Array


def accumulate_gradients(value_and_grad: ValueAndGrad, params: Any,
                         microbatches: Iterable[LossInputs]) -> AccumulatedGradients:
    """Runs `value_and_grad` (e.g. from `make_value_and_grad`) on each micro-batch and sums the results."""
    grads, loss, parts = None, None, []
    for microbatch in microbatches:
        (mb_loss, mb_metrics), mb_grads = value_and_grad(params, microbatch)
        grads, loss = (mb_grads, mb_loss) if grads is None else _add_to_sums((grads, loss), (mb_grads, mb_loss))
        parts.append(mb_metrics)
    if grads is None:
        raise ValueError("accumulate_gradients needs at least one micro-batch")
    return AccumulatedGradients(grads=grads, loss=loss, metrics=combine_metrics(parts),
                                is_finite=_all_finite(loss, grads))


# One program each (not one per leaf): on a mesh every eager op is a multi-device launch. The sums'
# buffers are reused in place.
@functools.partial(jax.jit, donate_argnums=0)
def _add_to_sums(sums: Any, terms: Any) -> Any:
    return jax.tree.map(jnp.add, sums, terms)


@jax.jit
def _all_finite(loss: Array, grads: Any) -> Array:
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(grads):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    return finite
