"""Meshes on 8 fake CPU devices: parameter placement, forward and greedy sampling equal to one device,
resharding between training and sampling rules, and mesh construction errors."""

import flax.nnx as nnx
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agentflow_jax import sharding
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.sampling import Sampler, buckets
from hf_reference import make_hf_model, padded_batch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [3]]

# Expected training-rule specs (embed over fsdp, heads / kv_heads / mlp / vocab over tensor), written
# out by hand for each mesh; size-1 axes are dropped.
FSDP_ONLY = {"embed_tokens": P(None, "fsdp"), "q_kernel": P(None, "fsdp", None, None),
             "k_kernel": P(None, "fsdp", None, None), "down_kernel": P(None, None, "fsdp"), "lm_head": P("fsdp", None)}
FSDP_TENSOR = {"embed_tokens": P("tensor", "fsdp"), "q_kernel": P(None, "fsdp", "tensor", None),
               "k_kernel": P(None, "fsdp", "tensor", None), "down_kernel": P(None, "tensor", "fsdp"),
               "lm_head": P("fsdp", "tensor")}
MESHES = [
    ({"fsdp": 8}, FSDP_ONLY, "fsdp"),
    ({"fsdp": 4, "tensor": 2}, FSDP_TENSOR, "fsdp"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, FSDP_TENSOR, ("data", "fsdp")),
]


def _named_params(model: qwen2.Qwen2ForCausalLM) -> dict[str, jax.Array]:
    return {"embed_tokens": model.embed_tokens[...], "q_kernel": model.layers.attn.q_kernel[...],
            "k_kernel": model.layers.attn.k_kernel[...], "down_kernel": model.layers.mlp.down_kernel[...],
            "lm_head": model.lm_head[...]}


