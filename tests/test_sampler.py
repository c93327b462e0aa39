"""Sampler against transformers (greedy generate, log-probs, nucleus, frequency penalty), determinism,
stops, errors, compile-once-per-bucket, and outputs independent of the cache length, row blocks,
query chunks and the GPU decode paths."""

import flax.nnx as nnx
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agentflow_jax.models import config as model_config, hf_io, kernels, qwen2
from agentflow_jax.sampling import Sampler, buckets, loop
from hf_reference import make_hf_model

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# Larger init than the default 0.02 so next-token distributions are peaked enough that greedy
# argmax has no near-ties, yet broad enough that top-p keeps several tokens.
INIT_STD = 0.1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [3]]


def _load_pair(tmp_path_factory, name: str, seed: int, tied: bool):
    hf = make_hf_model(seed, init_std=INIT_STD, tie_word_embeddings=tied, **TINY)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, hf_io.load_pretrained(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model) with the same random weights."""
    return _load_pair(tmp_path_factory, "untied", seed=0, tied=False)


@pytest.fixture(scope="module")
def sampler(pair):
    return Sampler(pair[1], max_cache_length=128)


def _hf_logits(hf, sequence: list[int]) -> np.ndarray:
    """[len(sequence), V] float64 logits of an unpadded sequence under transformers."""
    with torch.no_grad():
        return hf(input_ids=torch.tensor([sequence])).logits[0].double().numpy()


def _log_softmax(scaled: np.ndarray) -> np.ndarray:
    peak = scaled.max(-1, keepdims=True)
    return scaled - peak - np.log(np.exp(scaled - peak).sum(-1, keepdims=True))


def _hf_log_softmax(hf, sequence: list[int], temperature: float = 1.0) -> np.ndarray:
    """[len(sequence), V] float64 log_softmax(logits / T) of an unpadded sequence under transformers."""
    return _log_softmax(_hf_logits(hf, sequence) / temperature)


def _hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int) -> np.ndarray:
    """transformers generate(do_sample=False) with left padding: [len(prompts), max_new_tokens]."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_matches_transformers_generate(tmp_path_factory, pair, sampler, tied):
    hf, model = pair if not tied else _load_pair(tmp_path_factory, "tied", seed=1, tied=True)
    ours = (sampler if not tied else Sampler(model, max_cache_length=128)).generate(
        PROMPTS, max_new_tokens=32, temperature=0.0)
    np.testing.assert_array_equal(np.array(ours.tokens), _hf_greedy(hf, PROMPTS, 32))
    assert ours.finish_reason == ["length"] * 3
    for prompt, tokens, log_probs in zip(PROMPTS, ours.tokens, ours.logprobs):
        reference = _hf_log_softmax(hf, prompt + tokens)[len(prompt) - 1:-1]
        np.testing.assert_allclose(log_probs, reference[np.arange(len(tokens)), tokens], atol=1e-4)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_sampled_logprobs_are_full_vocabulary_log_softmax(pair, sampler, temperature, top_p, top_k):
    hf, _ = pair
    out = sampler.generate(PROMPTS[:2], max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k, n=2,
                           seed=3)
    assert len(out.tokens) == 4
    for sample, (tokens, log_probs) in enumerate(zip(out.tokens, out.logprobs)):
        prompt = PROMPTS[sample // 2]
        reference = _hf_log_softmax(hf, prompt + tokens, temperature)[len(prompt) - 1:-1]
        np.testing.assert_allclose(log_probs, reference[np.arange(len(tokens)), tokens], atol=1e-4)
    assert len({tuple(t) for t in out.tokens}) == 4  # sampled, not greedy


def test_group_sampling_is_reproducible_and_seeded(sampler):
    kwargs = dict(max_new_tokens=24, temperature=1.0, n=8)
    first = sampler.generate(PROMPTS[:2], seed=7, **kwargs)
    again = sampler.generate(PROMPTS[:2], seed=7, **kwargs)
    other = sampler.generate(PROMPTS[:2], seed=8, **kwargs)
    assert first == again
    assert first.tokens != other.tokens
    assert len(first.tokens) == 16 and len({tuple(t) for t in first.tokens[:8]}) > 1
    # A sample depends on the seed and its index only, not on the other prompts of the batch.
    alone = sampler.generate(PROMPTS[:1], seed=7, **kwargs)
    assert alone.tokens == first.tokens[:8]
    np.testing.assert_allclose(np.array(alone.logprobs), np.array(first.logprobs[:8]), atol=1e-6)


def test_sample_ids_make_a_sample_independent_of_its_batch(sampler):
    """With stable sample ids, a sample is the same whatever else shares its call (how rollouts split
    over processes), and the default ids are the positions in the call."""
    kwargs = dict(max_new_tokens=16, temperature=1.0, seed=3)
    both = sampler.generate(PROMPTS[:2], n=2, sample_ids=[40, 41, 90, 91], **kwargs)
    second_alone = sampler.generate(PROMPTS[1:2], n=2, sample_ids=[90, 91], **kwargs)
    assert second_alone.tokens == both.tokens[2:]
    np.testing.assert_allclose(np.array(second_alone.logprobs), np.array(both.logprobs[2:]), atol=1e-6)
    assert sampler.generate(PROMPTS[:2], n=2, sample_ids=[0, 1, 2, 3], **kwargs) == \
        sampler.generate(PROMPTS[:2], n=2, **kwargs)
    with pytest.raises(ValueError, match="distinct ids"):
        sampler.generate(PROMPTS[:2], n=2, sample_ids=[1, 1, 2, 3], **kwargs)


def test_max_rows_splits_a_call_into_whole_prompts_with_the_same_samples(pair, sampler, monkeypatch):
    """A sampler whose KV cache holds at most `max_rows` sequences runs a larger call in consecutive
    parts of whole prompts and returns exactly the samples of one call."""
    graphdef, params = nnx.split(pair[1])
    bounded = Sampler.from_state(graphdef, params, max_cache_length=128, max_rows=5)
    calls = []
    prefill = bounded.prefill
    monkeypatch.setattr(bounded, "prefill", lambda prompts, **kw: calls.append(len(prompts)) or prefill(prompts, **kw))
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=4)
    kwargs["stop_token_ids"] = (sampler.generate(PROMPTS, n=2, **kwargs).tokens[0][3],)  # ends row 0 early
    for n, sample_ids, parts in [(2, None, [2, 1]), (2, [9, 8, 70, 71, 30, 31], [2, 1]), (7, None, [1, 1, 1])]:
        calls.clear()
        got = bounded.generate(PROMPTS, n=n, sample_ids=sample_ids, **kwargs)
        expected = sampler.generate(PROMPTS, n=n, sample_ids=sample_ids, **kwargs)
        assert calls == parts, n  # 5 rows: two prompts of 2 samples, or one prompt of 7 (over the bound)
        assert got.tokens == expected.tokens and got.finish_reason == expected.finish_reason
        np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(expected.logprobs), atol=1e-5)
    assert len(got.tokens) == 21 and "stop" in bounded.generate(PROMPTS, n=2, **kwargs).finish_reason
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        Sampler.from_state(graphdef, params, max_cache_length=128, max_rows=0)


