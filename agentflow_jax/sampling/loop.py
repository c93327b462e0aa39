"""The two jitted programs of the sampler: prefill and the `lax.while_loop` decode.

Both are pure functions of (graphdef, params, arrays); `Sampler` jits them once per shape bucket.
Rows are independent: each has its own random key (folded from the call seed and the row's
global index), its own done flag and its own count of generated tokens. Both programs may walk
the batch in blocks of rows (`map_row_blocks`); the rows of a block share the cache's write
index, so finished rows keep decoding harmlessly until every row of their block is done.

A decode step runs the model in one of two ways (`models.kernels`, `decode_layers`): "scan",
`forward_with_cache` with the layers under `lax.scan` (CPU, TPU), or "unrolled",
`decode_step` over per-layer weights packed once before the loop and a per-layer cache (GPU).
Both compute the same tokens and log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax import sharding
from agentflow_jax.models import attention, kernels as kernels_lib
from agentflow_jax.models.qwen2 import KVCache, LayerwiseKVCache, PackedLayer, Qwen2ForCausalLM
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
            cache_length: int, samples_per_prompt: int, rows_per_block: int,
            query_chunk: int | None) -> tuple[Array, KVCache]:
    """Runs the prompts once and broadcasts each row to its group of samples.

    Args:
      graphdef, params: the model (`nnx.split`).
      input_ids: [P, T] int32 left-padded prompts.
      attention_mask: [P, T] bool, True on real tokens.
      cache_length: static; slots in the returned cache (T + room for generated tokens).
      samples_per_prompt: static n; row i becomes rows i*n .. i*n+n-1.
      rows_per_block: static; the prompts run in blocks of this many rows (see `map_row_blocks`).
      query_chunk: static; prompt attention in chunks of this many queries (None = one chunk).
    Returns:
      (next-token logits [P*n, V] float32, cache with P*n rows and index T).
    """
    model = nnx.merge(graphdef, params)

    def run(ids: Array, mask: Array) -> tuple[Array, Array, Array]:
        hidden, k, v = model.prompt_kv(ids, mask, tiles=(query_chunk, None))
        logits = model.logits_from_hidden(hidden[:, -1])  # left padding: the last slot is real
        return sharding.constrain(logits, ("batch", "vocab")), k, v

    logits, k, v = map_row_blocks(run, (input_ids, attention_mask), (0, 0), (0, 1, 1), rows_per_block)
    cache = constrain_cache(KVCache.from_prompt(k, v, attention_mask, cache_length))
    if samples_per_prompt > 1:
        cache = cache.repeat(samples_per_prompt)
        logits = jnp.repeat(logits, samples_per_prompt, axis=0)
    return sharding.constrain(logits, ("batch", "vocab")), constrain_cache(cache)


def map_row_blocks(fn: Callable[..., tuple[Array, ...]], args: tuple[Array, ...], in_axes: tuple[int, ...],
                   out_axes: tuple[int | None, ...], rows_per_block: int) -> tuple[Array, ...]:
    """fn over the batch in blocks of `rows_per_block` rows, one block after another (`lax.map`).

    On CPU a block's activations and KV cache stay in the processor caches, where the whole
    batch's would stream through memory at every step. Block j holds rows j, j + B/R,
    j + 2B/R, ... (R = rows_per_block), so when the batch is sharded each block spans every
    shard evenly (R must then be a multiple of the shard count).

    Args:
      fn: maps arrays with R rows to a tuple of arrays; rows are independent.
      args: arrays with B rows on the axes `in_axes`.
      out_axes: the batch axis of each of fn's outputs, or None for a value per block.
      rows_per_block: R, divides B; R = B calls fn once on everything.
    Returns:
      fn's outputs for all B rows, in row order; None outputs stacked, [B / R, ...].
    """
    rows = args[0].shape[in_axes[0]]
    if rows_per_block == rows:
        return tuple(x if a is not None else x[None] for x, a in zip(fn(*args), out_axes))
    blocks = rows // rows_per_block

    def split(x: Array, axis: int) -> Array:  # [.., B, ..] -> [blocks, .., R, ..]
        x = x.reshape(x.shape[:axis] + (rows_per_block, blocks) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis + 1, 0)

    def merge(x: Array, axis: int | None) -> Array:  # [blocks, .., R, ..] -> [.., B, ..]
        if axis is None:
            return x
        x = jnp.moveaxis(x, 0, axis + 1)
        return x.reshape(x.shape[:axis] + (rows,) + x.shape[axis + 2:])

    outs = jax.lax.map(lambda block: fn(*block), tuple(split(x, a) for x, a in zip(args, in_axes)))
    return tuple(merge(x, a) for x, a in zip(outs, out_axes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Carry of the decode loop (B = rows, N = generated-token capacity).

    Attributes:
      cache: the KV cache (a `LayerwiseKVCache` in the unrolled decode); holds every token fed so far.
      last_tokens: [B] int32, the tokens chosen at the previous step (fed next).
      tokens: [B, N] int32 generated ids; entries past a row's length are 0.
      log_probs: [B, N] float32 full-vocabulary log-probs of `tokens` (see `rules`).
      lengths: [B] int32 tokens generated per row (a stop token counts).
      done: [B] bool, the row emitted a stop token, hit the limit, or is batch padding.
      stopped: [B] bool, the row ended with a stop token.
      step: [] int32 tokens chosen so far (by the longest row).
      counts: [B, V] int32 occurrences of each token among the row's generated tokens, kept only
        when the rule has a frequency penalty (else None).
    """

    cache: KVCache | LayerwiseKVCache
    last_tokens: Array
    tokens: Array
    log_probs: Array
    lengths: Array
    done: Array
    stopped: Array
    step: Array
    counts: Array | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoded:
    """What `decode` returns (B = rows, N = generated-token capacity).

    Attributes:
      tokens: [B, N] int32 generated ids; entries past a row's length are 0.
      log_probs: [B, N] float32 full-vocabulary log-probs of `tokens`.
      lengths: [B] int32 tokens generated per row (a stop token counts).
      stopped: [B] bool, the row ended with a stop token.
      cache: the input cache with every fed token added (it takes over the donated input's
        buffers; its index is the furthest any block got).
    """

    tokens: Array
    log_probs: Array
    lengths: Array
    stopped: Array
    cache: KVCache