def _forward(model: qwen2.Qwen2ForCausalLM, ids, mask) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))(state, ids, mask))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(0, init_std=0.1, **TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_device(checkpoint):
    """Reference results on one device: (ids, mask, logits, greedy SamplerOutput)."""
    model = hf_io.load_pretrained(checkpoint)
    ids, mask = padded_batch(np.random.RandomState(0), 256, [(12, "none"), (7, "left"), (1, "left"), (9, "left")] * 2,
                             width=12)
    ids, mask = ids.astype(np.int32), mask.astype(bool)
    greedy = Sampler(model, max_cache_length=64).generate(PROMPTS, max_new_tokens=24, temperature=0.0, n=2)
    return ids, mask, _forward(model, ids, mask), greedy


@pytest.mark.parametrize("mesh_spec,expected_specs,batch_axes", MESHES, ids=["fsdp8", "fsdp4xtensor2",
                                                                            "data2xfsdp2xtensor2"])
def test_mesh_matches_single_device(checkpoint, single_device, mesh_spec, expected_specs, batch_axes, monkeypatch):
    ids, mask, reference_logits, reference_greedy = single_device
    mesh = sharding.make_mesh(mesh_spec)
    model = hf_io.load_pretrained(checkpoint, mesh=mesh)
    for name, value in _named_params(model).items():
        assert value.sharding.spec == expected_specs[name], name

    batch_sharding = NamedSharding(mesh, P(batch_axes, None))
    with sharding.activation_sharding(mesh, "training"):
        logits = _forward(model, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    np.testing.assert_allclose(logits[mask], reference_logits[mask], atol=1e-5, rtol=0)

    sampler = Sampler(model, max_cache_length=64, mesh=mesh, rules="sampling")
    assert sampler.params["layers"]["attn"]["q_kernel"][...].sharding.spec == P(
        None, None, expected_specs["q_kernel"][2], None)  # sampling rules: embed replicated
    greedy = sampler.generate(PROMPTS, max_new_tokens=24, temperature=0.0, n=2)
    assert greedy.tokens == reference_greedy.tokens
    np.testing.assert_allclose(np.array(greedy.logprobs), np.array(reference_greedy.logprobs), atol=1e-5)
    cache = sampler.prefill(PROMPTS, n=2, max_new_tokens=24).cache
    expected_cache = NamedSharding(mesh, P(None, batch_axes, expected_specs["k_kernel"][2], None, None))
    assert cache.k.sharding.is_equivalent_to(expected_cache, cache.k.ndim), cache.k.sharding

    # Row blocks (each block spans every batch shard; 4-shard meshes: 2 prompts per prefill block,
    # 4 rows per decode block; 8 shards leave no smaller block) sample the same tokens.
    monkeypatch.setattr(buckets, "PREFILL_BLOCK_TOKENS", 32)
    monkeypatch.setattr(buckets, "DECODE_BLOCK_BYTES", sum(x.nbytes for x in jax.tree.leaves(sampler.params))
                        + 4 * cache.k.nbytes * 2 // cache.k.shape[1])
    blocked = Sampler(model, max_cache_length=64, mesh=mesh, rules="sampling", row_blocks=True)
    greedy = blocked.generate(PROMPTS, max_new_tokens=24, temperature=0.0, n=2)
    assert greedy.tokens == reference_greedy.tokens
    np.testing.assert_allclose(np.array(greedy.logprobs), np.array(reference_greedy.logprobs), atol=1e-5)


@pytest.mark.parametrize("mesh_spec,batch_axes", [({"fsdp": 8}, "fsdp"), ({"data": 2, "fsdp": 2, "tensor": 2},
                                                                        ("data", "fsdp"))], ids=["fsdp8", "2x2x2"])
def test_training_loss_and_gradients_on_a_mesh_equal_one_device(checkpoint, single_device, mesh_spec, batch_axes):
    """Flow-GRPO loss + gradient through the custom VJPs (blocked attention, SwiGLU, chunked LM head)
    with parameters, batch and activations sharded, against one device."""
    ids, mask, _, _ = single_device
    rows, length = ids.shape
    rng = np.random.default_rng(0)
    loss_mask = (mask & (np.arange(length) >= 6)).astype(np.float32)
    inputs = loss_lib.LossInputs(
        input_ids=ids, attention_mask=mask.astype(np.int32), targets=np.roll(ids, -1, axis=1), loss_mask=loss_mask,
        advantages=rng.normal(size=rows).astype(np.float32), token_weights=loss_mask / loss_mask.sum(),
        old_logprobs=(-5.0 * loss_mask).astype(np.float32), ref_logprobs=(-5.2 * loss_mask).astype(np.float32),
        sampler_logprobs=np.zeros_like(loss_mask))
    config = loss_lib.LossConfig(entropy_coef=0.01, logits_chunk_size=16)

    graphdef, params = nnx.split(hf_io.load_pretrained(checkpoint))
    (loss_one, _), grads_one = loss_lib.make_value_and_grad(graphdef, config)(params, inputs)

    mesh = sharding.make_mesh(mesh_spec)
    graphdef, params = nnx.split(hf_io.load_pretrained(checkpoint, mesh=mesh))
    batch_sharding = NamedSharding(mesh, P(batch_axes))
    sharded_inputs = jax.tree.map(lambda x: jax.device_put(x, batch_sharding), inputs)
    with sharding.activation_sharding(mesh, "training"):
        (loss_mesh, _), grads_mesh = loss_lib.make_value_and_grad(graphdef, config)(params, sharded_inputs)
    np.testing.assert_allclose(float(loss_mesh), float(loss_one), rtol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads_mesh), jax.tree.leaves(grads_one)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=1e-4)


def test_reshard_training_to_sampling_keeps_values(checkpoint):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = hf_io.load_pretrained(checkpoint, mesh=mesh)
    before = jax.tree.map(np.asarray, nnx.state(model))
    sharding.shard_model(model, mesh, "sampling")
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    specs = {name: value.sharding.spec for name, value in _named_params(model).items()}
    assert specs == {"embed_tokens": P("tensor", None), "q_kernel": P(None, None, "tensor", None),
                     "k_kernel": P(None, None, "tensor", None), "down_kernel": P(None, "tensor", None),
                     "lm_head": P(None, "tensor")}


def test_make_mesh_shapes_and_errors():
    assert dict(sharding.make_mesh({"fsdp": -1, "tensor": 2}).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(sharding.MeshError, match="only one mesh axis may be -1"):
        sharding.make_mesh({"fsdp": -1, "tensor": -1})
    with pytest.raises(sharding.MeshError, match="cannot be split"):
        sharding.make_mesh({"fsdp": -1, "tensor": 3})
    with pytest.raises(sharding.MeshError, match="needs 6 devices"):
        sharding.make_mesh({"fsdp": 3, "tensor": 2})
    with pytest.raises(sharding.MeshError, match="positive"):
        sharding.make_mesh({"fsdp": 0})
