"""Group-relative advantage estimators for Flow-GRPO, registered by name.

Every planner call (row) of a trajectory gets the trajectory's outcome reward. A group is one
query's rollouts; how its members are counted is the `grouping`:

  "trajectory" (default, the paper): one value per trajectory, so each of the G rollouts weighs
               the same in the group's mean and std whatever its number of turns.
  "turn"       (the reference implementation, verl): one value per row, so a trajectory with more
               planner calls weighs more in the mean and std.

Estimators map the values of one group to advantages:

  "grpo"        (x - mean) / (std + eps), unbiased std (as torch.std), eps = 1e-6.
  "grpo_no_std" x - mean.
  "drgrpo"      Dr. GRPO's advantage: x - mean, like "grpo_no_std"; Dr. GRPO pairs it with the
                length-unbiased loss aggregation "seq-mean-token-sum-norm" (see loss.py).
  "rloo"        x - mean of the other members (leave-one-out baseline) = n/(n-1) (x - mean).

A group whose values are all equal, in particular a group of one, gets exactly zero advantage.
(verl gives a singleton group its raw score instead; a lone sample carries no relative signal.)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

GroupEstimator = Callable[[np.ndarray], np.ndarray]
"""Values of one group [n] float64 -> advantages [n] float64."""

GRPO_EPS = 1e-6


def grpo(values: np.ndarray) -> np.ndarray:
    """(x - mean) / (unbiased std + 1e-6); zeros when all values are equal."""
    if _all_equal(values):
        return np.zeros_like(values)
    return (values - values.mean()) / (values.std(ddof=1) + GRPO_EPS)


def mean_centred(values: np.ndarray) -> np.ndarray:
    """x - mean; zeros when all values are equal."""
    if _all_equal(values):
        return np.zeros_like(values)
    return values - values.mean()


def rloo(values: np.ndarray) -> np.ndarray:
    """x_i - mean_{j != i} x_j; zeros when all values are equal (including a group of one)."""
    if _all_equal(values):
        return np.zeros_like(values)
    n = len(values)
    return values - (values.sum() - values) / (n - 1)


ADVANTAGE_ESTIMATORS: dict[str, GroupEstimator] = {
    "grpo": grpo,
    "grpo_no_std": mean_centred,
    "drgrpo": mean_centred,
    "rloo": rloo,
}
GROUPINGS = ("trajectory", "turn")


def compute_advantages(rewards: np.ndarray, query_ids: np.ndarray, trajectory_ids: np.ndarray, *,
                       estimator: str = "grpo", grouping: str = "trajectory",
                       kl_penalties: np.ndarray | None = None) -> np.ndarray:
    """Per-row advantages; every row of a trajectory gets its trajectory's advantage ("trajectory" grouping).

    Args:
      rewards: [B] trajectory reward of each row (equal on the rows of one trajectory).
      query_ids: [B] group of each row.
      trajectory_ids: [B] trajectory of each row, unique over the batch.
      estimator: a key of ADVANTAGE_ESTIMATORS.
      grouping: "trajectory" or "turn" (module docstring).
      kl_penalties: optional [B] reward penalty of each row (`loss.kl_reward_penalties`, KL in reward).
        A row's value becomes `reward - penalty` ("turn"); a trajectory's value becomes
        `reward - sum of its rows' penalties` ("trajectory": the KL of a whole trajectory).
    Returns:
      [B] float32 advantages.
    """
    group_estimator = _lookup_estimator(estimator)
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown advantage grouping {grouping!r}; expected one of {GROUPINGS}")
    rewards = np.asarray(rewards, np.float64)
    query_ids, trajectory_ids = np.asarray(query_ids), np.asarray(trajectory_ids)
    penalties = np.zeros_like(rewards) if kl_penalties is None else np.asarray(kl_penalties, np.float64)
    if not rewards.shape == query_ids.shape == trajectory_ids.shape == penalties.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape}, query_ids {query_ids.shape}, trajectory_ids "
                         f"{trajectory_ids.shape} and kl_penalties {penalties.shape} must all be [B]")
    _check_one_reward_per_trajectory(rewards, trajectory_ids)

    advantages = np.zeros_like(rewards)
    for query in np.unique(query_ids):
        rows = np.flatnonzero(query_ids == query)
        if grouping == "turn":
            advantages[rows] = group_estimator(rewards[rows] - penalties[rows])
        else:
            members, member_of_row = np.unique(trajectory_ids[rows], return_inverse=True)
            member_reward = np.empty(len(members))
            member_reward[member_of_row] = rewards[rows]
            member_penalty = np.bincount(member_of_row, weights=penalties[rows], minlength=len(members))
            advantages[rows] = group_estimator(member_reward - member_penalty)[member_of_row]
    return advantages.astype(np.float32)


def _lookup_estimator(name: str) -> GroupEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def _all_equal(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def _check_one_reward_per_trajectory(rewards: np.ndarray, trajectory_ids: np.ndarray) -> None:
    for trajectory in np.unique(trajectory_ids):
        distinct = np.unique(rewards[trajectory_ids == trajectory])
        if len(distinct) > 1:
            raise ValueError(f"trajectory {trajectory} has rewards {distinct.tolist()}; the reward of a "
                             "trajectory is broadcast unchanged to each of its planner calls")
