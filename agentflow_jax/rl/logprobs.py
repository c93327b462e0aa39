"""Per-token log-probs (and entropies) of given targets without materialising [B, T, V] logits.

The backbone runs once to final hidden states [B, T, D] (attention in the causal tiles the model
chooses, see `models.attention`). The LM head, log-softmax and target gather then run over chunks
of C positions in a loop, so only a [C, V] float32 block of logits exists at any time, in the
forward pass and in the backward pass.

The head has its own VJP (`_head_logprobs`): the forward pass keeps the log-sum-exp of each
position, and the backward pass walks the same chunks again, recomputes each chunk's logits, forms
d logits = g_logp * (onehot(target) - p) - g_entropy * p * (z - E_p[z]) (z = logits / temperature)
and pulls it back through the head to the hidden states and the head weights, whose gradient is
accumulated in float32 across chunks.

With a `mask` (e.g. the loss mask: only response tokens need log-probs) only the masked positions
are computed: their indices are sorted to the front of the flattened [B * T] positions and the
loops run over ceil(count / C) chunks only, a trip count known at run time. The cost follows the
number of masked tokens, not B * T (Flow-GRPO rows are mostly prompt: on 384-token prompts +
128-token responses the LM head does a quarter of the work), and skipped chunks cost nothing
in either pass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp


Array = jax.Array
LMHead = Callable[[Array], Array]
"""hidden [..., D] -> float32 logits [..., V]."""

DEFAULT_CHUNK_SIZE = 256


def token_logprobs(graphdef: nnx.GraphDef, params: Any, input_ids: Array, attention_mask: Array, targets: Array, *,
                   temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   with_entropy: bool = False, mask: Array | None = None) -> tuple[Array, Array | None]:
    """log softmax(logits / temperature)[target] at every position of a causal LM (e.g. Qwen2ForCausalLM).

    Args:
      graphdef, params: `nnx.split(model)` of a model with `hidden_states` and `logits_from_hidden`.
      input_ids: [B, T] int32 token ids.
      attention_mask: [B, T], 1 on real tokens.
      targets: [B, T] int32, the token whose log-prob is wanted at each position (next token).
      temperature: logits are divided by it, as the sampler does before reporting log-probs.
      chunk_size: positions per LM-head chunk ([C, V] logits at a time); padded internally.
      with_entropy: also return the entropy of softmax(logits / temperature) at each position.
      mask: optional [B, T]; when given, only positions where it is nonzero are computed (e.g. the
        loss mask) and every other position returns 0, for log-probs, entropies and gradients alike.
    Returns:
      (logp [B, T] float32, entropy [B, T] float32 or None). Values at padding positions are
      finite but meaningless; mask them.
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(input_ids, attention_mask)
    return logprobs_from_hidden(model.logits_from_hidden, hidden, targets, temperature=temperature,
                                chunk_size=chunk_size, with_entropy=with_entropy, mask=mask)