def decode(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, first_logits: Array,
           rule: rules.SamplingRule, seed: Array, sample_ids: Array, padding_rows: Array, stop_ids: Array,
           max_new_tokens: Array, *, capacity: int, rows_per_block: int,
           kernels: kernels_lib.Kernels = kernels_lib.PORTABLE) -> Decoded:
    """Generates up to `max_new_tokens` tokens per row.

    Rows run in blocks of `rows_per_block` (see `map_row_blocks`); each block's loop stops
    early when all its rows are done. With `kernels.decode_layers == "unrolled"` the layer
    weights are packed once here (a transient copy of them) and every block's steps read them.

    Args:
      graphdef, params: the model.
      cache: from `prefill` (donated: its buffers are reused).
      first_logits: [B, V] float32 logits after the prompt.
      rule: sampling rule.
      seed: [] uint32; row r draws its step-t number from fold_in(fold_in(key(seed), sample_ids[r]), t),
        so a row's samples depend only on the seed and its sample id, not on the batch it is in.
      sample_ids: [B] int32, each row's sample id (its index in the call, or a caller's stable id).
      padding_rows: [B] bool, dummy rows added to fill the batch bucket (never generate).
      stop_ids: [S] int32 stop tokens, padded with -1.
      max_new_tokens: [] int32 <= capacity.
      capacity: static N, the size of the token buffers.
      rows_per_block: static, divides B.
      kernels: static; `decode_layers` and `decode_attention` choose the step (module docstring).
    Returns:
      The generated tokens, their log-probs, lengths and stop flags, and the final cache.
    """
    model = nnx.merge(graphdef, params)
    layers = model.packed_layers() if kernels.decode_layers == "unrolled" else None

    def run(k: Array, v: Array, valid: Array, next_position: Array, logits: Array, padding: Array,
            row_ids: Array) -> tuple[Array, ...]:
        state = _decode_rows(model, layers, kernels, KVCache(k, v, valid, next_position, cache.index), logits, rule,
                             seed, row_ids, padding, stop_ids, max_new_tokens, capacity)
        final = state.cache.stacked(cache.max_length) if layers is not None else state.cache
        return (state.tokens, state.log_probs, state.lengths, state.stopped,
                final.k, final.v, final.valid, final.next_position, final.index)

    tokens, log_probs, lengths, stopped, k, v, valid, next_position, index = map_row_blocks(
        run, (cache.k, cache.v, cache.valid, cache.next_position, first_logits, padding_rows, sample_ids),
        (1, 1, 0, 0, 0, 0, 0), (0, 0, 0, 0, 1, 1, 0, 0, None), rows_per_block)
    return Decoded(tokens, log_probs, lengths, stopped,
                   constrain_cache(KVCache(k, v, valid, next_position, index.max())))


