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

Platform paths (`models.kernels`, chosen per platform, each computing what the portable path
computes): on NVIDIA GPUs whole-sequence attention goes through cuDNN's fused attention
(`jax.nn.dot_product_attention`), and the sampler decodes with `decode_step`: the layers unrolled
over weights packed once per decode call (`packed_layers`) and a per-layer cache
(`LayerwiseKVCache`) whose attention reads only the slots each row uses.

Public API (architecture in `models.config`; loading and saving HF directories in `models.hf_io`):
  model = qwen2.init_random(config, seed=0)                 # or hf_io.load_pretrained(path)
  logits = model(input_ids, attention_mask=attention_mask)  # [B, T] int32 -> [B, T, V] float32
  cache = model.init_cache(batch_size, max_length)
  logits, cache = model.forward_with_cache(input_ids, attention_mask, cache)   # prefill / decode
  logits, layered = model.decode_step(model.packed_layers(), tokens, layered, first_slot, kernels=k)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax import sharding
from agentflow_jax.models import attention, kernels as kernels_lib
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

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


@jax.named_scope("norm")
def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """x [..., D] / sqrt(mean(x^2) + eps) * scale [D], in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerwiseKVCache:
    """A `KVCache` with one key and one value array per layer: the carry of the unrolled decode
    step, which writes each layer's new slot in place and reads the layer's cache without
    slicing a stacked array.

    Attributes:
      k, v: tuples of L arrays [B, K, S, Dh].
      valid, next_position, index: as in `KVCache`.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    valid: Array
    next_position: Array
    index: Array

    @classmethod
    def from_stacked(cls, cache: KVCache, slot_multiple: int = 1) -> "LayerwiseKVCache":
        """A copy of `cache` split by layer, its slots padded with invalid ones to a multiple of
        `slot_multiple` (a kernel's block size)."""
        room = (-cache.max_length) % slot_multiple
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, room), (0, 0))) if room else x  # noqa: E731
        layers = range(cache.k.shape[0])
        return cls(tuple(pad(cache.k[i]) for i in layers), tuple(pad(cache.v[i]) for i in layers),
                   jnp.pad(cache.valid, ((0, 0), (0, room))), cache.next_position, cache.index)

    def stacked(self, max_length: int | None = None) -> KVCache:
        """The layers stacked again into a `KVCache`, cut to `max_length` slots (None = all)."""
        cut = slice(None, max_length)
        return KVCache(jnp.stack([k[:, :, cut] for k in self.k]), jnp.stack([v[:, :, cut] for v in self.v]),
                       self.valid[:, cut], self.next_position, self.index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One decoder layer's weights laid out for the unrolled decode step (`Qwen2ForCausalLM.packed_layers`).

    Attributes:
      input_norm, post_attn_norm: [D] RMSNorm scales (parameter dtype).
      qkv_kernel: [D, (H + 2K) * Dh], the q, k and v projections side by side (compute dtype).
      qkv_bias: [(H + 2K) * Dh].
      o_kernel: [H * Dh, D].
      gate_up_kernel: [D, 2F], the gate then the up projection.
      down_kernel: [F, D].
    """

    input_norm: Array
    qkv_kernel: Array
    qkv_bias: Array
    o_kernel: Array
    post_attn_norm: Array
    gate_up_kernel: Array
    down_kernel: Array


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
      kernels: implementation choices (`models.kernels`); None = the ones that pay on JAX's default
        device, resolved when a program is traced. A static attribute: it may be reassigned.
      rngs: random streams for initialisation (weights are N(0, 0.02), biases 0, norms 1).
    """

    def __init__(self, config: Qwen2Config, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 remat: bool = False, kernels: kernels_lib.Kernels | None = None, rngs: nnx.Rngs):
        self.config, self.dtype, self.remat, self.kernels = config, dtype, remat, kernels
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
        implementation = self.resolved_kernels().sequence_attention
        if implementation != "tiled":
            return self._fused_forward(input_ids, mask, positions, keep_kv=keep_kv, implementation=implementation)
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

    def _fused_forward(self, input_ids: Array, mask: Array, positions: Array, *, keep_kv: bool,
                       implementation: str) -> tuple[Array, tuple[Array, Array] | None]:
        """`_forward` with `attention.fused_causal_attention`, which takes right-padded rows.

        Each row is rotated so that its first real token is at slot 0 (a left-padded row becomes
        right-padded; a right-padded one is unchanged), the layers run, and the hidden states
        (and keys / values) are rotated back. Padding is on the left or the right of a row, as the
        model's API says, so its real tokens stay one contiguous run. A row with no real token
        attends to its slot 0 (finite values, unspecified as all padding).
        """
        length = input_ids.shape[1]
        shift = jnp.argmax(mask, axis=1).astype(jnp.int32)  # the first real slot
        lengths = jnp.maximum(mask.sum(axis=1, dtype=jnp.int32), 1)
        to_front, back = _rotation(shift, length), _rotation(-shift, length)
        x = self._embed(jnp.take_along_axis(input_ids, to_front, axis=1))
        cos, sin = rope_angles(jnp.take_along_axis(positions, to_front, axis=1), self.config.dim_per_head,
                               self.config.rope_theta)

        def layer_fn(layer: DecoderLayer, x: Array) -> tuple[Array, tuple[Array, Array] | None]:
            h = layer.input_norm(x)
            q, k, v = layer.attn.project_qkv(h, cos, sin)
            with jax.named_scope("attention_core"):
                heads = attention.fused_causal_attention(q, k, v, lengths, implementation=implementation)
            x = x + layer.attn.project_out(heads)
            return x + layer.mlp(layer.post_attn_norm(x)), ((_head_major(k), _head_major(v)) if keep_kv else None)

        x, kv = self._scan_layers(layer_fn, x)
        hidden = jnp.take_along_axis(self.final_norm(x), back[:, :, None], axis=1)
        if kv is not None:
            kv = tuple(jnp.take_along_axis(a, back[None, :, None, :, None], axis=3) for a in kv)
        return hidden, kv

    def resolved_kernels(self) -> kernels_lib.Kernels:
        """`kernels`, or the default for JAX's default device when it is None."""
        return self.kernels if self.kernels is not None else kernels_lib.default()

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

    # -- unrolled decode (GPU; see models.kernels) -----------------------------------------------

    def packed_layers(self) -> tuple[PackedLayer, ...]:
        """Every layer's weights as its own arrays, q/k/v and gate/up each fused into one matrix.

        A copy of the layer weights (in the compute dtype): the unrolled decode builds it once
        before its loop, so each step reads plain arrays with no per-layer slicing.
        """
        c, dt, layers = self.config, self.dtype, self.layers
        n, d = c.num_layers, c.hidden_size
        attn, mlp = layers.attn, layers.mlp
        as_matrix = lambda w: w[...].astype(dt).reshape(n, d, -1)  # noqa: E731  [L, D, heads * Dh]
        qkv = jnp.concatenate([as_matrix(attn.q_kernel), as_matrix(attn.k_kernel), as_matrix(attn.v_kernel)], -1)
        qkv_bias = jnp.concatenate([b[...].astype(dt).reshape(n, -1) for b in (attn.q_bias, attn.k_bias, attn.v_bias)],
                                   axis=-1)
        o = attn.o_kernel[...].astype(dt).reshape(n, -1, d)
        gate_up = jnp.concatenate([mlp.gate_kernel[...].astype(dt), mlp.up_kernel[...].astype(dt)], axis=-1)
        down = mlp.down_kernel[...].astype(dt)
        first_norm, second_norm = layers.input_norm.scale[...], layers.post_attn_norm.scale[...]
        return tuple(PackedLayer(first_norm[i], qkv[i], qkv_bias[i], o[i], second_norm[i], gate_up[i], down[i])
                     for i in range(n))

    def decode_step(self, layers: Sequence[PackedLayer], tokens: Array, cache: LayerwiseKVCache,
                    first_slot: Array, *, kernels: kernels_lib.Kernels) -> tuple[Array, LayerwiseKVCache]:
        """Appends one token per row and returns its logits: `forward_with_cache` for T = 1 with
        the layers unrolled over `packed_layers()` and each layer's cache written in place.

        The new slot is written before attention, which then reads the layer's cache with the slot
        included (`kernels.decode_attention`: "masked" over every slot, "ragged" over each row's
        slots [first_slot, index] only).

        Args:
          layers: `packed_layers()`.
          tokens: [B] int32, real tokens (positions advance by one).
          cache: the per-layer cache; index + 1 <= S.
          first_slot: [B] int32, each row's first real slot (its valid slots run from there to the
            write index).
          kernels: implementation choices (decode_attention, interpret).
        Returns:
          ([B, V] float32 logits, the cache with the token appended).
        """
        c, dt = self.config, self.dtype
        rows, dim, heads, kv_heads = tokens.shape[0], c.dim_per_head, c.num_heads, c.num_kv_heads
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((rows, 1), bool), (0, index))
        cos, sin = rope_angles(cache.next_position[:, None], dim, c.rope_theta)
        x = self._embed(tokens[:, None])  # [B, 1, D]
        keys, values = [], []
        for layer, k_cache, v_cache in zip(layers, cache.k, cache.v):
            with jax.named_scope("attention_qkv"):
                qkv = _einsum("btd,df->btf", rms_norm(x, layer.input_norm, c.rms_norm_eps), layer.qkv_kernel, dt)
                q, k, v = jnp.split(qkv + layer.qkv_bias, (heads * dim, (heads + kv_heads) * dim), axis=-1)
                q = apply_rope(q.reshape(rows, 1, heads, dim), cos, sin)
                k = apply_rope(k.reshape(rows, 1, kv_heads, dim), cos, sin)
                k_cache = jax.lax.dynamic_update_slice(k_cache, _head_major(k).astype(k_cache.dtype), (0, 0, index, 0))
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, _head_major(v.reshape(rows, 1, kv_heads, dim)).astype(v_cache.dtype), (0, 0, index, 0))
            if kernels.decode_attention == "ragged":
                with jax.named_scope("attention_core"):
                    out = attention.ragged_decode_attention(
                        q.reshape(rows, kv_heads, heads // kv_heads, dim), k_cache.astype(dt), v_cache.astype(dt),
                        first_slot, jnp.broadcast_to(index + 1, (rows,)), interpret=kernels.interpret)
            else:
                out = attention.cached_attention(q, [(k_cache.astype(dt), v_cache.astype(dt), valid[:, None, :])])
            with jax.named_scope("attention_out"):
                x = x + _einsum("btf,fd->btd", out.reshape(rows, 1, heads * dim), layer.o_kernel, dt)
            with jax.named_scope("mlp"):
                gate, up = jnp.split(_einsum("btd,df->btf", rms_norm(x, layer.post_attn_norm, c.rms_norm_eps),
                                             layer.gate_up_kernel, dt), 2, axis=-1)
                x = x + _einsum("btf,fd->btd", jax.nn.silu(gate) * up, layer.down_kernel, dt)
            keys.append(k_cache)
            values.append(v_cache)
        new_cache = LayerwiseKVCache(tuple(keys), tuple(values), valid, cache.next_position + 1, index + 1)
        return self.logits_from_hidden(self.final_norm(x)[:, 0]), new_cache

    # -- internals ------------------------------------------------------------------------------

    def _embed(self, input_ids: Array) -> Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return sharding.constrain(x, ("batch", "length", "embed"))

    def _scan_layers(self, layer_fn: Callable[..., tuple[Array, Any]], x: Array,
                     *per_layer: Array) -> tuple[Array, Any]:
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


def _rotation(shift: Array, length: int) -> Array:
    """Gather indices [B, T] that rotate row b left by shift[b]: out[b, t] = x[b, (t + shift[b]) mod T]."""
    return (jnp.arange(length, dtype=jnp.int32)[None, :] + shift[:, None]) % length


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
                param_dtype: DType | None = None, remat: bool = False,
                kernels: kernels_lib.Kernels | None = None) -> Qwen2ForCausalLM:
    """A randomly initialised model (tests, toy models, benchmarks)."""
    return Qwen2ForCausalLM(config, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat, kernels=kernels,
                            rngs=nnx.Rngs(seed))


def abstract_model(config: Qwen2Config, *, dtype: DType = jnp.float32, param_dtype: DType | None = None,
                   remat: bool = False) -> Qwen2ForCausalLM:
    """The model with ShapeDtypeStruct placeholders instead of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: init_random(config, dtype=dtype, param_dtype=param_dtype, remat=remat))