def logprobs_from_hidden(lm_head: LMHead, hidden: Array, targets: Array, *, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK_SIZE,
                         with_entropy: bool = False, mask: Array | None = None) -> tuple[Array, Array | None]:
    """Chunked LM head + log-softmax + gather: hidden [B, T, D], targets [B, T] -> ([B, T], [B, T] | None).

    `lm_head` may close over traced weights (a model's parameters): their gradients flow through
    the chunked VJP. With `mask` [B, T], only its nonzero positions are computed (see
    `token_logprobs`); others are 0.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    batch, length = targets.shape
    if hidden.shape[:2] != (batch, length):
        raise ValueError(f"hidden states {hidden.shape} do not match targets [B, T] = {targets.shape}")
    n = batch * length
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    flat_hidden = hidden.reshape(n, hidden.shape[-1])
    flat_targets = jnp.reshape(targets, (n,)).astype(jnp.int32)
    if mask is None:
        keep = jnp.ones((n,), bool)
        order = slot_of_position = jnp.arange(n, dtype=jnp.int32)
        active_chunks = jnp.asarray(num_chunks, jnp.int32)
    else:
        if mask.shape != targets.shape:
            raise ValueError(f"mask shape {mask.shape} != targets shape {targets.shape}")
        keep = jnp.reshape(mask, (n,)) != 0
        order = jnp.argsort(jnp.logical_not(keep), stable=True).astype(jnp.int32)  # masked positions first
        slot_of_position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        active_chunks = -(-jnp.sum(keep, dtype=jnp.int32) // chunk)
    rows = jnp.pad(order, (0, num_chunks * chunk - n)).reshape(num_chunks, chunk)  # padding slots read row 0
    head, head_weights = jax.closure_convert(lm_head, flat_hidden[:chunk])
    logp, entropy = _head_logprobs(head, float(temperature), with_entropy, tuple(head_weights), flat_hidden,
                                   rows, slot_of_position, jnp.take(flat_targets, rows), active_chunks)

    def unsort(x: Array) -> Array:
        return jnp.where(keep, jnp.take(x.reshape(-1), slot_of_position), 0.0).reshape(batch, length)

    return unsort(logp), unsort(entropy) if with_entropy else None


# ----------------------------------------------------------------------------------------------
# The chunked head with its own VJP
# ----------------------------------------------------------------------------------------------


def _scaled_logits(head: Callable[..., Array], temperature: float, hidden: Array, *weights: Array) -> Array:
    return head(hidden, *weights).astype(jnp.float32) / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _head_logprobs(head, temperature, with_entropy, weights, hidden, rows, slot_of_position, targets, active_chunks):
    """(logp, entropy) [N, C] of the positions `rows` [N, C] (indices into hidden [n, D]).

    `slot_of_position` [n] is the inverse of rows[:n] (a permutation of the n positions). Only the
    first `active_chunks` chunks are computed; the rest read 0.
    """
    return _head_forward(head, temperature, with_entropy, weights, hidden, rows, slot_of_position, targets,
                         active_chunks)[0]


@jax.named_scope("lm_head")
def _head_forward(head, temperature, with_entropy, weights, hidden, rows, slot_of_position, targets, active_chunks):
    num_chunks, chunk = rows.shape

    def body(i, buffers):
        logits = _scaled_logits(head, temperature, jnp.take(hidden, rows[i], axis=0), *weights)  # [C, V]
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, targets[i][:, None], axis=-1)[:, 0] - log_normaliser
        values = [logp, log_normaliser]
        if with_entropy:
            values.append(log_normaliser - jnp.sum(jnp.exp(logits - log_normaliser[:, None]) * logits, axis=-1))
        return tuple(buf.at[i].set(value) for buf, value in zip(buffers, values))

    zeros = jnp.zeros((num_chunks, chunk), jnp.float32)
    buffers = jax.lax.fori_loop(0, active_chunks, body, (zeros,) * (3 if with_entropy else 2))
    logp, log_normaliser = buffers[:2]
    entropy = buffers[2] if with_entropy else zeros
    return (logp, entropy), (weights, hidden, rows, slot_of_position, targets, active_chunks, log_normaliser)


@jax.named_scope("lm_head")
def _head_backward(head, temperature, with_entropy, residuals, cotangents):
    weights, hidden, rows, slot_of_position, targets, active_chunks, log_normaliser = residuals
    d_logp, d_entropy = cotangents
    num_chunks, chunk = rows.shape

    def body(i, carry):
        d_weights, d_hidden = carry
        logits, pullback = jax.vjp(functools.partial(_scaled_logits, head, temperature),
                                   jnp.take(hidden, rows[i], axis=0), *weights)
        probs = jnp.exp(logits - log_normaliser[i][:, None])
        if with_entropy:  # d entropy / d z = -p * (z - E_p[z])
            mean_logit = jnp.sum(probs * logits, axis=-1, keepdims=True)
            d_logits = -probs * (d_logp[i][:, None] + d_entropy[i][:, None] * (logits - mean_logit))
        else:
            d_logits = -probs * d_logp[i][:, None]
        d_logits = d_logits.at[jnp.arange(chunk), targets[i]].add(d_logp[i])  # d logp / d z = onehot - p
        d_chunk, *d_chunk_weights = pullback(d_logits)
        d_weights = tuple(acc + d.astype(jnp.float32) for acc, d in zip(d_weights, d_chunk_weights))
        return d_weights, d_hidden.at[i].set(d_chunk.astype(jnp.float32))

    d_weights = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    d_sorted = jnp.zeros((num_chunks, chunk, hidden.shape[-1]), jnp.float32)  # chunks never run stay 0
    d_weights, d_sorted = jax.lax.fori_loop(0, active_chunks, body, (d_weights, d_sorted))
    d_hidden = jnp.take(d_sorted.reshape(-1, hidden.shape[-1]), slot_of_position, axis=0)  # a gather, not a scatter
    return (tuple(d.astype(w.dtype) for d, w in zip(d_weights, weights)), d_hidden.astype(hidden.dtype),
            None, None, None, None)


_head_logprobs.defvjp(_head_forward, _head_backward)
