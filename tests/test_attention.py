"""Blocked causal attention with its own VJP: values and gradients against a direct NumPy / autodiff
computation over every tiling, grouped-query shapes and padding pattern; memory; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentflow_jax.models import attention


def numpy_attention(q, k, v, key_valid):
    """Float64 softmax attention, query i sees key j <= i with key_valid; rows seeing nothing give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dh = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    for row in range(b):
        for head in range(h):
            scores = q[row, :, head] @ k[row, head // group].T / np.sqrt(dh)  # [T, T]
            visible = np.tril(np.ones((t, t), bool)) & np.asarray(key_valid[row])[None, :]
            scores = np.where(visible, scores, -np.inf)
            peak = np.max(scores, axis=-1, keepdims=True)
            weights = np.where(visible, np.exp(scores - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
            total = weights.sum(-1, keepdims=True)
            out[row, :, head] = (weights / np.where(total > 0, total, 1.0)) @ v[row, head // group]
    return out


def autodiff_attention(q, k, v, key_valid):
    """The same attention in plain jnp (repeated K/V, one softmax), differentiated by JAX itself."""
    t, h, dh = q.shape[1], q.shape[2], q.shape[3]
    group = h // k.shape[1]
    keys, values = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)  # [B, H, T, Dh]
    scores = jnp.einsum("bthd,bhsd->bhts", q, keys) / np.sqrt(dh)
    visible = jnp.tril(jnp.ones((t, t), bool))[None, None] & key_valid[:, None, None, :]
    seen = jnp.any(visible, axis=-1, keepdims=True)
    weights = jnp.where(visible & seen, jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1), 0.0)
    return jnp.einsum("bhts,bhsd->bthd", weights, values)


def make_inputs(seed, batch=3, length=23, heads=4, kv_heads=2, dim=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, length, dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, length, dim)), dtype)
    key_valid = np.ones((batch, length), bool)
    key_valid[0, :6] = False                      # left padding: the first 6 queries see no key
    key_valid[1, length - 5:] = False             # right padding
    if batch > 2:
        key_valid[2, 1::3] = False                # holes
    return q, k, v, jnp.asarray(key_valid)


TILINGS = [(None, None), (8, None), (8, 8), (5, 3), (4, 16), (30, 7), (23, 23)]


@pytest.mark.parametrize("query_chunk, key_chunk", TILINGS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_values_and_gradients_equal_direct_attention(query_chunk, key_chunk, heads, kv_heads):
    q, k, v, key_valid = make_inputs(0, heads=heads, kv_heads=kv_heads)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def blocked(q, k, v):
        return attention.causal_attention(q, k, v, key_valid, query_chunk=query_chunk, key_chunk=key_chunk)

    out = blocked(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, numpy_attention(q, k, v, key_valid), atol=2e-6)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(lambda q, k, v: autodiff_attention(q, k, v, key_valid)), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5)


def test_queries_that_see_no_key_give_zero_and_pass_no_gradient():
    q, k, v, key_valid = make_inputs(2)
    out = attention.causal_attention(q, k, v, key_valid, query_chunk=4, key_chunk=2)
    np.testing.assert_array_equal(out[0, :6], 0.0)  # row 0: left padding of 6 slots
    grads = jax.grad(lambda q, k, v: jnp.sum(attention.causal_attention(q, k, v, key_valid, query_chunk=4)),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_array_equal(grads[0][0, :6], 0.0)
    np.testing.assert_array_equal(grads[1][0, :, :6], 0.0)  # padding keys are never read
    np.testing.assert_array_equal(grads[2][0, :, :6], 0.0)


@pytest.mark.parametrize("query_chunk, key_chunk", [(16, 8), (128, 512)])
def test_bfloat16_values_and_gradients_stay_close_to_float32(query_chunk, key_chunk):
    """Compiled (XLA:CPU runs bf16 x bf16 -> f32 dots only in some layouts), against float32 on the same values."""
    q, k, v, key_valid = make_inputs(3, batch=2, length=40, dim=16)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        out = attention.causal_attention(q, k, v, key_valid, query_chunk=query_chunk, key_chunk=key_chunk)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, low), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert low.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    wide = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(low, np.float32), numpy_attention(*wide, key_valid), atol=3e-2)
    expected = jax.grad(lambda *a: jnp.sum(autodiff_attention(*a, key_valid) * cotangent), argnums=(0, 1, 2))(*wide)
    for g, e in zip(grads, expected):
        assert np.linalg.norm(np.asarray(g, np.float32) - e) <= 2e-2 * np.linalg.norm(e)


@pytest.mark.parametrize("length, tiles", [(1, (128, 512)), (100, (128, 512)), (512, (128, 512)),
                                           (1024, (128, 512)), (2048, (256, 512)), (4096, (512, 512)),
                                           (20_000, (2_500, 2_500))])
def test_default_tiles(length, tiles):
    assert attention.default_tiles(length) == tiles


def test_tile_plan_covers_the_causal_triangle_exactly_once():
    for length, qc, kc in [(23, 5, 3), (16, 4, 4), (9, None, 2), (9, 4, None), (1, 3, 3)]:
        covered = np.zeros((length, length), int)
        for tiles in attention.tile_plan(length, qc, kc):
            for tile in tiles:
                covered[tile.q0:tile.q1, tile.k0:tile.k1] += 1
        lower = np.tril(np.ones((length, length), bool))
        assert np.all(covered[lower] == 1)  # every causal (query, key) pair in exactly one tile
        assert np.all(covered <= 1)


def test_backward_keeps_no_full_score_matrix():
    """With 4 x 4 tiles of a 32 x 32 attention, no array of the gradient program holds T x T scores."""
    batch, length, heads = 2, 32, 4
    q, k, v, key_valid = make_inputs(4, batch=batch, length=length, heads=heads, kv_heads=2)

    def loss(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, key_valid, query_chunk=4, key_chunk=4) ** 2)

    largest = 0

    def visit(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                if jnp.issubdtype(getattr(var.aval, "dtype", jnp.int32), jnp.floating):
                    largest = max(largest, int(np.prod(var.aval.shape)))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert largest == batch * length * heads * 8  # the [B, T, H, Dh] inputs and gradients; a tile is smaller
    assert largest < batch * heads * length * length


@pytest.mark.parametrize("change, message", [
    (dict(k=np.zeros((3, 2, 22, 8))), "k and v must be"),
    (dict(q=np.zeros((3, 23, 3, 8))), "not a multiple"),
    (dict(key_valid=np.ones((3, 22), bool)), "key_valid must be"),
    (dict(query_chunk=0), "query_chunk must be a positive"),
    (dict(key_chunk=-1), "key_chunk must be a positive"),
])
def test_bad_inputs_are_clear_errors(change, message):
    q, k, v, key_valid = make_inputs(5)
    args = dict(q=q, k=k, v=v, key_valid=key_valid, query_chunk=4, key_chunk=4)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        attention.causal_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("key_valid"), **args)