def test_greedy_group_samples_equal_single_greedy(sampler):
    single = sampler.generate(PROMPTS[:2], max_new_tokens=20, temperature=0.0)
    group = sampler.generate(PROMPTS[:2], max_new_tokens=20, temperature=0.0, n=8, seed=5)
    assert group.tokens == [single.tokens[0]] * 8 + [single.tokens[1]] * 8
    top_k_one = sampler.generate(PROMPTS[:2], max_new_tokens=20, temperature=0.8, top_k=1, n=8)
    assert top_k_one.tokens == group.tokens


@pytest.mark.parametrize("top_p,top_k", [(0.5, 0), (1.0, 3)])
def test_truncated_sampling_stays_in_the_models_own_kept_set(pair, sampler, top_p, top_k):
    hf, _ = pair
    temperature = 1.0
    out = sampler.generate(PROMPTS[:2], max_new_tokens=20, temperature=temperature, top_p=top_p, top_k=top_k, n=8,
                           seed=11)
    kept_sizes = []
    for sample, tokens in enumerate(out.tokens):
        prompt = PROMPTS[sample // 8]
        log_probs = _hf_log_softmax(hf, prompt + tokens, temperature)[len(prompt) - 1:-1]
        for step, token in enumerate(tokens):
            probs = np.exp(log_probs[step])
            order = np.argsort(-probs)
            kept = order[:top_k] if top_k else order[(np.cumsum(probs[order]) - probs[order]) < top_p + 1e-6]
            assert token in kept, f"sample {sample} step {step}: token {token} outside the kept set {kept}"
            kept_sizes.append(len(kept))
    assert max(kept_sizes) > 1  # the filter had choices to make
    assert len({tuple(t) for t in out.tokens[:8]}) > 1


def test_stop_token_ends_one_row_while_others_continue(sampler):
    free = sampler.generate(PROMPTS, max_new_tokens=30, temperature=0.0)
    # A token that row 0 emits at step >= 2 and rows 1 and 2 never emit.
    others = set(free.tokens[1]) | set(free.tokens[2])
    step, stop = next((i, t) for i, t in enumerate(free.tokens[0]) if i >= 2 and t not in others)
    first = free.tokens[0].index(stop)
    out = sampler.generate(PROMPTS, max_new_tokens=30, temperature=0.0, stop_token_ids=(stop, 255))
    assert out.tokens[0] == free.tokens[0][:first + 1]
    assert out.logprobs[0] == pytest.approx(free.logprobs[0][:first + 1], abs=1e-6)
    assert out.finish_reason == ["stop", "length", "length"]
    assert out.tokens[1:] == free.tokens[1:]


@pytest.mark.parametrize("max_new_tokens", [1, 17])
def test_max_new_tokens_is_honoured(sampler, max_new_tokens):
    out = sampler.generate(PROMPTS, max_new_tokens=max_new_tokens, temperature=1.0, n=2)
    assert [len(t) for t in out.tokens] == [max_new_tokens] * 6
    assert [len(lp) for lp in out.logprobs] == [max_new_tokens] * 6
    assert out.finish_reason == ["length"] * 6


def test_group_prefill_matches_repeated_prompt(sampler):
    group = sampler.generate(PROMPTS[1:2], max_new_tokens=20, temperature=0.0, n=8)
    repeated = sampler.generate(PROMPTS[1:2] * 8, max_new_tokens=20, temperature=0.0)
    assert group.tokens == repeated.tokens
    np.testing.assert_allclose(np.array(group.logprobs), np.array(repeated.logprobs), atol=1e-5)


def test_clear_errors(sampler):
    with pytest.raises(ValueError, match="non-empty list"):
        sampler.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_cache_length"):
        sampler.generate([list(range(200))], max_new_tokens=4)  # longer than the 128-slot cache
    with pytest.raises(ValueError, match="max_cache_length"):
        sampler.generate([list(range(100))], max_new_tokens=40)  # prompt fits, generation does not
    with pytest.raises(ValueError, match="outside"):
        sampler.generate([[1, 256]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate([[1]], top_p=0.0)
    with pytest.raises(ValueError, match="n "):
        sampler.generate([[1]], n=0)


def test_compiles_once_per_bucket_and_swapping_params_reuses_code(tmp_path_factory, pair):
    sampler = Sampler(pair[1], max_cache_length=128)
    kwargs = dict(max_new_tokens=20, temperature=0.7, top_p=0.9, n=4)
    original = sampler.generate([[1, 2, 3]], stop_token_ids=(7,), **kwargs)
    assert dict(sampler.trace_counts) == {"prefill": 1, "decode": 1}
    _, other_model = _load_pair(tmp_path_factory, "other", seed=2, tied=False)
    compiles = []

    def count(event: str, duration: float, **unused) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        # Same buckets (prompt <= 16, new tokens <= 32, 1 prompt x 4): other values, seeds, stops.
        for prompt, new_tokens, temperature, top_p, seed in [([9] * 16, 32, 1.0, 0.5, 1), ([4, 5], 17, 0.3, 0.99, 2)]:
            sampler.generate([prompt], max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, n=4,
                             stop_token_ids=(3, 4), seed=seed)
        other_sampler = sampler.with_params(other_model)
        from_other = other_sampler.generate([[1, 2, 3]], stop_token_ids=(7,), **kwargs)
        sampler.update_params(other_model)
        swapped = sampler.generate([[1, 2, 3]], stop_token_ids=(7,), **kwargs)
        swapped_back = other_sampler.with_params(pair[1]).generate([[1, 2, 3]], stop_token_ids=(7,), **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert dict(sampler.trace_counts) == {"prefill": 1, "decode": 1}
    assert compiles == []
    fresh = Sampler(other_model, max_cache_length=128).generate([[1, 2, 3]], stop_token_ids=(7,), **kwargs)
    assert swapped == from_other == fresh != original
    assert swapped_back == original
    sampler.generate([[1] * 17], **kwargs)  # the next prompt bucket compiles once more
    assert dict(sampler.trace_counts) == {"prefill": 2, "decode": 2}


def _greedy_with_full_cache(model, prompts: list[list[int]], max_new_tokens: int, cache_length: int):
    """Reference greedy decode: prompts left-padded to the longest one (no bucket), one cache of
    `cache_length` slots, the generic `forward_with_cache` step by step. ([B, N] tokens, log-probs)."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, True
    logits, cache = model.forward_with_cache(jnp.asarray(ids), jnp.asarray(mask),
                                             model.init_cache(len(prompts), cache_length))
    tokens, log_probs = [], []
    for _ in range(max_new_tokens):
        step = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
        token = jnp.argmax(step, axis=-1)
        tokens.append(np.asarray(token))
        log_probs.append(np.asarray(jnp.take_along_axis(step, token[:, None], axis=-1)[:, 0]))
        logits, cache = model.forward_with_cache(token[:, None].astype(jnp.int32), None, cache)
    return np.stack(tokens, 1), np.stack(log_probs, 1)


def test_bucketed_cache_matches_a_full_length_cache_and_compiles_once_per_bucket(pair):
    _, model = pair
    sampler = Sampler(model, max_cache_length=128)
    prompts = [PROMPTS[0], list(range(1, 21)), PROMPTS[2]]  # longest 20 -> prompt bucket 32
    out = sampler.generate(prompts, max_new_tokens=20, temperature=0.0)  # capacity 32: a 64-slot cache
    tokens, log_probs = _greedy_with_full_cache(model, prompts, 20, cache_length=128)
    np.testing.assert_array_equal(np.array(out.tokens), tokens)
    np.testing.assert_allclose(np.array(out.logprobs), log_probs, atol=1e-5)
    assert dict(sampler.trace_counts) == {"prefill": 1, "decode": 1}
    # Prompts of 17-32 tokens share the bucket, 33-48 the next one (not 64); 17-32 new tokens likewise.
    for length, new_tokens in [(32, 32), (17, 17), (33, 20), (48, 20)]:
        sampler.generate([[2] * length] * 3, max_new_tokens=new_tokens, temperature=0.0)
        assert dict(sampler.trace_counts) == {"prefill": 1 + (length > 32), "decode": 1 + (length > 32)}


def test_row_blocks_and_query_chunks_leave_outputs_unchanged(pair, monkeypatch):
    _, model = pair
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + 5 * i)] for i in range(6)]  # 3..28 tokens: bucket 32
    calls = [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, n=2, seed=5)]
    monkeypatch.setattr(buckets, "PREFILL_QUERY_CHUNK", 1 << 30)
    whole = Sampler(model, max_cache_length=128, row_blocks=False)
    expected = [whole.generate(prompts, max_new_tokens=20, stop_token_ids=(7,), **kw) for kw in calls]

    seen = []  # (arrays passed, rows, rows per block) of every blocked program traced

    def recording(fn, args, in_axes, out_axes, rows_per_block):
        seen.append((len(args), args[0].shape[in_axes[0]], rows_per_block))
        return original(fn, args, in_axes, out_axes, rows_per_block)

    original = loop.map_row_blocks
    monkeypatch.setattr(loop, "map_row_blocks", recording)
    monkeypatch.setattr(buckets, "PREFILL_QUERY_CHUNK", 12)  # chunks of 12, 12 and 8 queries
    monkeypatch.setattr(buckets, "PREFILL_BLOCK_TOKENS", 64)  # two 32-token prompts per prefill block
    # Weights plus the KV cache of 4 rows (k and v, 2 layers, 2 KV heads, 64 slots, head dim 16, float32).
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    monkeypatch.setattr(buckets, "DECODE_BLOCK_BYTES", param_bytes + 4 * 2 * 2 * 2 * 64 * 16 * 4)
    blocked = Sampler(model, max_cache_length=128, row_blocks=True)
    for kw, want in zip(calls, expected):
        got = blocked.generate(prompts, max_new_tokens=20, stop_token_ids=(7,), **kw)
        assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
        for got_row, want_row in zip(got.logprobs, want.logprobs):
            np.testing.assert_allclose(got_row, want_row, atol=1e-5)
    assert seen == [(2, 8, 2), (7, 8, 4), (2, 8, 2), (7, 16, 4)]  # greedy; then n = 2: 16 decode rows
    blocked.generate([p[::-1] for p in prompts], max_new_tokens=20, stop_token_ids=(7,), **calls[1])
    assert dict(blocked.trace_counts) == {"prefill": 2, "decode": 2}


def test_map_row_blocks_keeps_row_order_and_axes():
    x = np.arange(8 * 3).reshape(8, 3)
    y = np.arange(2 * 8).reshape(2, 8)
    block_rows = []

    def fn(a, b):
        block_rows.append(a.shape[0])
        return a * 10, b + 1, a.sum()

    a, b, total = loop.map_row_blocks(fn, (x, y), (0, 1), (0, 1, None), rows_per_block=2)
    assert block_rows == [2]
    np.testing.assert_array_equal(a, x * 10)
    np.testing.assert_array_equal(b, y + 1)
    # Block j holds rows j, j + 4 (strided, so a batch-sharded block spans every shard).
    np.testing.assert_array_equal(total, [x[[j, j + 4]].sum() for j in range(4)])
    whole = loop.map_row_blocks(fn, (x, y), (0, 1), (0, 1, None), rows_per_block=8)
    np.testing.assert_array_equal(whole[2], [x.sum()])


def test_update_params_rejects_other_shapes(sampler):
    other = qwen2.abstract_model(model_config.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64,
                                                   num_layers=2, num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="shapes"):
        sampler.update_params(other)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 0.95)])
def test_frequency_penalty_logprobs_are_the_penalised_distribution(pair, sampler, temperature, top_p):
    """Recomputed independently: transformers' logits, minus penalty x earlier occurrences, over T."""
    hf, _ = pair
    penalty = 1.5
    kwargs = dict(max_new_tokens=24, temperature=temperature, top_p=top_p, n=2, seed=4)
    out = sampler.generate(PROMPTS[:2], frequency_penalty=penalty, **kwargs)
    for sample, (tokens, log_probs) in enumerate(zip(out.tokens, out.logprobs)):
        prompt = PROMPTS[sample // 2]
        logits = _hf_logits(hf, prompt + tokens)[len(prompt) - 1:-1]  # before each generated token
        counts, expected = np.zeros(logits.shape[1]), []
        for step, token in enumerate(tokens):
            penalised = logits[step] - penalty * counts
            if temperature == 0:
                assert token == penalised.argmax(), f"sample {sample} step {step}"
            expected.append(_log_softmax(penalised / (temperature or 1.0))[token])
            counts[token] += 1
        np.testing.assert_allclose(log_probs, expected, atol=1e-4)
    assert out.tokens != sampler.generate(PROMPTS[:2], **kwargs).tokens  # the penalty changed the samples


def test_zero_frequency_penalty_is_todays_sampler(sampler):
    kwargs = dict(max_new_tokens=17, temperature=1.0, n=2, seed=6)  # the shapes of test_max_new_tokens_is_honoured
    before = sampler.trace_counts["decode"]
    assert sampler.generate(PROMPTS, frequency_penalty=0.0, **kwargs) == sampler.generate(PROMPTS, **kwargs)
    assert sampler.trace_counts["decode"] <= before + 1  # one program for both calls


GPU_PATHS = {
    "unrolled_masked": kernels.Kernels(decode_layers="unrolled", decode_attention="masked"),
    "fused_prefill_unrolled_ragged": kernels.Kernels(sequence_attention="xla", decode_layers="unrolled",
                                                     decode_attention="ragged", interpret=True),
}


@pytest.mark.parametrize("name", sorted(GPU_PATHS))
def test_gpu_decode_paths_equal_the_scan_decode(pair, sampler, name):
    """The GPU paths (here on CPU) give the current decode's tokens, token for token."""
    other = Sampler(pair[1], max_cache_length=128, kernels=GPU_PATHS[name])
    assert other.kernels == GPU_PATHS[name] and sampler.kernels == kernels.PORTABLE
    prompts = [PROMPTS[0], list(range(1, 21)), PROMPTS[2]]  # left padding of 27, 12 and 31 slots
    kwargs = dict(max_new_tokens=20, temperature=0.8, top_p=0.9, n=2, seed=3, frequency_penalty=1.2,
                  stop_token_ids=(7,))
    want, got = sampler.generate(prompts, **kwargs), other.generate(prompts, **kwargs)
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    for got_row, want_row in zip(got.logprobs, want.logprobs):
        np.testing.assert_allclose(got_row, want_row, atol=1e-5)


def test_decode_of_a_prefill_with_room_equals_generate(sampler):
    prefilled = sampler.prefill(PROMPTS, n=2, max_new_tokens=40)  # 48 slots of room, 20 used
    assert prefilled.capacity == 48
    decoded = sampler.decode(prefilled, max_new_tokens=20, temperature=0.7, seed=9)
    generated = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.7, n=2, seed=9)  # 32 slots of room
    assert decoded.tokens == generated.tokens and len(decoded.tokens) == 6
    np.testing.assert_allclose(np.array(decoded.logprobs), np.array(generated.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        sampler.decode(sampler.prefill(PROMPTS, max_new_tokens=8), max_new_tokens=20)
