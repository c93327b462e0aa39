"""Sampling rules and index drawing against numpy reference implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentflow_jax.sampling import buckets, draw, rules


def _numpy_kept(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """transformers' warper order with a full sort: temperature -> top-k -> top-p (float64)."""
    scaled = logits.astype(np.float64) / temperature
    kept = np.ones_like(scaled, bool)
    for row, values in enumerate(scaled):
        order = np.argsort(-values, kind="stable")
        if top_k:
            kth = values[order[top_k - 1]]
            kept[row] = values >= kth
        probs = np.where(kept[row], np.exp(values - values.max()), 0.0)
        probs /= probs.sum()
        mass_before = np.cumsum(probs[order]) - probs[order]
        in_nucleus = np.zeros_like(kept[row])
        in_nucleus[order] = mass_before < top_p
        kept[row] &= in_nucleus
    return kept


@pytest.mark.parametrize("scale,temperature,top_p,top_k", [
    (3.0, 1.0, 0.5, 0), (3.0, 0.7, 0.9, 0), (3.0, 1.0, 1.0, 7), (3.0, 1.3, 0.8, 12),  # thresholds among the top 64
    (0.3, 1.0, 0.9, 0), (0.3, 1.0, 1.0, 100), (0.3, 1.0, 0.5, 80),  # beyond them: bisection over the vocabulary
    ("mixed", 1.0, 0.9, 0),  # some rows peaked, some flat
])
def test_kept_tokens_match_sorted_reference(scale, temperature, top_p, top_k):
    logits = np.random.RandomState(0).normal(size=(16, 1000)).astype(np.float32)
    logits *= np.where(np.arange(16) < 8, 3.0, 0.3)[:, None] if scale == "mixed" else scale
    rule = rules.sampling_rule(temperature, top_p, top_k)
    relative = jnp.asarray(logits) / rule.temperature
    relative = relative - relative.max(axis=-1, keepdims=True)
    kept = np.asarray(rules.truncated_weights(relative, jnp.exp(relative), rule)) > 0
    expected = _numpy_kept(logits, temperature, top_p, top_k)
    np.testing.assert_array_equal(kept, expected)
    # Both ways of finding a threshold are covered: the k-th / nucleus end lies beyond the candidates.
    beyond_candidates = max(expected.sum(axis=-1).max(), top_k) > rules.CANDIDATES
    assert beyond_candidates == (scale != 3.0)


def test_order_keys_preserve_float_order():
    values = np.array([-np.inf, -1e30, -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, np.inf], np.float32)
    keys = np.asarray(rules.order_keys(jnp.asarray(values)))
    assert np.all(np.diff(keys[[0, 1, 2, 3, 5, 6, 7, 8]]) > 0)


def test_first_argmax_matches_numpy_including_ties():
    rng = np.random.RandomState(1)
    x = rng.randint(0, 5, size=(64, 1000)).astype(np.float32)  # many ties
    x[3, 999] = 10.0  # maximum in the last (partial) block
    np.testing.assert_array_equal(np.asarray(draw.first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_sample_proportional_follows_weights_and_skips_zeros():
    rng = np.random.RandomState(2)
    weights = rng.uniform(size=300).astype(np.float32)  # 2 blocks, the second one partial
    weights[rng.uniform(size=300) < 0.5] = 0.0
    weights[-1] = 0.0
    rows = 20_000
    uniforms = jax.random.uniform(jax.random.key(0), (rows,))
    drawn = np.asarray(draw.sample_proportional(jnp.broadcast_to(jnp.asarray(weights), (rows, 300)), uniforms))
    counts = np.bincount(drawn, minlength=300)
    assert counts[weights == 0].sum() == 0
    expected = rows * weights / weights.sum()
    # Poisson tolerance of 5 standard deviations per entry.
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1)
    edge = draw.sample_proportional(jnp.asarray(np.stack([weights, weights])), jnp.asarray([0.0, 1.0 - 2**-24]))
    assert weights[np.asarray(edge)].min() > 0


def test_greedy_rule_and_logprobs_match_numpy():
    logits = np.random.RandomState(3).normal(size=(4, 300)).astype(np.float32)
    tokens, log_probs = rules.choose_tokens(jnp.asarray(logits), rules.sampling_rule(0.0), jnp.zeros(4))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    reference = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(log_probs), reference[np.arange(4), logits.argmax(-1)], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_frequency_penalty_logprobs_match_numpy(temperature):
    rng = np.random.RandomState(4)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    counts = rng.poisson(0.05, size=(6, 300)).astype(np.int32)  # a few generated tokens, some repeated
    counts[:, logits.argmax(-1)[0]] += 2
    rule = rules.sampling_rule(temperature, frequency_penalty=0.6)
    uniforms = jax.random.uniform(jax.random.key(1), (6,))
    tokens, log_probs = map(np.asarray, rules.choose_tokens(jnp.asarray(logits), rule, uniforms, jnp.asarray(counts)))
    penalised = logits.astype(np.float64) - 0.6 * counts
    scaled = penalised / (temperature or 1.0)
    reference = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) - scaled.max(
        -1, keepdims=True)
    np.testing.assert_allclose(log_probs, reference[np.arange(6), tokens], atol=1e-5)
    if temperature == 0:
        np.testing.assert_array_equal(tokens, penalised.argmax(-1))


