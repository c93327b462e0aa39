"""Per-token log-probs (and entropies) of given targets without materialising [B, T, V] logits.

The backbone runs once to final hidden states [B, T, D]; the LM head, log-softmax and target
gather then run over chunks of C positions under `lax.map`, each chunk wrapped in
`jax.checkpoint`. Only a [B, C, V] float32 block of logits exists at any time, in the forward
pass and in the backward pass (which recomputes each chunk's logits from its hidden states).

With a `mask` (e.g. the loss mask: only response tokens need log-probs) the LM head runs on the
masked positions only: they are gathered, in order, to the front of the flattened [B * T]
positions and processed in chunks of C of them (a [C, V] block of logits); chunks past the last
masked position are skipped at run time (`lax.cond`), so the cost follows the number of masked
tokens, not B * T. (Flow-GRPO rows are mostly prompt: on 384-token prompts + 128-token
responses this makes the LM head 3x cheaper, forward and backward.)

The backbone's attention runs in causal query chunks (`query_chunk_size`: each chunk attends only
the keys up to its end), which skips most of the masked upper triangle of the T x T scores and
stores less of it for the backward pass: on the CPU, a Flow-GRPO update of 8 x 512 tokens of
the benchmark model (experiments/benchmarks/common.py) takes about 10% less time, with or without
remat, and a quarter fewer page faults (4 chunks of 128 against one of 512, in one process).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp

Array = jax.Array
LMHead = Callable[[Array], Array]
"""hidden [..., D] -> float32 logits [..., V]."""

DEFAULT_CHUNK_SIZE = 256
MIN_QUERY_CHUNK, MAX_QUERY_CHUNKS = 128, 8


def query_chunk_size(length: int) -> int:
    """Queries per causal attention chunk for sequences of `length`: >= 128, at most 8 chunks.

    n chunks skip (n - 1) / (2n) of the T x T attention work (3/8 at 4 chunks, 7/16 at 8); the
    bound on n bounds the chunks unrolled in the compiled layer.
    """
    return max(MIN_QUERY_CHUNK, -(-length // MAX_QUERY_CHUNKS))


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
      chunk_size: positions per LM-head chunk: C positions of every row ([B, C, V] logits), or with
        `mask`, C masked positions in all ([C, V] logits); padded internally to a multiple of it.
      with_entropy: also return the entropy of softmax(logits / temperature) at each position.
      mask: optional [B, T]; when given, only positions where it is nonzero are computed (e.g. the
        loss mask) and every other position returns 0, for log-probs, entropies and gradients alike.
    Returns:
      (logp [B, T] float32, entropy [B, T] float32 or None). Values at padding positions are
      finite but meaningless; mask them.
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(input_ids, attention_mask, query_chunk=query_chunk_size(input_ids.shape[1]))
    return logprobs_from_hidden(model.logits_from_hidden, hidden, targets, temperature=temperature,
                                chunk_size=chunk_size, with_entropy=with_entropy, mask=mask)


def logprobs_from_hidden(lm_head: LMHead, hidden: Array, targets: Array, *, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK_SIZE,
                         with_entropy: bool = False, mask: Array | None = None) -> tuple[Array, Array | None]:
    """Chunked LM head + log-softmax + gather: hidden [B, T, D], targets [B, T] -> ([B, T], [B, T] | None).

    With `mask` [B, T], only its nonzero positions are computed (see `token_logprobs`); others are 0.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    chunk_logprobs = _chunk_fn(lm_head, temperature, with_entropy)
    if mask is not None:
        return _masked_logprobs(chunk_logprobs, hidden, targets, mask, chunk_size, with_entropy)
    batch, length = targets.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, -1).swapaxes(0, 1)  # [N, B, C, D]
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)  # [N, B, C]
    logp, entropy = jax.lax.map(jax.checkpoint(lambda xs: chunk_logprobs(*xs)), (hidden_chunks, target_chunks))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]  # noqa: E731
    return unchunk(logp), unchunk(entropy) if with_entropy else None


def _chunk_fn(lm_head: LMHead, temperature: float, with_entropy: bool) -> Callable[[Array, Array], tuple[Array, Array]]:
    """(hidden [..., D], targets [...]) -> (logp, entropy) [...] (callers checkpoint it: recomputed in the backward)."""

    def chunk_logprobs(hidden_chunk: Array, target_chunk: Array) -> tuple[Array, Array]:
        logits = lm_head(hidden_chunk).astype(jnp.float32) / temperature  # [..., C, V]
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)
        target_logits = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        if not with_entropy:
            return target_logits - log_normaliser, jnp.zeros_like(log_normaliser)
        entropy = log_normaliser - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return target_logits - log_normaliser, entropy

    return chunk_logprobs


def _masked_logprobs(chunk_logprobs: Callable[[Array, Array], tuple[Array, Array]], hidden: Array, targets: Array,
                     mask: Array, chunk_size: int, with_entropy: bool) -> tuple[Array, Array | None]:
    """`logprobs_from_hidden` on the nonzero positions of mask only, in chunks of chunk_size of them."""
    batch, length = targets.shape
    if mask.shape != targets.shape:
        raise ValueError(f"mask shape {mask.shape} != targets shape {targets.shape}")
    n = batch * length
    keep = jnp.reshape(mask, (n,)) != 0
    order = jnp.argsort(jnp.logical_not(keep), stable=True)  # masked positions first, in their order
    count = jnp.sum(keep, dtype=jnp.int32)
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    hidden_chunks = jnp.pad(jnp.take(hidden.reshape(n, -1), order, axis=0), ((0, pad), (0, 0)))
    target_chunks = jnp.pad(jnp.take(targets.reshape(n), order), (0, pad))
    hidden_chunks = hidden_chunks.reshape(num_chunks, chunk, -1)  # [N, C, D]
    target_chunks = target_chunks.reshape(num_chunks, chunk)

    def skip(hidden_chunk: Array, target_chunk: Array) -> tuple[Array, Array]:
        del hidden_chunk
        return jnp.zeros(target_chunk.shape, jnp.float32), jnp.zeros(target_chunk.shape, jnp.float32)

    @jax.checkpoint  # around the cond, so the only residuals are its inputs (no per-chunk copies of the LM head)
    def body(xs):
        index, hidden_chunk, target_chunk = xs
        return jax.lax.cond(index * chunk < count, chunk_logprobs, skip, hidden_chunk, target_chunk)

    logp, entropy = jax.lax.map(body, (jnp.arange(num_chunks), hidden_chunks, target_chunks))
    inverse = jnp.argsort(order)  # sorted slot of each original position

    def unsort(x: Array) -> Array:
        return jnp.where(keep, jnp.take(x.reshape(-1), inverse), 0.0).reshape(batch, length)

    return unsort(logp), unsort(entropy) if with_entropy else None
