"""Supervised data: chat files and recorded trajectories, read into chats whose assistant messages
carry the loss (`supervised.chat_examples` tokenises them through the chat template).

**Chat file** (JSON lines, the OpenAI fine-tuning format):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "weight": 1}, ...]}

Roles are system, user and assistant. Every assistant message after the first message carries
loss unless its optional "weight" is 0 (`assistant_turns="last"`: only the last such message).
A line with no assistant message to train on is an error.

**Trajectories file**: what a run writes to `<workdir>/trajectories.jsonl`, one line per
trajectory, `{"step": int, "split": "train" | "eval", "trajectory": Trajectory.to_json()}`. Each
planner call of a trajectory in the chosen splits becomes a chat: the planner's prompt messages and
its text as the assistant's reply (a planner warm start from the agent's own rollouts). Calls cut
off by the token limit (finish reason "length") are left out, as their text never ended the turn.
With `queries` (the records of a query file: "query", "answer", "kind"), only trajectories whose
answer scores 1 against the gold answer are used.

Errors are `DataFileError`s naming the file and the line.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from agentflow_jax.data.pipeline import DataFileError, QueryRecord, read_rows
from agentflow_jax.models.tokenizer import CHAT_ROLES
from agentflow_jax.rl.rewards import score_answer

ASSISTANT_TURNS = ("all", "last")
TRAJECTORY_SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Chat:
    """A conversation and the indices of its assistant messages that carry loss.

    Attributes:
      messages: {"role", "content"} dicts.
      trained: indices into `messages`, each an assistant message after the first message.
      where: "FILE:LINE" of its source, for messages.
    """

    messages: tuple[dict[str, str], ...]
    trained: tuple[int, ...]
    where: str


def read_chat_file(path: str | os.PathLike, *, assistant_turns: str = "all") -> list[Chat]:
    """The chats of a chat file (module docstring); `assistant_turns`: "all" or "last".

    Raises:
      DataFileError: a line that is not a chat, or has no assistant message to train on; a file without chats.
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
    chats = []
    for line_number, row in read_rows(path):
        where = f"{path}:{line_number}"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataFileError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}, "
                                f"got keys {sorted(row)}")
        checked, trained = [], []
        for index, message in enumerate(messages):
            checked.append(_checked_message(message, f"{where}: message {index}"))
            weight = message.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise DataFileError(f"{where}: message {index} has weight {weight!r}; use 0 (context) or 1 (trained)")
            if checked[-1]["role"] == "assistant" and index > 0 and weight == 1:
                trained.append(index)
        if not trained:
            raise DataFileError(f"{where}: no assistant message to train on (an assistant message after the "
                                "first message, without \"weight\": 0)")
        chats.append(Chat(tuple(checked), tuple(trained[-1:] if assistant_turns == "last" else trained), where))
    if not chats:
        raise DataFileError(f"{path}: no chats in the file")
    return chats


@dataclasses.dataclass(frozen=True)
class TrajectoryChats:
    """The planner calls of a trajectories file as chats, and what was counted on the way.

    `counts`: "trajectories" (in the chosen splits), "incorrect" (left out by the gold answers),
    "planner_calls" (kept), "truncated_calls" (left out: cut off by the token limit).
    """

    chats: list[Chat]
    counts: dict[str, int]


def read_trajectory_file(path: str | os.PathLike, *, splits: Sequence[str] = ("train",),
                         queries: Sequence[QueryRecord] | None = None) -> TrajectoryChats:
    """The planner calls of the trajectories in `splits` (module docstring); with `queries`, of the
    correctly answered ones only.

    Raises:
      DataFileError: a line that is not a logged trajectory; a trajectory whose query is not among
        `queries`, or is scored by an LLM judge; no planner call left to train on.
    """
    unknown = sorted(set(splits) - set(TRAJECTORY_SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must name some of {TRAJECTORY_SPLITS}, got {list(splits)}")
    gold = {record["query"]: record for record in queries} if queries is not None else None
    counts: collections.Counter[str] = collections.Counter()
    chats = []
    for line_number, row in read_rows(path):
        where = f"{path}:{line_number}"
        trajectory = row.get("trajectory")
        if not isinstance(trajectory, dict) or not isinstance(trajectory.get("turns"), list):
            raise DataFileError(f"{where}: expected a logged trajectory {{\"step\", \"split\", \"trajectory\": "
                                f"{{\"memory\", \"turns\", \"answer\", ...}}}} (a run's trajectories.jsonl)")
        if row.get("split") not in splits:
            continue
        counts["trajectories"] += 1
        if gold is not None and not _is_correct(trajectory, gold, where):
            counts["incorrect"] += 1
            continue
        for turn_index, turn in enumerate(trajectory["turns"], start=1):
            planner = turn.get("planner") if isinstance(turn, dict) else None
            if not isinstance(planner, dict) or not isinstance(planner.get("messages"), list) \
                    or not isinstance(planner.get("text"), str):
                raise DataFileError(f"{where}: turn {turn_index} has no planner call (messages and text)")
            if planner.get("finish_reason") == "length":
                counts["truncated_calls"] += 1
                continue
            messages = [_checked_message(m, f"{where}: turn {turn_index}, planner message {i}")
                        for i, m in enumerate(planner["messages"])]
            if not messages:
                raise DataFileError(f"{where}: turn {turn_index}'s planner call has no prompt messages")
            chats.append(Chat((*messages, {"role": "assistant", "content": planner["text"]}), (len(messages),),
                              f"{where} turn {turn_index}"))
            counts["planner_calls"] += 1
    if not chats:
        raise DataFileError(f"{path}: no planner call to train on ({dict(counts) or 'no trajectories'} in "
                            f"splits {list(splits)})")
    return TrajectoryChats(chats, dict(counts))


def _checked_message(message: Any, where: str) -> dict[str, str]:
    """{"role", "content"} of a message, or a DataFileError naming `where`."""
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
            or not isinstance(message.get("content"), str):
        raise DataFileError(f"{where} needs a string \"role\" and a string \"content\", got {message!r:.120}")
    if message["role"] not in CHAT_ROLES:
        raise DataFileError(f"{where} has role {message['role']!r}; roles: {', '.join(CHAT_ROLES)}")
    return {"role": message["role"], "content": message["content"]}


def _is_correct(trajectory: Mapping[str, Any], gold: Mapping[str, QueryRecord], where: str) -> bool:
    """Whether the trajectory's answer scores 1 against its query's gold answer."""
    query = (trajectory.get("memory") or {}).get("query")
    record = gold.get(query)
    if record is None:
        raise DataFileError(f"{where}: the trajectory's query {query!r:.80} is not in the query file giving the "
                            "gold answers; use the file the run was trained or evaluated on")
    if record["kind"] == "judge":
        raise DataFileError(f"{where}: query {record['pid']!r} is scored by an LLM judge, which cannot run here; "
                            "give a query file whose kinds score offline (exact, f1, math, choice, game24)")
    return score_answer(trajectory.get("answer"), record["answer"], record["kind"],
                        choices=record.get("choices")) >= 1.0