def test_frequency_penalty_lowers_a_repeated_tokens_probability():
    logits = np.random.RandomState(5).normal(size=(3, 300)).astype(np.float32)
    logits[:, 42] = logits.max(-1) + 2.0  # token 42 stays the argmax under a penalty of 0.5 per use
    greedy = rules.sampling_rule(0.0, frequency_penalty=0.5)
    fresh = np.zeros((3, 300), np.int32)
    repeated = fresh.copy()
    repeated[:, 42] = [1, 2, 3]
    (tokens_fresh, lp_fresh), (tokens_repeated, lp_repeated) = [
        tuple(map(np.asarray, rules.choose_tokens(jnp.asarray(logits), greedy, jnp.zeros(3), jnp.asarray(c))))
        for c in (fresh, repeated)]
    assert list(tokens_fresh) == list(tokens_repeated) == [42] * 3
    assert np.all(lp_repeated < lp_fresh) and np.all(np.diff(lp_repeated) < 0)  # lower with every repeat
    no_penalty = rules.choose_tokens(jnp.asarray(logits), rules.sampling_rule(0.0), jnp.zeros(3))[1]
    np.testing.assert_array_equal(np.asarray(no_penalty), lp_fresh)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=1.0, top_p=0.0),
                                    dict(temperature=1.0, top_p=1.5), dict(temperature=1.0, top_k=-1),
                                    dict(temperature=float("nan")),
                                    dict(temperature=1.0, frequency_penalty=float("inf"))])
def test_invalid_rules_are_rejected(kwargs):
    with pytest.raises(ValueError):
        rules.sampling_rule(**kwargs)


def test_buckets():
    lengths = (1, 16, 17, 33, 64, 65, 177, 293, 1024, 1025, 4097)
    assert [buckets.length_bucket(n) for n in lengths] == [16, 16, 32, 48, 64, 80, 192, 320, 1024, 1280, 5120]
    # Four buckets per doubling: padding under max(16, 25%), the number of buckets grows with log(length).
    assert all(0 <= buckets.length_bucket(n) - n < max(16, n / 4) for n in range(1, 5000))
    assert len({buckets.length_bucket(n) for n in range(1, 4097)}) == 1 + 1 + 2 + 4 * 6
    assert [buckets.batch_bucket(n) for n in (1, 2, 3, 9)] == [1, 2, 4, 16]
    assert buckets.batch_bucket(3, multiple_of=8) == 8
    assert buckets.cache_layout(20, 40, 4096) == (32, 48)
    assert buckets.cache_layout(100, 20, 128) == (108, 20)  # prompt bucket shrinks near the limit
    with pytest.raises(ValueError, match="max_cache_length"):
        buckets.cache_layout(100, 29, 128)


def test_rows_per_block():
    assert buckets.rows_per_block(64, row_cost=512, budget=2048) == 4
    assert buckets.rows_per_block(64, row_cost=100, budget=10**9) == 64
    assert buckets.rows_per_block(64, row_cost=2049, budget=2048) is None
    assert buckets.rows_per_block(24, row_cost=1, budget=10) == 8  # largest divisor within the budget
    assert buckets.rows_per_block(64, row_cost=1, budget=4, multiple_of=8) is None
    assert buckets.rows_per_block(64, row_cost=1, budget=20, multiple_of=8) == 16
    with pytest.raises(ValueError, match="multiple"):
        buckets.rows_per_block(12, row_cost=1, budget=4, multiple_of=8)
