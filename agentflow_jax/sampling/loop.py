"""The two jitted programs of the sampler: prefill and the `lax.while_loop` decode.

Both are pure functions of (graphdef, params, arrays); `Sampler` jits them once per shape bucket.
Rows are independent: each has its own random key (folded from the call seed and the row's
global index), its own done flag and its own count of generated tokens; all rows share the
cache's write index, so finished rows keep decoding harmlessly until every row is done.
"""

from __future__ import annotations

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax import sharding
from agentflow_jax.models.qwen2 import KVCache
from agentflow_jax.sampling import rules

Array = jax.Array

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


def constrain_cache(cache: KVCache) -> KVCache:
    """Pins the cache's sharding (batch over data/fsdp, KV heads over tensor) when tracing under
    `sharding.activation_sharding`; a no-op otherwise."""
    return KVCache(
        k=sharding.constrain(cache.k, CACHE_AXES),
        v=sharding.constrain(cache.v, CACHE_AXES),
        valid=sharding.constrain(cache.valid, ("batch", "cache_length")),
        next_position=sharding.constrain(cache.next_position, ("batch",)),
        index=cache.index,
    )


def prefill(graphdef: nnx.GraphDef, params: nnx.State, input_ids: Array, attention_mask: Array, *,
            cache_length: int, samples_per_prompt: int) -> tuple[Array, KVCache]:
    """Runs the prompts once and broadcasts each row to its group of samples.

    Args:
      graphdef, params: the model (`nnx.split`).
      input_ids: [P, T] int32 left-padded prompts.
      attention_mask: [P, T] bool, True on real tokens.
      cache_length: static; slots in the returned cache (T + room for generated tokens).
      samples_per_prompt: static n; row i becomes rows i*n .. i*n+n-1.
    Returns:
      (next-token logits [P*n, V] float32, cache with P*n rows and index T).
    """
    model = nnx.merge(graphdef, params)
    hidden, cache = model.prefill_cache(input_ids, attention_mask, cache_length)
    cache = constrain_cache(cache)
    logits = model.logits_from_hidden(hidden[:, -1])  # left padding: the last slot is real
    if samples_per_prompt > 1:
        cache = cache.repeat(samples_per_prompt)
        logits = jnp.repeat(logits, samples_per_prompt, axis=0)
    return sharding.constrain(logits, ("batch", "vocab")), constrain_cache(cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Carry of the decode loop (B = rows, N = generated-token capacity).

    Attributes:
      cache: the KV cache; holds every token fed so far.
      last_tokens: [B] int32, the tokens chosen at the previous step (fed next).
      tokens: [B, N] int32 generated ids; entries past a row's length are 0.
      log_probs: [B, N] float32 full-vocabulary log-probs of `tokens`.
      lengths: [B] int32 tokens generated per row (a stop token counts).
      done: [B] bool, the row emitted a stop token, hit the limit, or is batch padding.
      stopped: [B] bool, the row ended with a stop token.
      step: [] int32 tokens chosen so far (by the longest row).
    """

    cache: KVCache
    last_tokens: Array
    tokens: Array
    log_probs: Array
    lengths: Array
    done: Array
    stopped: Array
    step: Array


def decode(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, first_logits: Array,
           rule: rules.SamplingRule, seed: Array, padding_rows: Array, stop_ids: Array,
           max_new_tokens: Array, *, capacity: int) -> DecodeState:
    """Generates up to `max_new_tokens` tokens per row, stopping early when every row is done.

    Args:
      graphdef, params: the model.
      cache: from `prefill` (donated: its buffers are reused by the loop).
      first_logits: [B, V] float32 logits after the prompt.
      rule: sampling rule.
      seed: [] uint32; row r draws its step-t number from fold_in(fold_in(key(seed), r), t), so a
        row's samples do not depend on how many rows the batch has.
      padding_rows: [B] bool, dummy rows added to fill the batch bucket (never generate).
      stop_ids: [S] int32 stop tokens, padded with -1.
      max_new_tokens: [] int32 <= capacity.
      capacity: static N, the size of the token buffers.
    Returns:
      The final DecodeState (its cache is the updated input cache).
    """
    model = nnx.merge(graphdef, params)
    rows = first_logits.shape[0]
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(rows))

    def choose(state: DecodeState, logits: Array) -> DecodeState:
        uniforms = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, state.step)))(row_keys)
        tokens, log_probs = rules.choose_tokens(logits, rule, uniforms)
        live = ~state.done
        tokens = jnp.where(live, tokens, 0)
        stopped = live & jnp.isin(tokens, stop_ids)
        lengths = state.lengths + live.astype(jnp.int32)
        return dataclasses.replace(
            state,
            last_tokens=tokens,
            tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, tokens[:, None], state.step, axis=1),
            log_probs=jax.lax.dynamic_update_slice_in_dim(
                state.log_probs, jnp.where(live, log_probs, 0.0)[:, None], state.step, axis=1),
            lengths=lengths,
            done=state.done | stopped | (lengths >= max_new_tokens),
            stopped=state.stopped | stopped,
            step=state.step + 1,
        )

    def keep_going(state: DecodeState) -> Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def step(state: DecodeState) -> DecodeState:
        logits, cache = model.forward_with_cache(state.last_tokens[:, None], None, state.cache)
        state = dataclasses.replace(state, cache=constrain_cache(cache))
        return choose(state, sharding.constrain(logits[:, 0], ("batch", "vocab")))

    initial = DecodeState(
        cache=cache,
        last_tokens=jnp.zeros((rows,), jnp.int32),
        tokens=jnp.zeros((rows, capacity), jnp.int32),
        log_probs=jnp.zeros((rows, capacity), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=padding_rows,
        stopped=jnp.zeros((rows,), bool),
        step=jnp.zeros((), jnp.int32),
    )
    return jax.lax.while_loop(keep_going, step, choose(initial, first_logits))
