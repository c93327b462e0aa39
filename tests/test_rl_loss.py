"""Flow-GRPO batch packing, chunked log-probs and policy loss against independent loop references."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentflow_jax.models import config as model_config
from agentflow_jax.models import qwen2
from agentflow_jax.rl import advantages, logprobs, loss
from agentflow_jax.rl import batch as batch_lib
from agentflow_jax.rl.batch import TurnRecord

AGGREGATIONS = ["token-mean", "flow", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# ----------------------------------------------------------------------------- references (plain Python)


def row_advantages(batch):
    """GRPO advantages of a packed batch's real rows (trajectory grouping), 0 on padding rows."""
    real = batch.row_is_real
    out = np.zeros(batch.num_rows, np.float32)
    out[real] = advantages.compute_advantages(batch.reward[real], batch.query_id[real], batch.trajectory_id[real])
    return out


def reference_pg(logp: float, old: float, advantage: float, config: loss.LossConfig) -> float:
    """Clipped surrogate loss of one token, by cases on the sign of the advantage."""
    log_ratio = min(max(logp - old, -config.log_ratio_clamp), config.log_ratio_clamp)
    ratio = math.exp(log_ratio)
    if advantage > 0:  # gains stop once the ratio passes 1 + clip_high
        return -advantage * min(ratio, 1 + config.clip_high)
    if advantage < 0:  # penalties stop below 1 - clip_low, and are capped at |A| * c by the dual clip
        value = -advantage * max(ratio, 1 - config.clip_low)
        return value if config.dual_clip is None else min(value, -advantage * config.dual_clip)
    return 0.0


def reference_kl(logp: float, ref: float, config: loss.LossConfig) -> float:
    diff = min(max(logp - ref, -config.log_ratio_clamp), config.log_ratio_clamp)
    if config.kl_estimator == "k1":
        return diff
    if config.kl_estimator == "k2":
        return diff * diff / 2
    k3 = math.exp(-diff) - (-diff) - 1  # exp(ref - logp) - (ref - logp) - 1
    return min(max(k3, -config.k3_value_clamp), config.k3_value_clamp)


def reference_token_losses(b, logp, entropy, old, ref, adv, config) -> dict[int, list[float]]:
    """row -> per-token losses over that row's loss-mask positions (rows without tokens omitted)."""
    per_row = {}
    for row in range(b.num_rows):
        values = []
        for t in range(b.length):
            if b.loss_mask[row, t] == 0:
                continue
            value = reference_pg(float(logp[row, t]), float(old[row, t]), float(adv[row]), config)
            value -= config.entropy_coef * float(entropy[row, t])
            if config.kl_coef > 0 and not config.kl_in_reward:
                value += config.kl_coef * reference_kl(float(logp[row, t]), float(ref[row, t]), config)
            values.append(value)
        if values:
            per_row[row] = values
    return per_row


def reference_aggregate(per_row: dict[int, list[float]], trajectory_of_row, mode: str, norm_length: int) -> float:
    """The aggregation modes as plain nested means (never as weights)."""
    if mode == "token-mean":
        return sum(sum(v) for v in per_row.values()) / sum(len(v) for v in per_row.values())
    if mode == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in per_row.values()) / len(per_row)
    if mode == "seq-mean-token-sum":
        return sum(sum(v) for v in per_row.values()) / len(per_row)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(v) for v in per_row.values()) / (len(per_row) * norm_length)
    turn_means_of = {}  # "flow": trajectory -> its turns' token means
    for row, values in per_row.items():
        turn_means_of.setdefault(int(trajectory_of_row[row]), []).append(sum(values) / len(values))
    return sum(sum(m) / len(m) for m in turn_means_of.values()) / len(turn_means_of)


# ----------------------------------------------------------------------------- fixtures


