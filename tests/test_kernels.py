"""The GPU paths of `models.kernels`, run on CPU: each computes what the portable path computes.

cuDNN attention runs here through the same `jax.nn.dot_product_attention` call with
implementation="xla" (same wrapper: rows rotated to right padding, sequence lengths), the ragged
decode kernel in Pallas' interpret mode; the kernel's lowering to Triton is checked too.
"""

import os
import pathlib
import subprocess
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentflow_jax.models import attention, kernels, qwen2
from agentflow_jax.models.config import Qwen2Config
from agentflow_jax.rl import logprobs

CONFIG = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=6, num_kv_heads=2,
                     head_dim=16)
FUSED = kernels.Kernels(sequence_attention="xla")


def test_platform_choice():
    assert kernels.for_platform("cpu") == kernels.PORTABLE == kernels.Kernels()
    assert kernels.for_platform("tpu") == kernels.PORTABLE
    gpu = kernels.for_platform("cuda")
    assert (gpu.sequence_attention, gpu.decode_layers, gpu.decode_attention) == ("cudnn", "unrolled", "ragged")
    assert kernels.default() == kernels.PORTABLE  # the test session runs on CPU
    assert qwen2.abstract_model(CONFIG).resolved_kernels() == kernels.PORTABLE
    with pytest.raises(ValueError, match="decode_layers"):
        kernels.Kernels(decode_layers="loop")


def _numpy_ragged(q, k, v, start, end):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for row in range(q.shape[0]):
        keys, values = k[row, :, start[row]:end[row]], v[row, :, start[row]:end[row]]  # [K, n, Dh]
        scores = np.einsum("kgd,knd->kgn", q[row], keys) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[row] = np.einsum("kgn,knd->kgd", weights / weights.sum(-1, keepdims=True), values)
    return out


@pytest.mark.parametrize("rows, groups, slots, dtype", [
    (3, 3, 96, jnp.float32),    # few rows: each row's range split over several programs; blocks of 32
    (40, 4, 64, jnp.float32),   # enough rows for one program per row and KV head
    (2, 7, 80, jnp.bfloat16),   # blocks of 16, bfloat16 cache
])
def test_ragged_decode_attention_reads_each_rows_slots(rows, groups, slots, dtype):
    rng = np.random.default_rng(rows)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in
               [(rows, 2, groups, 16), (rows, 2, slots, 16), (rows, 2, slots, 16)])
    start = rng.integers(0, slots - 1, rows)
    end = np.minimum(start + 1 + rng.integers(0, slots, rows), slots)
    end[0], start[-1] = slots, 0  # a range to the cache's end and one from its start
    # Slots outside a row's range hold huge values: attending to any of them would change the result.
    outside = (np.arange(slots)[None] < start[:, None]) | (np.arange(slots)[None] >= end[:, None])
    k = jnp.where(outside[:, None, :, None], jnp.asarray(1e4, dtype), k)
    v = jnp.where(outside[:, None, :, None], jnp.asarray(-1e4, dtype), v)
    out = attention.ragged_decode_attention(q, k, v, jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32),
                                            interpret=True)
    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), _numpy_ragged(q, k, v, start, end), atol=tolerance)


