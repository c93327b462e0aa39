"""The model's two attention paths: whole sequences in causal tiles (training, prompt prefill) with a
memory-efficient custom VJP, and attention over a KV cache (decode).

`causal_attention(q, k, v, key_valid)` is softmax attention where query slot i sees key slot j
when j <= i and `key_valid[b, j]`: the prompt / training forward of a decoder (left or right
padding, grouped-query heads). It is computed flash-style:

- Queries run in chunks of `query_chunk` and each chunk reads only the keys up to its own end,
  so the masked upper triangle of the T x T scores is mostly skipped.
- Within a chunk, keys run in blocks of `key_chunk` with an online softmax (running max and sum),
  so a score tile is at most [B, K, G, query_chunk, key_chunk].
- The forward pass keeps only the output and the log-sum-exp of each query row ([B, K, G, T]).
  The backward pass recomputes each tile's probabilities from them, as FlashAttention does, instead
  of storing the [B, H, T, T] float32 scores and probabilities for autodiff. Memory for the
  backward pass is O(T) per head instead of O(T^2).

Scores, the softmax and all accumulators are float32; the two matmuls of a tile take their operands
in the inputs' dtype (float32 or bfloat16) and accumulate in float32. Grouped-query attention
contracts queries grouped as [B, K, G, T, Dh] with [B, K, S, Dh] keys, so K/V are never repeated.

A query row that sees no key (a left-padding slot before the first real token) gets output 0 and
no gradient; those rows are padding and their values are unspecified to callers.

`cached_attention(q, segments)` is one joint softmax over several key/value segments: the decode
path passes the cache as it was and the new tokens, so the cache is only read (the model writes the
new keys once, after all layers).

GPU paths (chosen by `models.kernels`): `fused_causal_attention` is the whole-sequence attention
through `jax.nn.dot_product_attention` (cuDNN's fused kernels, forward and backward), and
`ragged_decode_attention` a Pallas kernel for one query per row that reads only the cache slots
the row uses.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array


MIN_QUERY_CHUNK, MAX_QUERY_CHUNKS, MIN_KEY_CHUNK = 128, 8, 512
Tiles = tuple[int | None, int | None]
"""(query_chunk, key_chunk) of `causal_attention`; None in either place = one chunk / one block."""


def default_tiles(length: int) -> Tiles:
    """(query_chunk, key_chunk) for a whole-sequence forward of `length` positions.

    At least 128 queries per chunk and at most 8 chunks: n chunks skip (n - 1) / (2n) of the T x T
    score work (3/8 at 4 chunks, 7/16 at 8) and the bound keeps the unrolled tile count <= 36 per
    layer. Key blocks of max(512, query chunk) keep short sequences in one block per chunk (no
    online-softmax rescaling) and bound a tile of a long one.
    """
    query_chunk = max(MIN_QUERY_CHUNK, -(-length // MAX_QUERY_CHUNKS))
    return query_chunk, max(MIN_KEY_CHUNK, query_chunk)


class _Tile(NamedTuple):
    """One (query chunk, key block) tile: queries [q0, q1) against keys [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def needs_causal_mask(self) -> bool:
        return self.k1 - 1 > self.q0  # some key lies after some query of the chunk


def tile_plan(length: int, query_chunk: int | None, key_chunk: int | None) -> tuple[tuple[_Tile, ...], ...]:
    """Static tiling of a causal T x T attention: per query chunk, its key blocks (causal ones only).

    Query chunk [q0, q1) reads keys [0, q1) in blocks [k0, min(k0 + key_chunk, q1)).
    None for either size means one chunk / one block covering the whole range.
    """
    if length < 1:
        raise ValueError(f"attention needs at least one position, got length {length}")
    for name, size in (("query_chunk", query_chunk), ("key_chunk", key_chunk)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be a positive number of positions or None, got {size}")
    qc = length if query_chunk is None else min(query_chunk, length)
    plan = []
    for q0 in range(0, length, qc):
        q1 = min(q0 + qc, length)
        kc = q1 if key_chunk is None else key_chunk
        plan.append(tuple(_Tile(q0, q1, k0, min(k0 + kc, q1)) for k0 in range(0, q1, kc)))
    return tuple(plan)


def causal_attention(q: Array, k: Array, v: Array, key_valid: Array, *, query_chunk: int | None = None,
                     key_chunk: int | None = None) -> Array:
    """Blocked causal softmax attention (module docstring).

    Args:
      q: [B, T, H, Dh] queries (RoPE applied).
      k, v: [B, K, T, Dh] head-major keys and values (RoPE applied to k); K divides H.
      key_valid: [B, T] bool, False at padding slots (never attended to).
      query_chunk: queries per chunk (static); None = all T at once.
      key_chunk: keys per block within a chunk (static); None = all visible keys at once.
    Returns:
      [B, T, H, Dh] attention output in q's dtype, before the output projection.
    """
    b, t, h, dh = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[2] != t or k.shape[3] != dh:
        raise ValueError(f"k and v must be [B={b}, K, T={t}, Dh={dh}], got {k.shape} and {v.shape}")
    kv_heads = k.shape[1]
    if h % kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {kv_heads} key/value heads")
    if key_valid.shape != (b, t):
        raise ValueError(f"key_valid must be [B, T] = {(b, t)}, got {key_valid.shape}")
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    out = _blocked_attention(tile_plan(t, query_chunk, key_chunk), grouped, k, v, key_valid.astype(bool))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


# ----------------------------------------------------------------------------------------------
# Forward and backward passes over the static tile plan (queries grouped as [B, K, G, T, Dh])
# ----------------------------------------------------------------------------------------------


def _dot(equation: str, x: Array, y: Array) -> Array:
    return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)


def _scores(tile: _Tile, q_chunk: Array, k: Array, key_valid: Array) -> Array:
    """Scaled float32 scores [B, K, G, Cq, Ck] of one tile; invisible keys are -inf."""
    scores = _dot("bkgqd,bksd->bkgqs", q_chunk, k[:, :, tile.k0:tile.k1]) * (q_chunk.shape[-1] ** -0.5)
    visible = key_valid[:, None, None, None, tile.k0:tile.k1]
    if tile.needs_causal_mask:
        causal = jnp.arange(tile.k0, tile.k1)[None, :] <= jnp.arange(tile.q0, tile.q1)[:, None]
        visible = visible & causal
    return jnp.where(visible, scores, -jnp.inf)


def _chunk_forward(tiles: tuple[_Tile, ...], q_chunk: Array, k: Array, v: Array,
                   key_valid: Array) -> tuple[Array, Array]:
    """Online softmax over one query chunk's key blocks: (out [B, K, G, Cq, Dh] f32, lse [B, K, G, Cq])."""
    row_max = total = acc = None
    for tile in tiles:
        scores = _scores(tile, q_chunk, k, key_valid)
        new_max = jnp.max(scores, axis=-1) if row_max is None else jnp.maximum(row_max, jnp.max(scores, axis=-1))
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows with no visible key yet
        probs = jnp.exp(scores - shift[..., None])
        block_sum = jnp.sum(probs, axis=-1)
        block_out = _dot("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v[:, :, tile.k0:tile.k1])
        if row_max is None:
            total, acc = block_sum, block_out
        else:
            rescale = jnp.where(jnp.isfinite(row_max), jnp.exp(row_max - shift), 0.0)
            total = rescale * total + block_sum
            acc = rescale[..., None] * acc + block_out
        row_max = new_max
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    total = jnp.where(total > 0, total, 1.0)
    return acc / total[..., None], shift + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(plan, q: Array, k: Array, v: Array, key_valid: Array) -> Array:
    return _attention_forward(plan, q, k, v, key_valid)[0]


@jax.named_scope("attention_core")
def _attention_forward(plan, q, k, v, key_valid):
    outs, lses = zip(*(_chunk_forward(tiles, q[:, :, :, tiles[0].q0:tiles[0].q1], k, v, key_valid)
                       for tiles in plan))
    out = jnp.concatenate(outs, axis=3).astype(q.dtype)
    return out, (q, k, v, key_valid, out, jnp.concatenate(lses, axis=3))


@jax.named_scope("attention_core")
def _attention_backward(plan, residuals, d_out):
    """Recomputes each tile's probabilities from the saved log-sum-exp (FlashAttention's backward)."""
    q, k, v, key_valid, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    d_out = d_out.astype(v.dtype)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dq_chunks = []
    for tiles in plan:
        q0, q1 = tiles[0].q0, tiles[0].q1
        q_chunk, do_chunk = q[:, :, :, q0:q1], d_out[:, :, :, q0:q1]
        dq = None
        for tile in tiles:
            probs = jnp.exp(_scores(tile, q_chunk, k, key_valid) - lse[..., q0:q1, None])  # [B, K, G, Cq, Ck]
            d_probs = _dot("bkgqd,bksd->bkgqs", do_chunk, v[:, :, tile.k0:tile.k1])
            d_scores = (probs * (d_probs - delta[..., q0:q1, None]) * (q.shape[-1] ** -0.5)).astype(q.dtype)
            dv = _add_to_keys(dv, tile, _dot("bkgqs,bkgqd->bksd", probs.astype(v.dtype), do_chunk))
            dk = _add_to_keys(dk, tile, _dot("bkgqs,bkgqd->bksd", d_scores, q_chunk))
            dq_tile = _dot("bkgqs,bksd->bkgqd", d_scores, k[:, :, tile.k0:tile.k1])
            dq = dq_tile if dq is None else dq + dq_tile
        dq_chunks.append(dq)
    dq = jnp.concatenate(dq_chunks, axis=3).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


def _add_to_keys(total: Array, tile: _Tile, update: Array) -> Array:
    """total[:, :, k0:k1] += update, as an in-place slice update (not a scatter)."""
    current = jax.lax.slice_in_dim(total, tile.k0, tile.k1, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(total, current + update, tile.k0, axis=2)


_blocked_attention.defvjp(_attention_forward, _attention_backward)


# ----------------------------------------------------------------------------------------------
# Attention over a KV cache (prefill into a cache, decode)
# ----------------------------------------------------------------------------------------------


@jax.named_scope("attention_core")
def cached_attention(q: Array, segments: Sequence[tuple[Array, Array, Array]]) -> Array:
    """Softmax attention in float32 over one or more key/value segments (one joint softmax).

    Keys and values are head-major ([B, K, S, Dh]): with the batch and head dimensions leading,
    XLA's batched dots need no transposes of the (large) cache (decode attention 10x faster on CPU).
    Masked scores use `finfo(float32).min`, not -inf, so a query that sees no key stays finite.

    Args:
      q: [B, T, H, Dh] queries (RoPE applied).
      segments: (k, v, allowed) triples: k, v [B, K, S_i, Dh] (K divides H); allowed
        [B, T or 1, S_i] bool, which keys each query may see.
    Returns:
      [B, T, H, Dh] attention output in q's dtype, before the output projection.
    """
    b, t, h, dh = q.shape
    kv = segments[0][0].shape[1]
    qg = q.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    neg = jnp.finfo(jnp.float32).min
    scores = [jnp.where(allowed[:, None, None, :, :], _dot("bkgtd,bksd->bkgts", qg, k) * (dh ** -0.5), neg)
              for k, _, allowed in segments]
    peak = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in scores])
    weights = [jnp.exp(x - peak) for x in scores]
    total = functools.reduce(jnp.add, [jnp.sum(w, axis=-1, keepdims=True) for w in weights])
    out = functools.reduce(jnp.add, [_dot("bkgts,bksd->bkgtd", (w / total).astype(v.dtype), v)
                                     for w, (_, v, _) in zip(weights, segments)])
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


# ----------------------------------------------------------------------------------------------
# GPU paths (chosen by `models.kernels`): fused whole-sequence attention and ragged decode attention
# ----------------------------------------------------------------------------------------------


def fused_causal_attention(q: Array, k: Array, v: Array, lengths: Array, *, implementation: str) -> Array:
    """Causal attention of right-padded rows through `jax.nn.dot_product_attention`.

    With implementation="cudnn" this is cuDNN's fused flash attention (forward and backward, no
    T x T scores in memory; bfloat16 / float16 on NVIDIA GPUs); "xla" runs the same call anywhere.

    Args:
      q: [B, T, H, Dh] queries (RoPE applied).
      k, v: [B, T, K, Dh] keys and values, sequence-major as the API takes them; K divides H.
      lengths: [B] int32 >= 1; row b's real tokens fill slots [0, lengths[b]) (right padding).
      implementation: "cudnn" or "xla".
    Returns:
      [B, T, H, Dh] in q's dtype, before the output projection; slots past a row's length are
      unspecified (and receive no gradient from real slots).
    """
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)


