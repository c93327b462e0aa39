"""The Flow-GRPO training batch: one row per planner call, built from exact sampled tokens.

A row is `prompt_ids + response_ids` right-padded to a bucketed length. Position `p` predicts
`targets[p] = input_ids[p + 1]`; the loss covers exactly the positions whose target is a response
token, i.e. `p` in `[len(prompt) - 1, len(prompt) + len(response) - 2]`. Per-token arrays
(`sampler_logprobs`, trainer log-probs, loss weights) are aligned with those positions.

Rows may be padded to a multiple of `row_bucket` with inert rows (`row_is_real` False, no attended
tokens, empty loss mask) so that micro-batches keep one shape from step to step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Mapping, Sequence, TypeVar

import jax
import numpy as np

PADDING_ROW_ID = -1  # query_id / trajectory_id of the inert rows added by `row_bucket`
Rows = TypeVar("Rows")  # a pytree of arrays sharing a leading row axis


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One planner call of one trajectory, exactly as sampled.

    Attributes:
      query_id: index of the query; the GRPO group is the query's trajectories.
      trajectory_id: identifies the trajectory; unique over the whole batch (not per query).
      prompt_ids: the exact prompt token ids fed to the sampler.
      response_ids: the exact sampled token ids (at least one).
      sampler_logprobs: the sampler's log-prob of each response token, same length as response_ids.
      reward: the trajectory's final-outcome reward, broadcast to each of its planner calls.
    """

    query_id: int
    trajectory_id: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]
    reward: float


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """Padded numpy arrays of B rows (planner calls) and T positions.

    Attributes:
      input_ids: [B, T] int32, prompt + response, right-padded with the pad id.
      attention_mask: [B, T] int32, 1 on real tokens.
      targets: [B, T] int32, `input_ids` shifted left by one (pad id at the end).
      loss_mask: [B, T] float32, 1 exactly where the target is a response token.
      sampler_logprobs: [B, T] float32, the sampler's log-prob of each target under `loss_mask`, 0 elsewhere.
      query_id: [B] int64 (PADDING_ROW_ID on padding rows).
      trajectory_id: [B] int64 (PADDING_ROW_ID on padding rows).
      turns_in_trajectory: [B] int32, how many rows of the batch belong to this row's trajectory (0 on padding).
      reward: [B] float32, the trajectory reward of each row (0 on padding).
      row_is_real: [B] bool, False on padding rows.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    sampler_logprobs: np.ndarray
    query_id: np.ndarray
    trajectory_id: np.ndarray
    turns_in_trajectory: np.ndarray
    reward: np.ndarray
    row_is_real: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def pack_turns(records: Sequence[TurnRecord], *, pad_id: int, length_bucket: int = 128, row_bucket: int = 1,
               length: int | None = None, num_rows: int | None = None,
               turns_per_trajectory: Mapping[int, int] | None = None) -> TrainBatch:
    """Packs planner calls into a `TrainBatch`.

    Args:
      records: planner calls in any order; all calls of a trajectory must share query_id and reward.
      pad_id: token id used for padding (never attended, never a loss target).
      length_bucket: T is the longest row rounded up to a multiple of this (few distinct shapes).
      row_bucket: B is the number of records rounded up to a multiple of this with inert rows.
      length, num_rows: T and B exactly (e.g. agreed by every process of a run), instead of the
        buckets; then `records` may be empty (a batch of padding rows).
      turns_per_trajectory: each trajectory's number of planner calls in the whole step (default:
        counted among `records`), for the "flow" aggregation.
    Raises:
      ValueError: no records (without explicit sizes), an empty prompt or response, log-probs of the
        wrong length, a trajectory whose calls disagree on query or reward, or records that do not
        fit `length` / `num_rows`.
    """
    if not records and (length is None or num_rows is None):
        raise ValueError("pack_turns needs at least one TurnRecord (or explicit length and num_rows)")
    if length_bucket < 1 or row_bucket < 1:
        raise ValueError(f"length_bucket and row_bucket must be >= 1, got {length_bucket} and {row_bucket}")
    for index, record in enumerate(records):
        _check_record(index, record)
    turns = dict(_turns_per_trajectory(records))
    turns.update(turns_per_trajectory or {})

    if length is None:
        length = _round_up(max(len(r.prompt_ids) + len(r.response_ids) for r in records), length_bucket)
    rows = _round_up(len(records), row_bucket) if num_rows is None else num_rows
    packed = pack_sequences([r.prompt_ids for r in records], [r.response_ids for r in records], pad_id=pad_id,
                            length=length, rows=rows)
    sampler_logprobs = np.zeros((rows, length), np.float32)
    query_id = np.full((rows,), PADDING_ROW_ID, np.int64)
    trajectory_id = np.full((rows,), PADDING_ROW_ID, np.int64)
    turns_in_trajectory = np.zeros((rows,), np.int32)
    reward = np.zeros((rows,), np.float32)
    for row, record in enumerate(records):
        first = len(record.prompt_ids) - 1  # the position whose target is the first response token
        sampler_logprobs[row, first:first + len(record.response_ids)] = record.sampler_logprobs
        query_id[row] = record.query_id
        trajectory_id[row] = record.trajectory_id
        turns_in_trajectory[row] = turns[record.trajectory_id]
        reward[row] = record.reward
    return TrainBatch(input_ids=packed.input_ids, attention_mask=packed.attention_mask, targets=packed.targets,
                      loss_mask=packed.loss_mask, sampler_logprobs=sampler_logprobs, query_id=query_id,
                      trajectory_id=trajectory_id, turns_in_trajectory=turns_in_trajectory, reward=reward,
                      row_is_real=np.arange(rows) < len(records))


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """[B, T] arrays of prompt + response rows: ids (right-padded), attention mask (int32, 1 on
    tokens), next-token targets, and the loss mask (float32, 1 exactly where the target is a
    response token)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                   length: int, rows: int) -> PackedSequences:
    """`rows` rows of `length` positions: row i holds prompts[i] + responses[i]; rows past the
    sequences are all padding. Position p predicts token p + 1; the loss mask covers the positions
    predicting response tokens (see module docstring). Used by RL rows and supervised examples alike.

    Raises:
      ValueError: more sequences than rows, or a sequence longer than `length`.
    """
    if len(prompts) != len(responses) or len(prompts) > rows:
        raise ValueError(f"{len(prompts)} prompts and {len(responses)} responses do not fit {rows} rows")
    input_ids = np.full((rows, length), pad_id, np.int32)
    attention_mask = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        total = len(prompt) + len(response)
        if total > length:
            raise ValueError(f"sequence {row} has {total} tokens, more than the row length {length}")
        input_ids[row, :total] = [*prompt, *response]
        attention_mask[row, :total] = 1
        loss_mask[row, len(prompt) - 1:total - 1] = 1.0
    targets = np.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    return PackedSequences(input_ids, attention_mask, targets, loss_mask)