def _decode_rows(model: Qwen2ForCausalLM, layers: tuple[PackedLayer, ...] | None, kernels: kernels_lib.Kernels,
                 cache: KVCache, first_logits: Array, rule: rules.SamplingRule, seed: Array, row_ids: Array,
                 padding_rows: Array, stop_ids: Array, max_new_tokens: Array, capacity: int) -> DecodeState:
    """The `lax.while_loop` decode of one block of R rows (arguments as in `decode`; row_ids [R]
    int32 are the rows' sample ids; `layers` the packed weights of the unrolled step, None for the
    scan step). Stops when every row of the block is done."""
    rows, vocab = first_logits.shape
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)

    def choose(state: DecodeState, logits: Array) -> DecodeState:
        uniforms = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, state.step)))(row_keys)
        tokens, log_probs = rules.choose_tokens(logits, rule, uniforms, state.counts)
        live = ~state.done
        tokens = jnp.where(live, tokens, 0)
        stopped = live & jnp.isin(tokens, stop_ids)
        lengths = state.lengths + live.astype(jnp.int32)
        counts = state.counts
        if counts is not None:
            counts = counts.at[jnp.arange(rows), tokens].add(live.astype(jnp.int32))
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
            counts=counts,
        )

    def keep_going(state: DecodeState) -> Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    if layers is None:
        def forward(tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
            logits, cache = model.forward_with_cache(tokens[:, None], None, cache)
            return logits[:, 0], constrain_cache(cache)
    else:
        first_slot = jnp.argmax(cache.valid, axis=1).astype(jnp.int32)  # valid slots: [first, index)
        cache = LayerwiseKVCache.from_stacked(cache, slot_multiple=attention.RAGGED_SLOT_MULTIPLE)

        def forward(tokens: Array, cache: LayerwiseKVCache) -> tuple[Array, LayerwiseKVCache]:
            return model.decode_step(layers, tokens, cache, first_slot, kernels=kernels)

    def step(state: DecodeState) -> DecodeState:
        logits, cache = forward(state.last_tokens, state.cache)
        state = dataclasses.replace(state, cache=cache)
        return choose(state, sharding.constrain(logits, ("batch", "vocab")))

    initial = DecodeState(
        cache=cache,
        last_tokens=jnp.zeros((rows,), jnp.int32),
        tokens=jnp.zeros((rows, capacity), jnp.int32),
        log_probs=jnp.zeros((rows, capacity), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=padding_rows,
        stopped=jnp.zeros((rows,), bool),
        step=jnp.zeros((), jnp.int32),
        counts=jnp.zeros((rows, vocab), jnp.int32) if rule.uses_frequency_penalty else None,
    )
    return jax.lax.while_loop(keep_going, step, choose(initial, first_logits))
