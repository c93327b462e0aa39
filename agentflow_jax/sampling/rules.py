"""Sampling rules: how the next token is chosen from a row of logits, and its log-prob.

A `SamplingRule` is a pytree: temperature / top-p / top-k / frequency-penalty values are traced
arrays (changing them reuses the compiled decode loop); whether decoding is greedy, whether a
truncation search is needed and whether a frequency penalty applies are static fields.

Semantics (vLLM's penalty, then transformers' TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper):
  * frequency penalty (off at 0): penalised = logits - frequency_penalty * count, count[t] = how
    often token t occurs among the tokens this sample has generated so far (prompt tokens do not
    count), as vLLM's `frequency_penalty`. Without it, penalised = logits.
  * temperature == 0: greedy (argmax of the penalised logits).
  * otherwise scaled = penalised / temperature; top-k keeps the k largest scaled logits (ties with
    the k-th are kept), then top-p keeps the smallest set of most likely tokens whose mass under
    the renormalised top-k distribution reaches top_p (a token is kept when the mass of the
    tokens strictly more likely than it is < top_p); the token is drawn from the kept tokens in
    proportion to exp(scaled).
  * The returned log-prob of a token is always log_softmax(penalised / T) over the FULL
    vocabulary (T = 1 when greedy): the log-prob of the penalised, tempered distribution the
    token was drawn from, before top-k / top-p truncation. Without a penalty this is the policy
    probability the trainer reproduces (`rl.logprobs.token_logprobs` at the same temperature);
    with one it is not (the trainer's model has no penalty).

Truncation thresholds are exact without sorting the vocabulary (a [64, 32000] sort takes ~0.4 s
on CPU): they are read from the 64 most likely tokens (`jax.lax.top_k`) when the top-k / nucleus
ends among them, else found by bisection over the order-preserving int32 keys of the float32
scaled logits (32 masked reductions over the vocabulary).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from agentflow_jax.sampling import draw

Array = jax.Array
_KEY_SEARCH_STEPS = 32  # int32 keys span < 2**32 values
# Top-k / top-p thresholds are read from this many most likely tokens (jax.lax.top_k) when they
# fall among them, which is the usual case; otherwise a bisection over the vocabulary finds them.
CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class SamplingRule:
    """How tokens are chosen (see module docstring).

    Attributes:
      temperature: [] float32; 1.0 when greedy (the log-prob temperature).
      top_p: [] float32 in (0, 1].
      top_k: [] int32, >= 1 when `uses_top_k`.
      frequency_penalty: [] float32, subtracted once per earlier occurrence of a token.
      greedy: static; argmax decoding.
      uses_top_p: static; top_p < 1 (a threshold search runs each step).
      uses_top_k: static; top_k > 0 (a threshold search runs each step).
      uses_frequency_penalty: static; frequency_penalty != 0 (the decode loop keeps [B, V] token
        counts; without it nothing is counted or subtracted).
    """

    temperature: Array
    top_p: Array
    top_k: Array
    frequency_penalty: Array
    greedy: bool
    uses_top_p: bool
    uses_top_k: bool
    uses_frequency_penalty: bool


jax.tree_util.register_dataclass(SamplingRule, data_fields=["temperature", "top_p", "top_k", "frequency_penalty"],
                                 meta_fields=["greedy", "uses_top_p", "uses_top_k", "uses_frequency_penalty"])


def sampling_rule(temperature: float, top_p: float = 1.0, top_k: int = 0,
                  frequency_penalty: float = 0.0) -> SamplingRule:
    """Validates user settings and builds the rule (temperature 0 means greedy).

    Raises:
      ValueError: temperature < 0, top_p outside (0, 1], top_k < 0, or a non-finite penalty.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {top_k}")
    if not math.isfinite(frequency_penalty):
        raise ValueError(f"frequency_penalty must be a finite number (0 disables it), got {frequency_penalty}")
    greedy = temperature == 0
    return SamplingRule(
        temperature=jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        top_p=jnp.asarray(top_p, jnp.float32),
        top_k=jnp.asarray(max(int(top_k), 1), jnp.int32),
        frequency_penalty=jnp.asarray(frequency_penalty, jnp.float32),
        greedy=greedy,
        uses_top_p=not greedy and top_p < 1.0,
        uses_top_k=not greedy and top_k > 0,
        uses_frequency_penalty=frequency_penalty != 0,
    )


