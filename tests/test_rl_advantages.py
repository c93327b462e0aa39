"""Advantage estimators and groupings against plain-Python loop references and hand-derived values."""

import math

import numpy as np
import pytest
import torch

from agentflow_jax.rl import advantages

ESTIMATORS = ["grpo", "grpo_no_std", "drgrpo", "rloo"]


def reference_group_advantage(members: list[float], index: int, estimator: str) -> float:
    """Advantage of members[index] within its group, computed with explicit sums (no numpy)."""
    n, value = len(members), members[index]
    if all(m == members[0] for m in members):
        return 0.0
    mean = sum(members) / n
    if estimator == "grpo":
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
        return (value - mean) / (std + 1e-6)
    if estimator in ("grpo_no_std", "drgrpo"):
        return value - mean
    others = members[:index] + members[index + 1:]
    return value - sum(others) / len(others)


def reference_advantages(rows: list[tuple[int, int, float, float]], estimator: str, grouping: str) -> list[float]:
    """rows: (query, trajectory, reward, kl_penalty) -> per-row advantages, by looping over groups."""
    result = []
    for position, (query, trajectory, _, _) in enumerate(rows):
        if grouping == "turn":
            group = [j for j, row in enumerate(rows) if row[0] == query]
            members = [rows[j][2] - rows[j][3] for j in group]
            result.append(reference_group_advantage(members, group.index(position), estimator))
        else:
            trajectory_value = {}  # first reward of the trajectory minus all its rows' penalties
            for q, t, r, p in rows:
                if q == query:
                    trajectory_value[t] = trajectory_value.get(t, r) - p
            order = list(trajectory_value)
            result.append(reference_group_advantage([trajectory_value[t] for t in order], order.index(trajectory),
                                                    estimator))
    return result


# Two queries with mixed trajectory lengths: query 0 has trajectories 10 (3 turns, reward 1),
# 11 (1 turn, reward 0), 12 (2 turns, reward 1); query 1 has 20 (1 turn, 0.5), 21 (2 turns, 0), 22 (1 turn, 1).
MIXED_ROWS = [(0, 10, 1.0), (0, 11, 0.0), (0, 10, 1.0), (1, 20, 0.5), (0, 12, 1.0), (1, 21, 0.0),
              (0, 10, 1.0), (1, 22, 1.0), (0, 12, 1.0), (1, 21, 0.0)]


def _columns(rows):
    return (np.array([r[2] for r in rows]), np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))


@pytest.mark.parametrize("grouping", ["trajectory", "turn"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_loop_reference_on_mixed_lengths(estimator, grouping):
    rewards, queries, trajectories = _columns(MIXED_ROWS)
    got = advantages.compute_advantages(rewards, queries, trajectories, estimator=estimator, grouping=grouping)
    expected = reference_advantages([(q, t, r, 0.0) for q, t, r in MIXED_ROWS], estimator, grouping)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grouping", ["trajectory", "turn"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalties_match_loop_reference(estimator, grouping):
    rewards, queries, trajectories = _columns(MIXED_ROWS)
    penalties = np.linspace(0.01, 0.1, len(MIXED_ROWS))
    got = advantages.compute_advantages(rewards, queries, trajectories, estimator=estimator, grouping=grouping,
                                        kl_penalties=penalties)
    expected = reference_advantages([(q, t, r, p) for (q, t, r), p in zip(MIXED_ROWS, penalties)],
                                    estimator, grouping)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_grouping_hand_derived_values():
    # Trajectory A (2 turns, reward 1) and B (1 turn, reward 0) of one query.
    rewards, queries, trajectories = np.array([1.0, 1.0, 0.0]), np.zeros(3, int), np.array([0, 0, 1])
    # Per trajectory: values (1, 0), mean 1/2, unbiased std sqrt(1/2) -> +-(1/2)/sqrt(1/2) = +-sqrt(1/2).
    by_trajectory = advantages.compute_advantages(rewards, queries, trajectories, grouping="trajectory")
    np.testing.assert_allclose(by_trajectory, [math.sqrt(0.5), math.sqrt(0.5), -math.sqrt(0.5)], rtol=1e-5)
    # Per turn (reference): values (1, 1, 0), mean 2/3, std sqrt(1/3): (1/3)/sqrt(1/3) and -(2/3)/sqrt(1/3).
    by_turn = advantages.compute_advantages(rewards, queries, trajectories, grouping="turn")
    np.testing.assert_allclose(by_turn, [math.sqrt(1 / 3), math.sqrt(1 / 3), -2 * math.sqrt(1 / 3)], rtol=1e-5)


def test_grpo_std_is_torch_std():
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    expected = (torch.tensor(values) - torch.tensor(values).mean()) / (torch.tensor(values).std() + 1e-6)
    got = advantages.compute_advantages(values, np.zeros(8, int), np.arange(8))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("grouping", ["trajectory", "turn"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_equal_rewards_and_singletons_give_exactly_zero(estimator, grouping):
    # 0.1 three times: a floating-point mean is not exactly 0.1, the advantage must still be exactly 0.
    rewards = np.array([0.1, 0.1, 0.1, 0.7, 0.3, 0.3])
    queries = np.array([0, 0, 0, 1, 2, 2])
    trajectories = np.array([0, 1, 2, 3, 4, 4])  # query 1: one trajectory; query 2: one trajectory, two turns
    got = advantages.compute_advantages(rewards, queries, trajectories, estimator=estimator, grouping=grouping)
    assert np.all(got == 0.0)


def test_every_turn_of_a_trajectory_gets_the_same_advantage():
    rewards, queries, trajectories = _columns(MIXED_ROWS)
    got = advantages.compute_advantages(rewards, queries, trajectories)
    for trajectory in set(trajectories.tolist()):
        assert len(set(got[trajectories == trajectory].tolist())) == 1


def test_registry_and_errors():
    assert set(ESTIMATORS) == set(advantages.ADVANTAGE_ESTIMATORS)
    args = (np.array([1.0, 0.0]), np.array([0, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        advantages.compute_advantages(*args, estimator="ppo")
    with pytest.raises(ValueError, match="unknown advantage grouping"):
        advantages.compute_advantages(*args, grouping="query")
    with pytest.raises(ValueError, match="broadcast unchanged"):
        advantages.compute_advantages(np.array([1.0, 0.0]), np.array([0, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="must all be"):
        advantages.compute_advantages(np.array([1.0, 0.0]), np.array([0]), np.array([0, 1]))