_NEG = float(jnp.finfo(jnp.float32).min)  # masked scores: finite, so an empty block stays finite
RAGGED_BLOCK_SIZES = (64, 32, 16)  # key slots per kernel step: the largest dividing the cache length
RAGGED_SLOT_MULTIPLE = RAGGED_BLOCK_SIZES[-1]  # cache lengths the kernel takes (callers pad to it)
RAGGED_TARGET_PROGRAMS = 256  # split the cache so that rows x KV heads x splits fill ~2 waves of SMs
_MIN_GROUP = 16  # the kernel's matmuls need >= 16 rows: query heads per KV head are padded to it


def ragged_decode_attention(q: Array, k: Array, v: Array, start: Array, end: Array, *,
                            interpret: bool = False) -> Array:
    """One query per row against the cache slots [start, end) of that row only.

    A Pallas kernel (Triton on GPUs) walks each row's slots in blocks of up to 64, with an online
    softmax in float32, from the block holding `start` to the block holding `end - 1`: slots a
    row does not use (left padding, room not yet written) are never read. For small batches each
    row's range is split over several programs (`RAGGED_TARGET_PROGRAMS`) whose partial results
    are combined here.

    Args:
      q: [B, K, G, Dh] queries grouped by KV head (RoPE applied).
      k, v: [B, K, S, Dh] the layer's cache, head-major; S a multiple of RAGGED_SLOT_MULTIPLE.
      start, end: [B] int32, 0 <= start < end <= S.
      interpret: run the kernel in Pallas' interpret mode (any platform; used by the CPU tests).
    Returns:
      [B, K, G, Dh] attention output in q's dtype.
    """
    rows, kv_heads, groups, dim = q.shape
    slots = k.shape[2]
    block = next((b for b in RAGGED_BLOCK_SIZES if slots % b == 0), None)
    if block is None:
        raise ValueError(f"the cache length {slots} must be a multiple of {RAGGED_SLOT_MULTIPLE}")
    num_blocks = slots // block
    splits = max(1, min(num_blocks, -(-RAGGED_TARGET_PROGRAMS // (rows * kv_heads))))
    blocks_per_split = -(-num_blocks // splits)
    padded_groups = max(_MIN_GROUP, 1 << (groups - 1).bit_length())
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padded_groups - groups), (0, 0)))

    def kernel(start_ref, end_ref, q_ref, k_ref, v_ref, out_ref, peak_ref, total_ref):
        row, split = pl.program_id(0), pl.program_id(2)
        first, stop = start_ref[row], end_ref[row]
        lo = jnp.maximum(first // block, split * blocks_per_split)
        hi = jnp.minimum((stop + block - 1) // block, (split + 1) * blocks_per_split)
        query = q_ref[...]  # [G', Dh]

        def body(j, carry):
            acc, peak, total = carry
            keys = k_ref[pl.ds(j * block, block), :]
            scores = jax.lax.dot_general(query, keys, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * (dim ** -0.5)
            slot = j * block + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
            scores = jnp.where((slot >= first) & (slot < stop), scores, _NEG)
            new_peak = jnp.maximum(peak, scores.max(axis=1))
            probs = jnp.exp(scores - new_peak[:, None])
            rescale = jnp.exp(peak - new_peak)
            values = v_ref[pl.ds(j * block, block), :]
            acc = acc * rescale[:, None] + jax.lax.dot_general(
                probs.astype(values.dtype), values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return acc, new_peak, total * rescale + probs.sum(axis=1)

        initial = (jnp.zeros((padded_groups, dim), jnp.float32), jnp.full((padded_groups,), _NEG, jnp.float32),
                   jnp.zeros((padded_groups,), jnp.float32))
        acc, peak, total = jax.lax.fori_loop(lo, hi, body, initial)
        out_ref[...] = acc
        peak_ref[...] = peak
        total_ref[...] = total

    per_row = lambda r, h, s: (0,)  # noqa: E731
    cache_spec = pl.BlockSpec((None, None, slots, dim), lambda r, h, s: (r, h, 0, 0))
    partial = (rows, kv_heads, splits, padded_groups)
    acc, peak, total = pl.pallas_call(
        kernel,
        grid=(rows, kv_heads, splits),
        in_specs=[pl.BlockSpec((rows,), per_row), pl.BlockSpec((rows,), per_row),
                  pl.BlockSpec((None, None, padded_groups, dim), lambda r, h, s: (r, h, 0, 0)), cache_spec, cache_spec],
        out_specs=[pl.BlockSpec((None, None, None, padded_groups, dim), lambda r, h, s: (r, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, padded_groups), lambda r, h, s: (r, h, s, 0)),
                   pl.BlockSpec((None, None, None, padded_groups), lambda r, h, s: (r, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct(partial + (dim,), jnp.float32),
                   jax.ShapeDtypeStruct(partial, jnp.float32), jax.ShapeDtypeStruct(partial, jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="ragged_decode_attention",
    )(start.astype(jnp.int32), end.astype(jnp.int32), q, k, v)
    # Combine the splits (a split with no slot in range has peak _NEG and total 0).
    weight = jnp.exp(peak - peak.max(axis=2, keepdims=True))  # [B, K, splits, G']
    out = (acc * weight[..., None]).sum(axis=2) / (total * weight).sum(axis=2)[..., None]
    return out[:, :, :groups].astype(q.dtype)


def _triton_params():
    """Compiler parameters that select Pallas' Triton backend (Mosaic GPU is the default on GPUs)."""
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=4, num_stages=2)
