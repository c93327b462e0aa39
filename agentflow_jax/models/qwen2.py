"""Qwen2 / Qwen2.5 decoder-only language model in Flax NNX.

Layout (matches transformers' `Qwen2ForCausalLM` numerically):
  embed_tokens -> L x [RMSNorm -> GQA attention (q/k/v bias, RoPE) -> residual ->
                       RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (tied or not).

Decoder layers are stored stacked (every layer parameter has a leading `layers` axis) and run
with `jax.lax.scan`, so compile time does not grow with depth. Every parameter carries
`logical_axes` metadata (e.g. `("layers", "embed", "heads", "head_dim")`) that
`agentflow_jax.sharding` maps onto a device mesh.

Numerics: RMSNorm, RoPE, attention softmax and logits in float32; matmuls in `dtype`
(float32 or bfloat16) with float32 accumulation for attention scores and logits.

Training memory: whole-sequence attention runs in causal tiles with a FlashAttention-style VJP
(`models.attention`), and the SwiGLU MLP has its own VJP (`swiglu`) that keeps only its input and
the two up-projections; `remat=True` recomputes each layer in the backward pass on top of that.

Public API (architecture in `models.config`; loading and saving HF directories in `models.hf_io`):
  model = qwen2.init_random(config, seed=0)                 # or hf_io.load_pretrained(path)
  logits = model(input_ids, attention_mask=attention_mask)  # [B, T] int32 -> [B, T, V] float32
  cache = model.init_cache(batch_size, max_length)
  logits, cache = model.forward_with_cache(input_ids, attention_mask, cache)   # prefill / decode
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax import sharding
from agentflow_jax.models import attention
from agentflow_jax.models.config import Qwen2Config

Array = jax.Array
DType = Any


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

Initializer = Callable[[Array, tuple[int, ...], DType], Array]
_normal = jax.nn.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], init: Initializer, dtype: DType,
           stack: int | None) -> nnx.Param:
    """A parameter with logical axis names; `stack` prepends a `layers` axis of that size."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _einsum(equation: str, x: Array, w: Array, out_dtype: DType) -> Array:
    """einsum with float32 accumulation, result cast to out_dtype (bf16 x bf16 -> f32 acc is XLA's fast path)."""
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype: DType, rngs: nnx.Rngs, stack: int | None = None):
        self.eps = eps
        self.scale = _param(rngs, (dim,), ("norm",), _ones, param_dtype, stack)

    @jax.named_scope("norm")
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin of RoPE angles: positions [B, T] int -> two [B, T, head_dim // 2] float32 arrays."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates halves of x [B, T, N, D] (transformers' rotate_half convention) in float32."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention; K/V keep `num_kv_heads` heads and are never repeated in memory."""

    def __init__(self, config: Qwen2Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 stack: int | None = None):
        d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.dim_per_head
        self.config, self.dtype = config, dtype
        self.q_kernel = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), _normal, param_dtype, stack)
        self.q_bias = _param(rngs, (h, dh), ("heads", "head_dim"), _zeros, param_dtype, stack)
        self.k_kernel = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), _normal, param_dtype, stack)
        self.k_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), _zeros, param_dtype, stack)
        self.v_kernel = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), _normal, param_dtype, stack)
        self.v_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), _zeros, param_dtype, stack)
        self.o_kernel = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), _normal, param_dtype, stack)

    @jax.named_scope("attention_qkv")
    def project_qkv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, K, Dh], RoPE applied to q and k."""
        dt = self.dtype
        q = _einsum("btd,dhk->bthk", x, self.q_kernel[...].astype(dt), dt) + self.q_bias[...].astype(dt)
        k = _einsum("btd,dhk->bthk", x, self.k_kernel[...].astype(dt), dt) + self.k_bias[...].astype(dt)
        v = _einsum("btd,dhk->bthk", x, self.v_kernel[...].astype(dt), dt) + self.v_bias[...].astype(dt)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: Array, segments: Sequence[tuple[Array, Array, Array]]) -> Array:
        """`attention.cached_attention` over key/value segments, then the output projection.

        Args:
          q: [B, T, H, Dh] queries.
          segments: (k, v, allowed) triples: k, v [B, K, S_i, Dh]; allowed [B, T or 1, S_i] bool.
        Returns:
          [B, T, D] attention output after the o projection.
        """
        return self.project_out(attention.cached_attention(q, segments))

    @jax.named_scope("attention_out")
    def project_out(self, heads: Array) -> Array:
        """Output projection: per-head attention outputs [B, T, H, Dh] -> [B, T, D]."""
        return _einsum("bthk,hkd->btd", heads.astype(self.dtype), self.o_kernel[...].astype(self.dtype), self.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: Qwen2Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 stack: int | None = None):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = dtype
        self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), _normal, param_dtype, stack)
        self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), _normal, param_dtype, stack)
        self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), _normal, param_dtype, stack)

    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        return swiglu(x.astype(dt), *(w[...].astype(dt) for w in (self.gate_kernel, self.up_kernel, self.down_kernel)))


_MLP_AXES = ("batch", "length", "mlp")  # logical axes of the [B, T, F] activations


@jax.custom_vjp
def swiglu(x: Array, gate_kernel: Array, up_kernel: Array, down_kernel: Array) -> Array:
    """down(silu(x @ gate) * (x @ up)): x [B, T, D], kernels [D, F], [D, F], [F, D] -> [B, T, D] in x's dtype.

    Its VJP keeps only x and the two [B, T, F] projections (autodiff would also keep silu(gate), its
    sigmoid and the product) and recomputes the elementwise part in float32. The weight gradients
    contract over the B * T rows with the narrow operand (x or the [B, T, D] cotangent) on the left,
    so XLA transposes that one and not the [B, T, F] activations.
    """
    return _swiglu_forward(x, gate_kernel, up_kernel, down_kernel)[0]


@jax.named_scope("mlp")
def _swiglu_forward(x, gate_kernel, up_kernel, down_kernel):
    gate = _einsum("btd,df->btf", x, gate_kernel, x.dtype)
    up = _einsum("btd,df->btf", x, up_kernel, x.dtype)
    hidden = sharding.constrain(jax.nn.silu(gate) * up, _MLP_AXES)
    return _einsum("btf,fd->btd", hidden, down_kernel, x.dtype), (x, gate_kernel, up_kernel, down_kernel, gate, up)


@jax.named_scope("mlp")
def _swiglu_backward(residuals, d_out):
    x, gate_kernel, up_kernel, down_kernel, gate, up = residuals
    gate32, up32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate32)
    silu = gate32 * sigmoid
    hidden = sharding.constrain((silu * up32).astype(x.dtype), _MLP_AXES)
    d_hidden = _einsum("btd,fd->btf", d_out, down_kernel, jnp.float32)
    d_gate = sharding.constrain((d_hidden * up32 * sigmoid * (1.0 + gate32 * (1.0 - sigmoid))).astype(x.dtype),
                                _MLP_AXES)
    d_up = sharding.constrain((d_hidden * silu).astype(x.dtype), _MLP_AXES)
    d_x = _einsum("btf,df->btd", d_gate, gate_kernel, jnp.float32) + _einsum("btf,df->btd", d_up, up_kernel,
                                                                            jnp.float32)
    d_down = _einsum("btd,btf->df", d_out, hidden, down_kernel.dtype).T
    return (d_x.astype(x.dtype), _einsum("btd,btf->df", x, d_gate, gate_kernel.dtype),
            _einsum("btd,btf->df", x, d_up, up_kernel.dtype), d_down)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class DecoderLayer(nnx.Module):
    """One pre-norm transformer block. Built with `stack=L` it holds all L layers' parameters."""

    def __init__(self, config: Qwen2Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 stack: int | None = None):
        kw = dict(param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.attn = Attention(config, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, dtype=dtype, **kw)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of all layers for a batch of sequences sharing one write index.

    Slots are filled left to right; padding slots stay in the cache but are marked invalid, so
    left-padded prompts of different lengths share one decode index.

    Attributes:
      k, v: [L, B, K, S, Dh] cached keys / values, head-major (RoPE already applied to k).
      valid: [B, S] bool, slot holds a real token.
      next_position: [B] int32, RoPE position of each row's next real token (= real tokens so far).
      index: [] int32, next slot to write (same for every row).
    """

    k: Array
    v: Array
    valid: Array
    next_position: Array
    index: Array

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @classmethod
    def from_prompt(cls, k: Array, v: Array, mask: Array, cache_length: int) -> "KVCache":
        """A cache of `cache_length` slots holding prompts' keys / values ([L, B, K, T, Dh], mask
        [B, T] bool), the rest empty; the next write goes to slot T.

        Raises:
          ValueError: cache_length < T.
        """
        t = k.shape[3]
        if cache_length < t:
            raise ValueError(f"cache_length {cache_length} is shorter than the prompt bucket {t}")
        room = ((0, 0), (0, 0), (0, 0), (0, cache_length - t), (0, 0))
        return cls(k=jnp.pad(k, room), v=jnp.pad(v, room), valid=jnp.pad(mask, ((0, 0), (0, cache_length - t))),
                   next_position=mask.sum(axis=1, dtype=jnp.int32), index=jnp.asarray(t, jnp.int32))

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times in place (row i -> rows i*n .. i*n+n-1): one prefill, n samples."""
        rep = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
        return KVCache(rep(self.k, 1), rep(self.v, 1), rep(self.valid, 0), rep(self.next_position, 0), self.index)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 causal LM.

    Args:
      config: architecture.
      dtype: compute dtype of activations and matmuls (float32 or bfloat16).
      param_dtype: storage dtype of parameters.
      remat: recompute each layer's activations in the backward pass (saves memory in training).
      rngs: random streams for initialisation (weights are N(0, 0.02), biases 0, norms 1).
    """

    def __init__(self, config: Qwen2Config, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.config, self.dtype, self.remat = config, dtype, remat
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), _normal, param_dtype, None)
        self.layers = DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=config.num_layers)
        self.final_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else _param(
            rngs, (d, v), ("embed", "vocab"), _normal, param_dtype, None)

    # -- full-sequence forward ------------------------------------------------------------------

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None) -> Array:
        """Logits of every position.

        Args:
          input_ids: [B, T] int32 token ids.
          attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right); None = all real.
          positions: [B, T] int32 RoPE positions; default counts real tokens only (as transformers'
            generate does), so a left-padded row gets the same positions as the unpadded one.
        Returns:
          [B, T, V] float32 logits. Values at padding positions are unspecified.
        """
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask, positions))

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                      positions: Array | None = None, *, tiles: attention.Tiles | None = None) -> Array:
        """Final-norm hidden states [B, T, D] in `dtype` (the input of the LM head).

        `tiles`: (query_chunk, key_chunk) of the causal attention (see `attention.causal_attention`);
        None = `attention.default_tiles(T)`. Hidden states at padding positions are unspecified.
        """
        return self._forward(input_ids, attention_mask, positions, keep_kv=False, tiles=tiles)[0]

    def prefill_cache(self, input_ids: Array, attention_mask: Array | None, cache_length: int, *,
                      tiles: attention.Tiles | None = None) -> tuple[Array, KVCache]:
        """Runs prompts once and returns (hidden [B, T, D], a cache of `cache_length` slots holding them).

        `prompt_kv` followed by `KVCache.from_prompt`; arguments as there.
        """
        input_ids, mask = _check_inputs(input_ids, attention_mask)
        hidden, k, v = self.prompt_kv(input_ids, mask, tiles=tiles)
        return hidden, KVCache.from_prompt(k, v, mask, cache_length)

    def prompt_kv(self, input_ids: Array, attention_mask: Array | None, *,
                  tiles: attention.Tiles | None = None) -> tuple[Array, Array, Array]:
        """Runs prompts once: (hidden [B, T, D], every layer's keys and values [L, B, K, T, Dh]).

        Attention covers the prompt only (T x T), in causal tiles (`tiles` as in `hidden_states`).
        Hidden states at padding positions are unspecified.
        """
        hidden, (k, v) = self._forward(input_ids, attention_mask, None, keep_kv=True, tiles=tiles)
        return hidden, k, v

    def _forward(self, input_ids: Array, attention_mask: Array | None, positions: Array | None, *,
                 keep_kv: bool, tiles: attention.Tiles | None) -> tuple[Array, tuple[Array, Array] | None]:
        """Causal forward over whole sequences; optionally returns every layer's k, v [L, B, K, T, Dh]."""
        input_ids, mask = _check_inputs(input_ids, attention_mask)
        if positions is None:
            positions = positions_from_mask(mask)
        query_chunk, key_chunk = tiles if tiles is not None else attention.default_tiles(input_ids.shape[1])
        x = self._embed(input_ids)
        cos, sin = rope_angles(positions, self.config.dim_per_head, self.config.rope_theta)

        def layer_fn(layer: DecoderLayer, x: Array) -> tuple[Array, tuple[Array, Array] | None]:
            h = layer.input_norm(x)
            q, k, v = layer.attn.project_qkv(h, cos, sin)
            k, v = _head_major(k), _head_major(v)
            heads = attention.causal_attention(q, k, v, mask, query_chunk=query_chunk, key_chunk=key_chunk)
            x = x + layer.attn.project_out(heads)
            return x + layer.mlp(layer.post_attn_norm(x)), ((k, v) if keep_kv else None)

        x, kv = self._scan_layers(layer_fn, x)
        return self.final_norm(x), kv

    def logits_from_hidden(self, hidden: Array) -> Array:
        """LM head: hidden [..., D] -> float32 logits [..., V] (float32 accumulation)."""
        if self.lm_head is None:
            kernel = self.embed_tokens[...].astype(self.dtype).T
        else:
            kernel = self.lm_head[...].astype(self.dtype)
        return _einsum("...d,dv->...v", hidden.astype(self.dtype), kernel, jnp.float32)

    # -- cached forward (prefill and decode) ----------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: DType | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_length` tokens (prompt + generated)."""
        c = self.config
        shape = (c.num_layers, batch_size, c.num_kv_heads, max_length, c.dim_per_head)
        dtype = dtype or self.dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch_size, max_length), bool),
                       next_position=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))

    def forward_with_cache(self, input_ids: Array, attention_mask: Array | None,
                           cache: KVCache) -> tuple[Array, KVCache]:
        """Appends T tokens per row to the cache and returns their logits.

        Used for prefill (T = padded prompt length) and for each decode step (T = 1). Tokens with
        mask 0 occupy a slot but are invisible to every query and do not advance positions.

        Args:
          input_ids: [B, T] int32.
          attention_mask: [B, T] (1 real, 0 padding) or None.
          cache: from `init_cache` or a previous call; the caller keeps index + T <= max_length.
        Returns:
          ([B, T, V] float32 logits, updated cache).
        """
        hidden, cache = self.hidden_states_with_cache(input_ids, attention_mask, cache)
        return self.logits_from_hidden(hidden), cache

    def hidden_states_with_cache(self, input_ids: Array, attention_mask: Array | None,
                                 cache: KVCache) -> tuple[Array, KVCache]:
        """`forward_with_cache` without the LM head: ([B, T, D] final-norm hidden states, cache).

        A prefill needs logits of the last position only; applying the LM head to that slice
        avoids materialising [B, T, V] logits.
        """
        input_ids, mask = _check_inputs(input_ids, attention_mask)
        t = input_ids.shape[1]
        positions = cache.next_position[:, None] + positions_from_mask(mask)
        old_allowed = cache.valid[:, None, :]  # [B, 1, S]: every filled slot precedes the new tokens
        new_allowed = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]  # [B, T, T] causal
        x = self._embed(input_ids)
        cos, sin = rope_angles(positions, self.config.dim_per_head, self.config.rope_theta)

        def layer_fn(layer: DecoderLayer, x: Array, k_old: Array, v_old: Array) -> tuple[Array, tuple[Array, Array]]:
            h = layer.input_norm(x)
            q, k, v = layer.attn.project_qkv(h, cos, sin)
            k, v = _head_major(k), _head_major(v)
            x = x + layer.attn.attend(q, [(k_old.astype(self.dtype), v_old.astype(self.dtype), old_allowed),
                                          (k, v, new_allowed)])
            x = x + layer.mlp(layer.post_attn_norm(x))
            return x, (k.astype(cache.k.dtype), v.astype(cache.v.dtype))

        x, (k_new, v_new) = self._scan_layers(layer_fn, x, cache.k, cache.v)  # k_new: [L, B, K, T, Dh]
        index = cache.index
        new_cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, k_new, (0, 0, 0, index, 0)),
                            v=jax.lax.dynamic_update_slice(cache.v, v_new, (0, 0, 0, index, 0)),
                            valid=jax.lax.dynamic_update_slice(cache.valid, mask, (0, index)),
                            next_position=cache.next_position + mask.sum(axis=1, dtype=jnp.int32), index=index + t)
        return self.final_norm(x), new_cache

    # -- internals ------------------------------------------------------------------------------

    def _embed(self, input_ids: Array) -> Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return sharding.constrain(x, ("batch", "length", "embed"))

    def _scan_layers(self, layer_fn: Callable[..., tuple[Array, Any]], x: Array, *per_layer: Array) -> tuple[Array, Any]:
        """Runs `x, y_i = layer_fn(layer_i, x, *slices_i)` for i = 0..L-1 under one lax.scan.

        `per_layer` arrays have a leading layer axis and are sliced per layer (read-only); the
        per-layer outputs y_i come back stacked on a leading layer axis.
        """
        graphdef, stacked = nnx.split(self.layers)

        def body(x, inputs):
            layer_state, slices = inputs
            x, y = layer_fn(nnx.merge(graphdef, layer_state), x, *slices)
            return sharding.constrain(x, ("batch", "length", "embed")), y

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, x, (stacked, per_layer))


def _head_major(x: Array) -> Array:
    """[B, T, K, Dh] -> [B, K, T, Dh]."""
    return x.transpose(0, 2, 1, 3)


def positions_from_mask(mask: Array) -> Array:
    """RoPE positions counting real tokens only: mask [B, T] bool -> [B, T] int32 (0 at leading pads)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def _check_inputs(input_ids: Array, attention_mask: Array | None) -> tuple[Array, Array]:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        return input_ids, jnp.ones(input_ids.shape, bool)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    return input_ids, attention_mask.astype(bool)


# ----------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------


def init_random(config: Qwen2Config, *, seed: int = 0, dtype: DType = jnp.float32,
                param_dtype: DType | None = None, remat: bool = False) -> Qwen2ForCausalLM:
    """A randomly initialised model (tests, toy models)."""
    return Qwen2ForCausalLM(config, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat,
                            rngs=nnx.Rngs(seed))


def abstract_model(config: Qwen2Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                   remat: bool = False) -> Qwen2ForCausalLM:
    """The model with ShapeDtypeStruct placeholders instead of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: init_random(config, dtype=dtype, param_dtype=param_dtype, remat=remat))