def test_ragged_kernel_lowers_to_triton():
    q = jax.ShapeDtypeStruct((4, 2, 6, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 2, 768, 128), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((4,), jnp.int32)
    lowered = jax.jit(attention.ragged_decode_attention).trace(q, cache, cache, rows, rows).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "ragged_decode_attention" in text and "triton" in text


def _batch(seed: int):
    """Left-padded, right-padded, unpadded and all-padding rows."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (4, 24)), jnp.int32)
    mask = np.ones((4, 24), bool)
    mask[0, :9] = False
    mask[1, 17:] = False
    mask[3] = False
    return ids, jnp.asarray(mask)


def test_fused_attention_prefill_matches_tiled():
    tiled = qwen2.init_random(CONFIG, seed=3)
    fused = qwen2.init_random(CONFIG, seed=3, kernels=FUSED)
    ids, mask = _batch(0)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(fused(ids, mask))[real], np.asarray(tiled(ids, mask))[real], atol=1e-5)
    (hidden_t, k_t, v_t), (hidden_f, k_f, v_f) = (m.prompt_kv(ids, mask) for m in (tiled, fused))
    np.testing.assert_allclose(np.asarray(hidden_f)[real], np.asarray(hidden_t)[real], atol=1e-5)
    for ours, reference in ((k_f, k_t), (v_f, v_t)):  # [L, B, K, T, Dh] at real slots (padding is unspecified)
        np.testing.assert_allclose(np.moveaxis(np.asarray(ours), 3, 2)[:, real],
                                   np.moveaxis(np.asarray(reference), 3, 2)[:, real], atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_fused_attention_gradients_equal_tiled(dtype, tolerance):
    ids, mask = _batch(1)
    targets = jnp.roll(ids, -1, axis=1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=ids.shape), jnp.float32) * mask

    def gradient(model):
        graphdef, params = nnx.split(model)

        def loss(params):
            logp, _ = logprobs.token_logprobs(graphdef, params, ids, mask, targets, mask=mask)
            return jnp.sum(logp * weights)

        return jax.jit(jax.value_and_grad(loss))(params)

    (value_t, grads_t), (value_f, grads_f) = (
        gradient(qwen2.init_random(CONFIG, seed=4, dtype=dtype, kernels=k)) for k in (kernels.PORTABLE, FUSED))
    np.testing.assert_allclose(float(value_f), float(value_t), rtol=tolerance)
    for (path, g_t), g_f in zip(jax.tree_util.tree_leaves_with_path(grads_t), jax.tree.leaves(grads_f)):
        g_t, g_f = np.asarray(g_t, np.float64), np.asarray(g_f, np.float64)
        error = np.linalg.norm(g_f - g_t) / max(np.linalg.norm(g_t), 1e-12)
        assert error < tolerance, f"{jax.tree_util.keystr(path)}: relative gradient difference {error:.2e}"


@pytest.mark.parametrize("decode_attention", ["masked", "ragged"])
def test_unrolled_decode_step_matches_cached_forward(decode_attention):
    model = qwen2.init_random(CONFIG, seed=5)
    ids, _ = _batch(3)
    mask = jnp.arange(24)[None, :] >= jnp.asarray([9, 0, 23, 20])[:, None]  # left-padded, as the sampler's
    _, cache = model.prefill_cache(ids, mask, 48)
    step = kernels.Kernels(decode_layers="unrolled", decode_attention=decode_attention, interpret=True)
    layers = model.packed_layers()
    layered = qwen2.LayerwiseKVCache.from_stacked(cache)
    first_slot = jnp.argmax(cache.valid, axis=1).astype(jnp.int32)
    for token in ([5, 6, 7, 1], [8, 9, 10, 2]):
        token = jnp.asarray(token, jnp.int32)
        expected, cache = model.forward_with_cache(token[:, None], None, cache)
        logits, layered = model.decode_step(layers, token, layered, first_slot, kernels=step)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[:, 0]), atol=1e-5)
    stacked = layered.stacked()
    np.testing.assert_allclose(np.asarray(stacked.k), np.asarray(cache.k), atol=1e-6)
    for name in ("valid", "next_position", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(stacked, name)), np.asarray(getattr(cache, name)))


def test_gpu_bench_imports_need_no_grain_or_ml_collections():
    """experiments/benchmarks/gpu_bench.py must run on a plain CUDA image (JAX, Flax, PyTorch, transformers)."""
    code = ("import sys\n"
            "for name in ('grain', 'ml_collections'):\n"
            "    sys.modules[name] = None\n"
            "import agentflow_jax.models.hf_io, agentflow_jax.models.kernels, agentflow_jax.rl.loss\n"
            "import agentflow_jax.rl.logprobs, agentflow_jax.rl.batch, agentflow_jax.sampling\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
