"""Qwen2 config presets, parameter metadata, remat, and input validation."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from agentflow_jax.models import config as model_config, qwen2

# Hugging Face Qwen2.5 config.json values (model cards / published configs).
HF_PRESET_CONFIGS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, tie_word_embeddings=False, vocab_size=152064),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, tie_word_embeddings=False, vocab_size=152064),
}


@pytest.mark.parametrize("name", sorted(HF_PRESET_CONFIGS))
def test_presets_match_hf_configs_and_parameter_counts(name):
    hf_config = transformers.Qwen2Config(rope_theta=1_000_000.0, rms_norm_eps=1e-6, **HF_PRESET_CONFIGS[name])
    ours = model_config.preset(name)
    assert model_config.from_hf_config(hf_config.to_dict()) == ours
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in transformers.Qwen2ForCausalLM(hf_config).parameters())
    abstract = jax.eval_shape(lambda: nnx.state(qwen2.init_random(ours), nnx.Param))
    our_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert our_count == hf_count == ours.num_params


def test_published_parameter_counts():
    assert model_config.preset("Qwen2.5-7B-Instruct").num_params == 7_615_616_512
    assert model_config.preset("qwen2.5-0.5b").num_params == 494_032_768


def test_unknown_preset():
    with pytest.raises(KeyError, match="available"):
        model_config.preset("qwen2.5-9b")


def test_from_hf_config_reads_both_rope_spellings():
    base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    assert model_config.from_hf_config(dict(base, rope_theta=123.0)).rope_theta == 123.0
    assert model_config.from_hf_config(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 77.0})).rope_theta == 77.0
    with pytest.raises(ValueError, match="rope scaling"):
        model_config.from_hf_config(dict(base, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        model_config.from_hf_config(dict(base, use_sliding_window=True))
    with pytest.raises(ValueError, match="lacks required keys"):
        model_config.from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"})


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        model_config.Qwen2Config(vocab_size=10, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)


TINY = model_config.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=False)


def test_every_parameter_has_logical_axes_of_its_rank():
    model = qwen2.init_random(TINY)
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.logical_axes
        assert len(axes) == var.get_value().ndim, path
        assert ("layers" in axes) == (path[0] == "layers"), path
        if path[0] == "layers":
            assert axes[0] == "layers" and var.get_value().shape[0] == TINY.num_layers
        seen += 1
    assert seen == 2 + 12 + 1  # embed, final norm, lm head + 12 stacked layer tensors


def test_remat_gives_identical_gradients():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)

    def grads(remat):
        model = qwen2.init_random(TINY, remat=remat)
        graphdef, params = nnx.split(model)

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids))[..., 0])

        return jax.grad(loss)(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bfloat16_params_and_float32_logits():
    model = qwen2.init_random(TINY, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model(jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32


def test_bad_inputs_are_clear_errors():
    model = qwen2.init_random(TINY)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        model(jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.zeros((1, 3), jnp.int32), attention_mask=jnp.ones((1, 4)))


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_swiglu_values_and_gradients_equal_autodiff_of_the_formula(dtype, atol):
    """The MLP's own VJP against JAX differentiating down(silu(x @ gate) * (x @ up)) in float32."""
    rng = np.random.default_rng(0)
    x, gate, up, down = (jnp.asarray(rng.normal(size=shape) * scale, jnp.float32) for shape, scale in
                         (((2, 5, 6), 1.0), ((6, 7), 0.5), ((6, 7), 0.5), ((7, 6), 0.5)))
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)

    def formula(x, gate, up, down):
        return (jax.nn.silu(x @ gate) * (x @ up)) @ down

    def ours(x, gate, up, down):
        return qwen2.swiglu(*(a.astype(dtype) for a in (x, gate, up, down))).astype(jnp.float32)

    rounded = [a.astype(dtype).astype(jnp.float32) for a in (x, gate, up, down)]
    np.testing.assert_allclose(ours(x, gate, up, down), formula(*rounded), atol=atol, rtol=atol)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent), argnums=(0, 1, 2, 3))(x, gate, up, down)
    expected = jax.grad(lambda *a: jnp.sum(formula(*a) * cotangent), argnums=(0, 1, 2, 3))(*rounded)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=atol * 4, rtol=atol)
