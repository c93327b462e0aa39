"""Choosing one index per row of a [B, V] array: argmax and sampling in proportion to weights.

Both work on blocks of the vocabulary (a reduction over [B, V / block] then one within the chosen
block), which keeps XLA on CPU on fast vectorised reductions; `jnp.argmax` and
`jax.random.categorical` over a 150k vocabulary are several times slower there. Sampling draws
one uniform number per row (inverse CDF) instead of one Gumbel variate per vocabulary entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
BLOCK = 256


def _blocked(x: Array, fill: float) -> Array:
    """[B, V] -> [B, ceil(V / BLOCK), BLOCK], padded with `fill`."""
    b, v = x.shape
    pad = (-v) % BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(b, -1, BLOCK)


def _first_true(mask: Array) -> Array:
    """Index of the first True along the last axis ([..., N] bool -> [...] int32; 0 if none)."""
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _pick_block(blocks: Array, block_index: Array) -> Array:
    """blocks [B, NB, BLOCK], block_index [B] -> [B, BLOCK]."""
    return jnp.take_along_axis(blocks, block_index[:, None, None], axis=1)[:, 0]


def first_argmax(x: Array) -> Array:
    """Index of the largest value per row, the first one on ties (as `jnp.argmax`).

    Args:
      x: [B, V] float, no NaNs.
    Returns:
      [B] int32.
    """
    blocks = _blocked(x, -jnp.inf)
    block_max = blocks.max(axis=-1)  # [B, NB]
    block_index = _first_true(block_max == block_max.max(axis=-1, keepdims=True))
    within = _pick_block(blocks, block_index)
    return block_index * BLOCK + _first_true(within == within.max(axis=-1, keepdims=True))


def sample_proportional(weights: Array, uniforms: Array) -> Array:
    """Draws index i of each row with probability weights[i] / sum(weights) (inverse CDF).

    An index with weight 0 is never returned (ties in the cumulative sum are resolved towards
    the next positive weight), so masked-out entries cannot be drawn even with rounding.

    Args:
      weights: [B, V] float32, non-negative, at least one positive entry per row.
      uniforms: [B] float32 in [0, 1).
    Returns:
      [B] int32.
    """
    blocks = _blocked(weights, 0.0)
    block_mass = blocks.sum(axis=-1)  # [B, NB]
    block_cumulative = jnp.cumsum(block_mass, axis=-1)
    target = uniforms * block_cumulative[:, -1]  # [B], in [0, total)
    block_index = _first_true((block_cumulative >= target[:, None]) & (block_mass > 0))
    mass_before = jnp.take_along_axis(block_cumulative - block_mass, block_index[:, None], axis=1)[:, 0]
    within = _pick_block(blocks, block_index)
    within_cumulative = jnp.cumsum(within, axis=-1)
    # Rounding can leave the target just above the block's own cumulative sum: clamp it.
    target_within = jnp.minimum(target - mass_before, within_cumulative[:, -1])
    return block_index * BLOCK + _first_true((within_cumulative >= target_within[:, None]) & (within > 0))