def random_records(seed: int, vocab: int = 64) -> list[TurnRecord]:
    """Two queries x three trajectories of 1-3 planner calls, mixed prompt/response lengths, ids 1..vocab-1."""
    rng = np.random.default_rng(seed)
    records, trajectory = [], 100
    for query in range(2):
        for sample in range(3):
            reward = float((query + sample) % 2)
            for _ in range(1 + (query + 2 * sample) % 3):
                prompt = rng.integers(1, vocab, rng.integers(2, 8)).tolist()
                response = rng.integers(1, vocab, rng.integers(1, 6)).tolist()
                logps = (-rng.random(len(response)) * 3).tolist()
                records.append(TurnRecord(query, trajectory, tuple(prompt), tuple(response), tuple(logps), reward))
            trajectory += 1
    return records


# ----------------------------------------------------------------------------- batch packing


def test_pack_turns_layout():
    records = [TurnRecord(0, 7, (5, 6, 7), (8, 9), (-0.1, -0.2), 1.0),
               TurnRecord(0, 8, (5,), (10, 11, 12), (-1.0, -2.0, -3.0), 0.0),
               TurnRecord(0, 7, (5, 6), (13,), (-0.3,), 1.0)]
    b = batch_lib.pack_turns(records, pad_id=0, length_bucket=4, row_bucket=2)
    assert (b.num_rows, b.length) == (4, 8)  # 3 rows -> 4; longest row 5 tokens -> 8
    np.testing.assert_array_equal(b.input_ids, [[5, 6, 7, 8, 9, 0, 0, 0], [5, 10, 11, 12, 0, 0, 0, 0],
                                                [5, 6, 13, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(b.attention_mask, [[1] * 5 + [0] * 3, [1] * 4 + [0] * 4, [1] * 3 + [0] * 5, [0] * 8])
    np.testing.assert_array_equal(b.targets, [[6, 7, 8, 9, 0, 0, 0, 0], [10, 11, 12, 0, 0, 0, 0, 0],
                                              [6, 13, 0, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                                                [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_allclose(b.sampler_logprobs[0], [0, 0, -0.1, -0.2, 0, 0, 0, 0])
    np.testing.assert_allclose(b.sampler_logprobs[1], [-1, -2, -3, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(b.sampler_logprobs[2], [0, -0.3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.trajectory_id, [7, 8, 7, -1])
    np.testing.assert_array_equal(b.turns_in_trajectory, [2, 1, 2, 0])
    np.testing.assert_array_equal(b.reward, [1, 0, 1, 0])
    np.testing.assert_array_equal(b.row_is_real, [True, True, True, False])
    # Every loss position's target is exactly a response token.
    for row, record in enumerate(records):
        assert b.targets[row][b.loss_mask[row] == 1].tolist() == list(record.response_ids)


@pytest.mark.parametrize("record, message", [
    (TurnRecord(0, 1, (1, 2), (), (), 1.0), "empty response"),
    (TurnRecord(0, 1, (), (3,), (-1.0,), 1.0), "empty prompt"),
    (TurnRecord(0, 1, (1, 2), (3, 4), (-1.0,), 1.0), "1 sampler log-probs for 2 response tokens"),
])
def test_pack_turns_rejects_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        batch_lib.pack_turns([record], pad_id=0)


def test_pack_turns_rejects_inconsistent_trajectories():
    good = TurnRecord(0, 1, (1,), (2,), (-1.0,), 1.0)
    with pytest.raises(ValueError, match="rewards"):
        batch_lib.pack_turns([good, TurnRecord(0, 1, (1,), (2,), (-1.0,), 0.0)], pad_id=0)
    with pytest.raises(ValueError, match="unique over the batch"):
        batch_lib.pack_turns([good, TurnRecord(1, 1, (1,), (2,), (-1.0,), 1.0)], pad_id=0)
    with pytest.raises(ValueError, match="at least one"):
        batch_lib.pack_turns([], pad_id=0)


def test_microbatches_are_consecutive_row_slices():
    b = batch_lib.pack_turns(random_records(0), pad_id=0, length_bucket=4, row_bucket=3)
    stacked = batch_lib.stack_microbatches(b, 3)
    parts = [batch_lib.microbatch(stacked, i) for i in range(3)]
    assert all(p.num_rows == b.num_rows // 3 for p in parts)
    for field in ("input_ids", "loss_mask", "trajectory_id", "row_is_real"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(b, field))
    with pytest.raises(ValueError, match="row_bucket"):
        batch_lib.stack_microbatches(b, b.num_rows + 1)


def test_pack_turns_with_agreed_sizes_and_whole_step_turn_counts():
    """Explicit sizes (what every process of a run agreed on) may hold no record at all, and the
    "flow" turn count comes from the whole step when a mini-batch holds only some turns."""
    empty = batch_lib.pack_turns([], pad_id=7, length=8, num_rows=4)
    assert empty.input_ids.shape == (4, 8) and not empty.row_is_real.any() and empty.loss_mask.sum() == 0
    record = TurnRecord(0, 5, (1, 2), (3,), (-0.5,), 1.0)
    b = batch_lib.pack_turns([record], pad_id=0, length=8, num_rows=2, turns_per_trajectory={5: 3})
    assert b.turns_in_trajectory.tolist() == [3, 0]
    with pytest.raises(ValueError, match="more than the row length"):
        batch_lib.pack_turns([record], pad_id=0, length=2, num_rows=2)


# ----------------------------------------------------------------------------- weights, clip, KL


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_token_weights_reproduce_nested_means(mode):
    b = batch_lib.pack_turns(random_records(1), pad_id=0, length_bucket=4, row_bucket=4)
    values = np.random.default_rng(0).normal(size=b.loss_mask.shape)
    per_row = {r: values[r][b.loss_mask[r] == 1].tolist() for r in range(b.num_rows) if b.loss_mask[r].any()}
    weights = loss.token_weights(b, mode, norm_length=16)
    assert np.all(weights[b.loss_mask == 0] == 0)
    np.testing.assert_allclose(np.sum(weights * values), reference_aggregate(per_row, b.trajectory_id, mode, 16),
                               rtol=1e-5)


def test_clipped_loss_boundaries():
    config = loss.LossConfig(clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    #        (log ratio, advantage)
    cases = [(math.log(1.299), 1.0), (math.log(1.301), 1.0),     # just inside / outside 1 + clip_high
             (math.log(0.801), -1.0), (math.log(0.799), -1.0),   # just inside / outside 1 - clip_low
             (math.log(2.9), -2.0), (math.log(3.1), -2.0),       # below / above the dual clip c = 3
             (math.log(3.1), 2.0), (math.log(0.5), 2.0),         # positive A: clipped above, never below
             (25.0, -1.0), (-25.0, 1.0), (0.7, 0.0)]             # log ratio beyond the clamp; A = 0
    log_ratio = jnp.array([[c[0] for c in cases]], jnp.float32)
    adv = jnp.array([[c[1] for c in cases]], jnp.float32)
    out = loss.clipped_policy_loss(log_ratio, jnp.zeros_like(log_ratio), adv, config)
    expected = [reference_pg(float(lr), 0.0, float(a), config) for lr, a in zip(log_ratio[0], adv[0])]
    np.testing.assert_allclose(out.loss[0], expected, rtol=1e-6)
    assert out.clipped_high[0].tolist() == [False, True, False, False, False, False, True, False, False, False, False]
    assert out.clipped_low[0].tolist() == [False, False, False, True, False, False, False, False, False, False, False]
    assert out.dual_clipped[0].tolist() == [False, False, False, False, False, True, False, False, True, False, False]
    np.testing.assert_allclose(out.ratio[0, 8:10], [math.exp(20), math.exp(-20)], rtol=1e-6)


def test_log_ratio_clamp_stops_gradient_beyond_the_boundary():
    config = loss.LossConfig(dual_clip=None, log_ratio_clamp=20.0)

    def token_loss(logp):
        return loss.clipped_policy_loss(logp[None, None], jnp.zeros((1, 1)), jnp.full((1, 1), -1.0), config).loss[0, 0]

    inside, outside = jax.grad(token_loss)(jnp.float32(19.5)), jax.grad(token_loss)(jnp.float32(20.5))
    np.testing.assert_allclose(inside, math.exp(19.5), rtol=1e-5)  # d(|A| e^x)/dx
    assert outside == 0.0
    np.testing.assert_allclose(token_loss(jnp.float32(20.5)), math.exp(20.0), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    config = loss.LossConfig(kl_estimator=estimator)
    logp = np.array([[-1.0, -0.2, -3.0, -30.0, -0.01]], np.float32)
    ref = np.array([[-1.5, -0.1, -0.5, -2.0, -35.0]], np.float32)
    got = loss.kl_divergence(jnp.asarray(logp), jnp.asarray(ref), config)
    expected = [reference_kl(float(a), float(b), config) for a, b in zip(logp[0], ref[0])]
    np.testing.assert_allclose(got[0], expected, rtol=1e-5)
    assert np.all(np.asarray(loss.kl_divergence(jnp.asarray(logp), jnp.asarray(logp), config)) == 0.0)


def test_kl_reward_penalties_sum_over_response_tokens():
    config = loss.LossConfig(kl_coef=0.1, kl_estimator="k2", kl_in_reward=True)
    old = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], np.float32)
    ref = np.array([[-1.5, -2.0, -1.0], [-1.0, -4.0, -1.0]], np.float32)
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    # k2: row 0 -> 0.1 * (0.125 + 0); row 1 -> 0.1 * (4.5 + 0)
    np.testing.assert_allclose(loss.kl_reward_penalties(old, ref, mask, config), [0.0125, 0.45], rtol=1e-6)


def test_loss_config_validation():
    for bad in (dict(dual_clip=1.0), dict(kl_estimator="k4"), dict(aggregation="mean"), dict(clip_low=1.0),
                dict(kl_coef=-1.0), dict(log_ratio_clamp=0.0)):
        with pytest.raises(ValueError):
            loss.LossConfig(**bad)


# ----------------------------------------------------------------------------- loss from log-probs


def _random_loss_setting(config: loss.LossConfig, seed: int = 3):
    """A packed batch with padding rows, GRPO advantages and log-probs with planted extreme ratios."""
    rng = np.random.default_rng(seed)
    b = batch_lib.pack_turns(random_records(seed), pad_id=0, length_bucket=4, row_bucket=4)
    shape = b.loss_mask.shape
    old = -rng.random(shape).astype(np.float32) * 4
    logp = old + rng.normal(scale=0.4, size=shape).astype(np.float32)
    positions = np.argwhere(b.loss_mask == 1)
    for (row, t), delta in zip(positions[::3], [25.0, -25.0, 1.5, -1.5, 1.2, -0.4]):  # dual clip, clamp, clips
        logp[row, t] = old[row, t] + delta
    ref = logp + rng.normal(scale=0.5, size=shape).astype(np.float32)
    entropy = rng.random(shape).astype(np.float32) * 3
    adv = row_advantages(b)
    inputs = loss.make_loss_inputs(b, adv, old, ref, config)
    return b, inputs, logp, entropy, old, ref, adv


LOSS_CONFIGS = [
    loss.LossConfig(),  # the reference run: token-mean, k3 in the loss
    loss.LossConfig(aggregation="flow", kl_estimator="k1", kl_coef=0.05, entropy_coef=0.01),
    loss.LossConfig(aggregation="seq-mean-token-mean", kl_estimator="k2", kl_coef=0.1, dual_clip=None),
    loss.LossConfig(aggregation="seq-mean-token-sum", kl_coef=0.1, kl_in_reward=True, clip_high=0.2),
    loss.LossConfig(aggregation="seq-mean-token-sum-norm", norm_length=32, kl_coef=0.0, entropy_coef=0.1),
]


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: f"{c.aggregation}-{c.kl_estimator}")
def test_loss_from_logprobs_matches_reference(config):
    b, inputs, logp, entropy, old, ref, adv = _random_loss_setting(config)
    value, metrics = loss.policy_loss_from_logprobs(jnp.asarray(logp), jnp.asarray(entropy), inputs, config)
    per_row = reference_token_losses(b, logp, entropy, old, ref, adv, config)
    np.testing.assert_allclose(value, reference_aggregate(per_row, b.trajectory_id, config.aggregation,
                                                          config.norm_length), rtol=2e-5)

    # Metrics: token means over the loss mask, computed here with explicit loops.
    tokens = [(r, t) for r in range(b.num_rows) for t in range(b.length) if b.loss_mask[r, t] == 1]
    ratio = [math.exp(min(max(float(logp[r, t] - old[r, t]), -20.0), 20.0)) for r, t in tokens]
    token_adv = [float(adv[r]) for r, _ in tokens]
    final = loss.finalize_metrics(metrics)
    assert final["tokens"] == len(tokens)
    np.testing.assert_allclose(final["ratio_mean"], np.mean(ratio), rtol=1e-5)
    np.testing.assert_allclose([final["ratio_min"], final["ratio_max"]], [min(ratio), max(ratio)], rtol=1e-5)
    np.testing.assert_allclose(final["advantage_mean"], np.mean(token_adv), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(final["advantage_std"], np.std(token_adv), rtol=1e-4)
    np.testing.assert_allclose([final["advantage_min"], final["advantage_max"]], [min(token_adv), max(token_adv)])
    np.testing.assert_allclose(final["entropy"], np.mean([entropy[r, t] for r, t in tokens]), rtol=1e-5)
    np.testing.assert_allclose(final["kl"], np.mean([reference_kl(float(logp[r, t]), float(ref[r, t]), config)
                                                     for r, t in tokens]), rtol=1e-5)
    np.testing.assert_allclose(final["sampler_old_abs_gap"],
                               np.mean([abs(b.sampler_logprobs[r, t] - old[r, t]) for r, t in tokens]), rtol=1e-5)
    high = sum(a > 0 and x > 1 + config.clip_high for a, x in zip(token_adv, ratio)) / len(tokens)
    low = sum(a < 0 and x < 1 - config.clip_low for a, x in zip(token_adv, ratio)) / len(tokens)
    dual = 0.0 if config.dual_clip is None else sum(a < 0 and x > config.dual_clip
                                                    for a, x in zip(token_adv, ratio)) / len(tokens)
    np.testing.assert_allclose([final["pg_clipfrac_high"], final["pg_clipfrac_low"], final["dual_clipfrac"]],
                               [high, low, dual], rtol=1e-6)
    assert high > 0 and low > 0 and (dual > 0 or config.dual_clip is None)  # the planted ratios exercise every clip


def test_kl_in_reward_leaves_the_loss():
    in_reward = loss.LossConfig(kl_coef=0.5, kl_in_reward=True)
    _, inputs, logp, entropy, *_ = _random_loss_setting(in_reward)
    without_kl = loss.policy_loss_from_logprobs(jnp.asarray(logp), jnp.asarray(entropy), inputs,
                                                loss.LossConfig(kl_coef=0.0))[0]
    with_kl_in_reward = loss.policy_loss_from_logprobs(jnp.asarray(logp), jnp.asarray(entropy), inputs, in_reward)[0]
    assert with_kl_in_reward == without_kl


def test_kl_is_zero_when_policy_is_the_reference():
    config = loss.LossConfig(kl_coef=1.0)
    _, inputs, logp, entropy, *_ = _random_loss_setting(config)
    inputs = loss.LossInputs(**{**vars(inputs), "ref_logprobs": jnp.asarray(logp)})
    _, metrics = loss.policy_loss_from_logprobs(jnp.asarray(logp), jnp.asarray(entropy), inputs, config)
    assert float(metrics["sum/kl"]) == 0.0


def test_missing_reference_is_a_clear_error():
    b = batch_lib.pack_turns(random_records(0), pad_id=0)
    with pytest.raises(ValueError, match="reference log-probs"):
        loss.make_loss_inputs(b, np.zeros(b.num_rows), np.zeros(b.loss_mask.shape), None, loss.LossConfig())
    inputs = loss.make_loss_inputs(b, np.zeros(b.num_rows), np.zeros(b.loss_mask.shape), None,
                                   loss.LossConfig(kl_coef=0.0))
    assert "sum/kl" not in loss.policy_loss_from_logprobs(inputs.old_logprobs, inputs.old_logprobs, inputs,
                                                          loss.LossConfig(kl_coef=0.0))[1]


# ----------------------------------------------------------------------------- chunked log-probs


def _direct_logprobs(hidden, kernel, targets, temperature):
    log_probs = jax.nn.log_softmax(hidden @ kernel / temperature, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0], entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 16])  # T = 7: dividing, not dividing, equal, larger
def test_chunked_logprobs_and_gradients_equal_direct(chunk_size):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 7)), jnp.int32)
    w_logp, w_ent = (jnp.asarray(rng.normal(size=(2, 7)), jnp.float32) for _ in range(2))

    def chunked(hidden, kernel):
        return logprobs.logprobs_from_hidden(lambda h: h @ kernel, hidden, targets, temperature=0.7,
                                             chunk_size=chunk_size, with_entropy=True)

    got, expected = chunked(hidden, kernel), _direct_logprobs(hidden, kernel, targets, 0.7)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)

    def objective(fn):
        return lambda h, k: jnp.sum(w_logp * fn(h, k)[0] + w_ent * fn(h, k)[1])

    grads = jax.grad(objective(chunked), argnums=(0, 1))(hidden, kernel)
    direct = jax.grad(objective(lambda h, k: _direct_logprobs(h, k, targets, 0.7)), argnums=(0, 1))(hidden, kernel)
    for g, d in zip(grads, direct):
        np.testing.assert_allclose(g, d, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 16])
@pytest.mark.parametrize("mask_kind", ["response", "scattered", "empty"])
def test_masked_logprobs_and_gradients_equal_direct_on_the_mask(chunk_size, mask_kind):
    """Only masked positions are computed (fewer chunks than positions run); others and their gradients are 0."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 8)), jnp.int32)
    mask = {"response": np.arange(8) >= 5, "scattered": rng.random((3, 8)) < 0.3,
            "empty": np.zeros((3, 8), bool)}[mask_kind]
    mask = jnp.asarray(np.broadcast_to(mask, (3, 8)).astype(np.float32))
    w_logp, w_ent = (jnp.asarray(rng.normal(size=(3, 8)), jnp.float32) for _ in range(2))

    def masked(h, k):
        return logprobs.logprobs_from_hidden(lambda x: x @ k, h, targets, temperature=0.7, chunk_size=chunk_size,
                                             with_entropy=True, mask=mask)

    def direct(h, k):
        logp, entropy = _direct_logprobs(h, k, targets, 0.7)
        return logp * mask, entropy * mask

    for got, expected in zip(masked(hidden, kernel), direct(hidden, kernel)):
        np.testing.assert_allclose(got, expected, atol=1e-5)

    def objective(fn):
        return lambda h, k: jnp.sum(w_logp * fn(h, k)[0] + w_ent * fn(h, k)[1])

    grads = jax.grad(objective(masked), argnums=(0, 1))(hidden, kernel)
    expected = jax.grad(objective(direct), argnums=(0, 1))(hidden, kernel)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grads[0])[np.asarray(mask) == 0], 0.0)


@pytest.mark.parametrize("change, message", [
    (dict(hidden=np.zeros((2, 7, 5), np.float32)), "do not match targets"),
    (dict(mask=np.ones((2, 5))), "mask shape"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(temperature=0.0), "temperature must be positive"),
])
def test_logprobs_bad_inputs_are_clear_errors(change, message):
    args = dict(hidden=np.zeros((2, 6, 5), np.float32), mask=None, chunk_size=4, temperature=1.0)
    args.update(change)
    kernel = jnp.ones((5, 11))
    with pytest.raises(ValueError, match=message):
        logprobs.logprobs_from_hidden(lambda h: h @ kernel, jnp.asarray(args.pop("hidden")),
                                      jnp.zeros((2, 6), jnp.int32), **args)


def _largest_vocab_array(closed_jaxpr, vocab: int) -> int:
    """Size of the largest array whose last axis is the vocabulary, anywhere in the program."""
    largest = 0

    def visit(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if shape and shape[-1] == vocab:
                    largest = max(largest, int(np.prod(shape)))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        visit(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)

    visit(closed_jaxpr.jaxpr)
    return largest


def test_full_logits_are_never_materialised_in_forward_or_backward():
    # dim < chunk, so the [dim, vocab] kernel and its gradient are smaller than one chunk of logits
    batch, length, dim, vocab, chunk = 2, 12, 3, 37, 4
    hidden, kernel = jnp.ones((batch, length, dim)), jnp.ones((dim, vocab))
    targets = jnp.zeros((batch, length), jnp.int32)

    def chunked(hidden, kernel):
        logp, entropy = logprobs.logprobs_from_hidden(lambda h: h @ kernel, hidden, targets, chunk_size=chunk,
                                                      with_entropy=True)
        return jnp.sum(logp + entropy)

    def direct(hidden, kernel):
        return jnp.sum(sum(_direct_logprobs(hidden, kernel, targets, 1.0)))

    grad_program = jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
    assert _largest_vocab_array(grad_program, vocab) == chunk * vocab
    # The probe does see a full-logits program for what it is.
    assert _largest_vocab_array(jax.make_jaxpr(jax.grad(direct))(hidden, kernel), vocab) == batch * length * vocab


# ----------------------------------------------------------------------------- tiny Qwen2: log-probs, accumulation

TINY = model_config.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)


@pytest.fixture(scope="module")
def tiny_policy():
    return nnx.split(qwen2.init_random(TINY, seed=0))


@pytest.fixture(scope="module")
def tiny_batch():
    return batch_lib.pack_turns(random_records(5), pad_id=0, length_bucket=4, row_bucket=3)


@pytest.mark.parametrize("chunk_size", [4, 5])
def test_token_logprobs_equal_full_logits(tiny_policy, tiny_batch, chunk_size):
    graphdef, params = tiny_policy
    b = tiny_batch
    assert b.length % 4 == 0 and b.length % 5 != 0
    logp, entropy = logprobs.token_logprobs(graphdef, params, b.input_ids, b.attention_mask, b.targets,
                                            temperature=0.7, chunk_size=chunk_size, with_entropy=True)
    logits = nnx.merge(graphdef, params)(b.input_ids, b.attention_mask)
    log_probs = jax.nn.log_softmax(logits / 0.7, axis=-1)
    expected = jnp.take_along_axis(log_probs, jnp.asarray(b.targets)[..., None], axis=-1)[..., 0]
    assert logp.dtype == jnp.float32 and logp.shape == b.input_ids.shape
    np.testing.assert_allclose(logp, expected, atol=1e-5)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1), atol=1e-5)


def test_token_logprobs_in_query_chunks_equal_one_softmax(tiny_policy):
    """Rows longer than one query chunk (300 = 128 + 128 + 44, left padding): log-probs and gradients
    equal those of the unchunked model."""
    graphdef, params = tiny_policy
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY.vocab_size, (2, 300)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :37] = 0
    targets = np.roll(ids, -1, axis=1)
    loss_mask = mask * (np.arange(300) >= 150)

    def chunked(params):
        return logprobs.token_logprobs(graphdef, params, ids, mask, targets)[0]

    def direct(params):
        log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params)(ids, mask), axis=-1)
        return jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(chunked(params) * loss_mask, direct(params) * loss_mask, atol=1e-5)
    grads = [jax.grad(lambda p, f=f: jnp.sum(f(p) * loss_mask))(params) for f in (chunked, direct)]
    for got, expected in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_bfloat16_policy_loss_gradients_stay_close_to_float32(tiny_batch):
    """The compiled loss + gradient of a bfloat16 model (every custom VJP in bf16) against float32 on the same weights."""
    b = tiny_batch
    graphdef_low, params_low = nnx.split(qwen2.init_random(TINY, seed=0, dtype=jnp.bfloat16))
    graphdef_f32 = nnx.graphdef(qwen2.init_random(TINY, seed=0))
    params_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params_low)
    config = loss.LossConfig(entropy_coef=0.01, logits_chunk_size=8)
    current, _ = logprobs.token_logprobs(graphdef_f32, params_f32, b.input_ids, b.attention_mask, b.targets)
    rng = np.random.default_rng(2)
    old = np.asarray(current) + rng.normal(scale=0.3, size=current.shape).astype(np.float32)
    inputs = loss.make_loss_inputs(b, row_advantages(b), old, old, config)
    (loss_low, _), grads_low = loss.make_value_and_grad(graphdef_low, config)(params_low, inputs)
    (loss_f32, _), grads_f32 = loss.make_value_and_grad(graphdef_f32, config)(params_f32, inputs)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads_low))
    np.testing.assert_allclose(float(loss_low), float(loss_f32), rtol=2e-2, atol=2e-3)
    for low, wide in zip(jax.tree.leaves(grads_low), jax.tree.leaves(grads_f32)):
        wide = np.asarray(wide)
        assert np.linalg.norm(np.asarray(low, np.float32) - wide) <= 5e-2 * np.linalg.norm(wide) + 1e-6


def test_accumulated_microbatch_gradients_equal_full_batch(tiny_policy, tiny_batch):
    graphdef, params = tiny_policy
    b = tiny_batch
    base = loss.LossConfig(entropy_coef=0.01, logits_chunk_size=8)  # clip, dual clip, k3 KL and entropy all active
    current, entropy = logprobs.token_logprobs(graphdef, params, b.input_ids, b.attention_mask, b.targets,
                                               chunk_size=8, with_entropy=True)
    rng = np.random.default_rng(1)
    old = np.asarray(current) + rng.normal(scale=0.5, size=current.shape).astype(np.float32)
    ref = np.asarray(current) + rng.normal(scale=0.5, size=current.shape).astype(np.float32)
    adv = row_advantages(b)
    # Aggregation lives entirely in the token weights: one compiled step serves every mode.
    value_and_grad = loss.make_value_and_grad(graphdef, base)

    for mode in ("token-mean", "flow"):
        config = loss.LossConfig(**{**vars(base), "aggregation": mode})
        inputs = loss.make_loss_inputs(b, adv, old, ref, config)
        full = loss.accumulate_gradients(value_and_grad, params, [inputs])
        accumulated = loss.accumulate_gradients(value_and_grad, params, [batch_lib.microbatch(batch_lib.stack_microbatches(inputs, 3), i) for i in range(3)])
        assert bool(full.is_finite) and bool(accumulated.is_finite)
        np.testing.assert_allclose(accumulated.loss, full.loss, rtol=1e-5, atol=1e-7)
        for acc, one in zip(jax.tree.leaves(accumulated.grads), jax.tree.leaves(full.grads)):
            np.testing.assert_allclose(acc, one, rtol=1e-5, atol=1e-6)
        assert any(float(jnp.max(jnp.abs(g))) > 1e-4 for g in jax.tree.leaves(full.grads))
        full_metrics, acc_metrics = loss.finalize_metrics(full.metrics), loss.finalize_metrics(accumulated.metrics)
        assert full_metrics.keys() == acc_metrics.keys()
        for key in full_metrics:
            np.testing.assert_allclose(acc_metrics[key], full_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)

        # The model path agrees with the loop reference on the model's own log-probs.
        per_row = reference_token_losses(b, np.asarray(current), np.asarray(entropy), old, ref, adv, config)
        np.testing.assert_allclose(full.loss, reference_aggregate(per_row, b.trajectory_id, mode, 2048), rtol=1e-5)

    assert value_and_grad._cache_size() == 2  # one compilation per shape: full batch and micro-batch

    poisoned = [batch_lib.microbatch(batch_lib.stack_microbatches(inputs, 3), i) for i in range(3)]
    poisoned[1] = loss.LossInputs(**{**vars(poisoned[1]), "old_logprobs": poisoned[1].old_logprobs * jnp.nan})
    assert not bool(loss.accumulate_gradients(value_and_grad, params, poisoned).is_finite)
    assert value_and_grad._cache_size() == 2