def choose_tokens(logits: Array, rule: SamplingRule, uniforms: Array,
                  counts: Array | None = None) -> tuple[Array, Array]:
    """Picks one token per row and returns it with its full-vocabulary log-prob.

    Args:
      logits: [B, V] float32 next-token logits.
      rule: the sampling rule.
      uniforms: [B] float32 in [0, 1), the row's random number for this step (unused if greedy).
      counts: [B, V] int32 occurrences of each token among the row's generated tokens; required
        when `rule.uses_frequency_penalty`, ignored otherwise.
    Returns:
      (tokens [B] int32, log_probs [B] float32 = log_softmax(penalised / T)[token], penalised =
      logits - frequency_penalty * counts).
    """
    logits = logits.astype(jnp.float32)
    if rule.uses_frequency_penalty:
        logits = logits - rule.frequency_penalty * counts.astype(jnp.float32)
    scaled = logits / rule.temperature
    relative = scaled - scaled.max(axis=-1, keepdims=True)  # <= 0, exactly 0 at the max
    weights = jnp.exp(relative)
    if rule.greedy:
        tokens = draw.first_argmax(relative)
    else:
        tokens = draw.sample_proportional(truncated_weights(relative, weights, rule), uniforms)
    log_norm = jnp.log(jnp.sum(weights, axis=-1))
    chosen = jnp.take_along_axis(relative, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_norm


def truncated_weights(relative: Array, weights: Array, rule: SamplingRule) -> Array:
    """Weights with the tokens removed by top-k, then top-p, set to 0.

    Args:
      relative: [B, V] float32 scaled logits minus their row maximum.
      weights: [B, V] float32 exp(relative).
      rule: the (non-greedy) sampling rule.
    Returns:
      [B, V] float32.
    """
    if not (rule.uses_top_k or rule.uses_top_p):
        return weights
    keys = order_keys(relative)
    candidate_values = jax.lax.top_k(relative, min(CANDIDATES, relative.shape[-1]))[0]
    candidates = order_keys(candidate_values)  # [B, M], descending
    candidate_weights = jnp.exp(candidate_values)
    if rule.uses_top_k:
        kth = kth_largest_key(keys, candidates, rule.top_k)[:, None]
        weights = jnp.where(keys >= kth, weights, 0.0)
        candidate_weights = jnp.where(candidates >= kth, candidate_weights, 0.0)
    if rule.uses_top_p:
        nucleus = nucleus_key(keys, weights, candidates, candidate_weights, rule.top_p)[:, None]
        weights = jnp.where(keys >= nucleus, weights, 0.0)
    return weights


def order_keys(x: Array) -> Array:
    """float32 [..] -> int32 keys with the same order (x < y iff key(x) < key(y)); no NaNs."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


def kth_largest_key(keys: Array, candidates: Array, k: Array) -> Array:
    """The k-th largest key per row (keys >= it are the top-k plus ties with the k-th).

    Args:
      keys: [B, V] int32 from `order_keys`.
      candidates: [B, M] the M largest keys, descending (read directly when k <= M).
      k: [] int32 >= 1 (clipped to V).
    Returns:
      [B] int32.
    """
    k = jnp.minimum(k, keys.shape[-1])

    def search() -> Array:
        # Largest t with count(keys >= t) >= k: true at the row minimum, false above the maximum.
        return _bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, keys.min(axis=-1), keys.max(axis=-1) + 1)

    def read() -> Array:
        return jax.lax.dynamic_index_in_dim(candidates, k - 1, axis=1, keepdims=False)

    return jax.lax.cond(k <= candidates.shape[-1], read, search)


def nucleus_key(keys: Array, weights: Array, candidates: Array, candidate_weights: Array, top_p: Array) -> Array:
    """Smallest key of the top-p nucleus per row: a token is in the nucleus when the weight of the
    tokens strictly above it is < top_p * total weight (so the most likely token always is).

    Exact either way: read from the candidates when every row's nucleus ends inside them,
    otherwise found by bisection over the whole vocabulary.

    Args:
      keys: [B, V] int32 from `order_keys`.
      weights: [B, V] float32 unnormalised probabilities (0 for tokens already removed).
      candidates: [B, M] the M largest keys, descending.
      candidate_weights: [B, M] their weights.
      top_p: [] float32 in (0, 1].
    Returns:
      [B] int32.
    """
    target = top_p * weights.sum(axis=-1)  # [B]
    # Every key above a candidate's is a candidate too, so this is its strictly-above weight.
    above = jnp.sum(jnp.where(candidates[:, None, :] > candidates[:, :, None], candidate_weights[:, None, :], 0.0),
                    axis=-1)  # [B, M]
    in_nucleus = above < target[:, None]
    # Complete when the last candidate is already outside (so is everything below it).
    complete = jnp.all(~in_nucleus[:, -1]) | (candidates.shape[-1] == keys.shape[-1])

    def read() -> Array:
        return jnp.min(jnp.where(in_nucleus, candidates, jnp.iinfo(jnp.int32).max), axis=-1)

    def search() -> Array:
        # Largest t whose strictly-above weight is still >= target: true below the row minimum,
        # false at the maximum (nothing is above it); the nucleus starts one key higher.
        def mass_reaches_target(t: Array) -> Array:
            return jnp.sum(jnp.where(keys > t[:, None], weights, 0.0), axis=-1) >= target

        return _bisect(mass_reaches_target, keys.min(axis=-1) - 1, keys.max(axis=-1)) + 1

    return jax.lax.cond(complete, read, search)


def _bisect(holds, lo: Array, hi: Array) -> Array:
    """Largest t in [lo, hi) with holds(t), for a per-row predicate that is true at lo, false at
    hi and switches once. lo, hi: [B] int32 (hi - lo < 2**31). Returns [B] int32."""

    def step(_, bounds):
        lo, hi = bounds
        open_ = hi - lo > 1
        mid = lo + (hi - lo) // 2
        ok = holds(mid)
        return jnp.where(open_ & ok, mid, lo), jnp.where(open_ & ~ok, mid, hi)

    return jax.lax.fori_loop(0, _KEY_SEARCH_STEPS, step, (lo, hi))[0]