def stack_microbatches(batch: Rows, n: int) -> Rows:
    """Every array of a pytree (e.g. `TrainBatch`, `loss.LossInputs`) [B, ...] as [n, B / n, ...]:
    n micro-batches of consecutive rows on a new leading axis (`microbatch(stacked, i)` is one).

    Micro-batches share one shape, so a jitted step compiles once. Pad rows with
    `pack_turns(..., row_bucket=...)` when B is not a multiple of n.
    """
    leaves = jax.tree.leaves(batch)
    if n < 1:
        raise ValueError(f"number of micro-batches must be >= 1, got {n}")
    rows = {leaf.shape[0] for leaf in leaves}
    if len(rows) != 1:
        raise ValueError(f"arrays disagree on the number of rows: {sorted(rows)}")
    (num_rows,) = rows
    if num_rows % n:
        raise ValueError(f"{num_rows} rows do not split into {n} equal micro-batches; "
                         f"build the batch with pack_turns(..., row_bucket={n}) (or a multiple of it)")
    return jax.tree.map(lambda x: x.reshape((n, num_rows // n) + x.shape[1:]), batch)


def microbatch(stacked: Rows, index: int) -> Rows:
    """Micro-batch `index` of a `stack_microbatches` pytree."""
    return jax.tree.map(lambda x: x[index], stacked)


def _check_record(index: int, record: TurnRecord) -> None:
    where = f"TurnRecord #{index} (query {record.query_id}, trajectory {record.trajectory_id})"
    if not record.prompt_ids:
        raise ValueError(f"{where} has an empty prompt; a response needs at least one prompt token to condition on")
    if not record.response_ids:
        raise ValueError(f"{where} has an empty response: nothing to train on; drop planner calls that "
                         "sampled no tokens before packing")
    if len(record.sampler_logprobs) != len(record.response_ids):
        raise ValueError(f"{where} has {len(record.sampler_logprobs)} sampler log-probs for "
                         f"{len(record.response_ids)} response tokens; they must correspond one to one")
    if record.trajectory_id == PADDING_ROW_ID or record.query_id == PADDING_ROW_ID:
        raise ValueError(f"{where}: id {PADDING_ROW_ID} is reserved for padding rows")


def _turns_per_trajectory(records: Sequence[TurnRecord]) -> dict[int, int]:
    """trajectory_id -> number of records; checks each trajectory has one query and one reward."""
    first_of: dict[int, TurnRecord] = {}
    for record in records:
        first = first_of.setdefault(record.trajectory_id, record)
        if first.query_id != record.query_id:
            raise ValueError(f"trajectory {record.trajectory_id} appears under queries {first.query_id} and "
                             f"{record.query_id}; trajectory ids must be unique over the batch")
        if first.reward != record.reward:
            raise ValueError(f"trajectory {record.trajectory_id} has rewards {first.reward} and {record.reward}; "
                             "every planner call of a trajectory carries the trajectory's reward")
    return collections.Counter(record.trajectory_id for record in records)


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple
