"""Logit parity of our Qwen2 against transformers' Qwen2ForCausalLM (PyTorch CPU, random weights), on
the portable paths and on the GPU paths of `models.kernels` run on CPU (XLA in place of cuDNN, the
Pallas decode kernel interpreted)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from agentflow_jax.models import hf_io, kernels, qwen2
from hf_reference import hf_logits, make_hf_model, padded_batch

# Four shapes: tied / untied head, GQA ratios 1, 2 and 4, default and non-default rope theta,
# odd vocabulary, explicit head_dim different from hidden/heads.
CONFIGS = {
    "untied_gqa2_theta1e4": dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                                 tie_word_embeddings=False),
    "tied_mha": dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True),
    "untied_gqa4_theta1e6": dict(vocab_size=203, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, rope_theta=1_000_000.0,
                                 tie_word_embeddings=False),
    "tied_gqa2_headdim": dict(vocab_size=150, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500.0,
                              tie_word_embeddings=True),
}

# Mixed padding in one batch: left-padded, right-padded, unpadded, single real token.
ROWS = [(7, "left"), (9, "right"), (12, "none"), (1, "left"), (12, "none")]
WIDTH = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    model = make_hf_model(seed=len(request.param), **kwargs)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path, kwargs


def log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _real(mask):
    return mask.astype(bool)


@pytest.mark.parametrize("sequence_attention", ["tiled", "xla"])
def test_float32_logits_match_transformers(hf_checkpoint, sequence_attention):
    hf, path, kwargs = hf_checkpoint
    ids, mask = padded_batch(np.random.RandomState(0), kwargs["vocab_size"], ROWS, WIDTH)
    ref = hf_logits(hf, ids, mask)
    model = hf_io.load_pretrained(path)
    model.kernels = kernels.Kernels(sequence_attention=sequence_attention)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.abs(ours - ref)[_real(mask)]
    assert diff.max() <= 1e-4, f"max abs logit diff {diff.max()}"


def test_left_padding_equals_unpadded(hf_checkpoint):
    """A left-padded row gives the same logits as the same tokens alone (positions skip padding)."""
    _, path, kwargs = hf_checkpoint
    model = hf_io.load_pretrained(path)
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, kwargs["vocab_size"], size=(1, 6))
    padded = np.concatenate([np.zeros((1, 4), np.int64), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 4)), np.ones((1, 6))], axis=1)
    alone = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    left = np.asarray(model(jnp.asarray(padded, jnp.int32), attention_mask=jnp.asarray(mask)))[:, 4:]
    np.testing.assert_allclose(left, alone, atol=1e-5)


def test_bfloat16_kl_to_transformers(hf_checkpoint):
    hf32, path, kwargs = hf_checkpoint
    hf16 = make_hf_model(seed=0, **kwargs)
    hf16.load_state_dict(hf32.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    ids, mask = padded_batch(np.random.RandomState(2), kwargs["vocab_size"], ROWS, WIDTH)
    ref = hf_logits(hf16, ids, mask)[_real(mask)].astype(np.float64)
    model = hf_io.load_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert ours.dtype == np.float32
    ours = ours[_real(mask)].astype(np.float64)
    p_log, q_log = log_softmax(ref, axis=-1), log_softmax(ours, axis=-1)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1).mean()
    assert kl <= 1e-3, f"mean KL(HF || ours) = {kl}"


@pytest.mark.parametrize("prefill", ["generic", "prefill_cache", "prefill_cache_chunked"])
def test_cached_prefill_and_decode_match_transformers(hf_checkpoint, prefill):
    """Prefill a left-padded prompt, then decode token by token: logits equal HF's full forward."""
    hf, path, kwargs = hf_checkpoint
    model = hf_io.load_pretrained(path)
    ids, mask = padded_batch(np.random.RandomState(3), kwargs["vocab_size"], [(5, "left"), (8, "none")], 8)
    extra = np.random.RandomState(4).randint(0, kwargs["vocab_size"], size=(2, 4))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    ref = hf_logits(hf, full_ids, full_mask)

    if prefill == "generic":
        cache = model.init_cache(2, 16)
        logits, cache = model.forward_with_cache(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), cache)
    else:  # the sampler's prefill: attention over the prompt only (in chunks of 3, 3, 2 queries), 16 slots
        tiles = (3, None) if prefill == "prefill_cache_chunked" else (None, None)
        hidden, cache = model.prefill_cache(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), 16, tiles=tiles)
        logits = model.logits_from_hidden(hidden)
        assert cache.max_length == 16
    steps = [np.asarray(logits)]
    for t in range(extra.shape[1]):
        logits, cache = model.forward_with_cache(jnp.asarray(extra[:, t:t + 1], jnp.int32), None, cache)
        steps.append(np.asarray(logits))
    ours = np.concatenate(steps, axis=1)
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.next_position), full_mask.sum(1))
    diff = np.abs(ours - ref)[_real(full_mask)]
    assert diff.max() <= 1e-4


def test_unrolled_decode_matches_transformers(hf_checkpoint):
    """The GPU decode step (unrolled layers, per-layer cache, the ragged attention kernel) after a
    prefill gives HF's full-forward logits (the masked attention variant: test_kernels.py)."""
    hf, path, kwargs = hf_checkpoint
    model = hf_io.load_pretrained(path)
    ids, mask = padded_batch(np.random.RandomState(3), kwargs["vocab_size"], [(5, "left"), (8, "none")], 8)
    extra = np.random.RandomState(4).randint(0, kwargs["vocab_size"], size=(2, 4))
    ref = hf_logits(hf, np.concatenate([ids, extra], axis=1), np.concatenate([mask, np.ones_like(extra)], axis=1))
    hidden, cache = model.prefill_cache(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), 16)
    steps = [np.asarray(model.logits_from_hidden(hidden))]
    step_kernels = kernels.Kernels(decode_layers="unrolled", decode_attention="ragged", interpret=True)
    layers, layered = model.packed_layers(), qwen2.LayerwiseKVCache.from_stacked(cache)
    first_slot = jnp.argmax(cache.valid, axis=1).astype(jnp.int32)
    decode_step = jax.jit(functools.partial(model.decode_step, kernels=step_kernels))
    for t in range(extra.shape[1]):
        logits, layered = decode_step(layers, jnp.asarray(extra[:, t], jnp.int32), layered, first_slot)
        steps.append(np.asarray(logits)[:, None])
    ours = np.concatenate(steps, axis=1)
    real = _real(np.concatenate([mask, np.ones_like(extra)], axis=1))
    assert int(layered.index) == 12
    assert np.abs(ours - ref)[real].max() <= 1e-4
