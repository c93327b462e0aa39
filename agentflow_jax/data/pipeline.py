"""Grain input pipeline for training queries.

A training query is a plain dict `{"pid": str, "query": str, "answer": str, "kind": str, ...}`:
`kind` names the scorer (e.g. "judge" for search QA, "math"). Sources are JSON-lines files (or files
holding one JSON list of objects) or lists of dicts with `query` (or `question`), `answer` (a string,
a number, or a list joined with "; " as in SPEC section 3), and optional `pid` (or `id`) and
`kind`. Any other field of a row (e.g. "qtype" and "tools", which evaluation breaks metrics down
by, or "choices") is kept as it is. Rows without an answer or a query are skipped and counted, never silently dropped.

The iterator is built on grain's `MapDataset`: the records are shuffled with the seed (a new order
each epoch), repeated and cut into global batches, the same on every process; each process then
keeps its own contiguous share of every global batch (its shard). So the global batch of step s
does not depend on how many processes read it, and the iterator's state (`get_state()`, the
global position) is the same on every process: a run resumes exactly, also on another number of
processes (`agentflow_jax.checkpoint.TrainCheckpointer` saves it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import grain
import jax

from agentflow_jax.errors import UserError
from agentflow_jax.rl.rewards import GOLD_SEPARATOR

_log = logging.getLogger(__name__)

QueryRecord = dict[str, Any]
# Source spellings that are normalised into "query" and "pid" (not kept as extra fields).
_ALIASES = ("question", "id")

# Records live in memory: reading them in threads would only add GIL contention.
_IN_MEMORY_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class QueryDataset:
    """Normalised training queries plus the number of source rows that were skipped."""

    records: tuple[QueryRecord, ...]
    skipped_without_answer: int = 0
    skipped_without_query: int = 0

    def __len__(self) -> int:
        return len(self.records)


# ----------------------------------------------------------------------------------------------
# Loading and normalising
# ----------------------------------------------------------------------------------------------


class DataFileError(UserError, ValueError):
    """A data file that cannot be read as records; the message names the file and the line."""


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a file holding a JSON list of objects or JSON lines, each with the line it
    starts on (blank lines ignored); DataFileError names the file and the line of what is wrong."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return _json_list_rows(path, text)
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{line_number} is not valid JSON ({e.msg}); each line must hold one JSON "
                                "object (or the file one JSON list of objects)") from e
        rows.append((line_number, _object_row(path, line_number, row)))
    return rows


def _json_list_rows(path: str | os.PathLike, text: str) -> list[tuple[int, dict[str, Any]]]:
    """The items of a JSON list, decoded one at a time so each keeps its line number."""
    decoder = json.JSONDecoder()
    rows, position = [], text.index("[") + 1
    line_of = lambda offset: text.count("\n", 0, offset) + 1  # noqa: E731
    while True:
        position = _skip(text, position)
        if position < len(text) and text[position] == "]":
            if _skip(text, position + 1) != len(text):
                raise DataFileError(f"{path}:{line_of(position)}: text after the end of the JSON list")
            return rows
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from e
        rows.append((line_of(position), _object_row(path, line_of(position), row)))
        position = _skip(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            raise DataFileError(f"{path}:{line_of(min(position, len(text)))} is not valid JSON (expected ',' or ']' "
                                "after a list item)")


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _object_row(path: str | os.PathLike, line_number: int, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataFileError(f"{path}:{line_number} holds a {type(row).__name__}, not a JSON object")
    return row


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines (or JSON list) file; see `read_rows`."""
    return [row for _, row in read_rows(path)]


def join_gold_answers(answer: Any) -> str:
    """The gold answer as one string: lists are joined with "; ", empty parts dropped."""
    if answer is None:
        return ""
    if isinstance(answer, (list, tuple)):
        parts = (join_gold_answers(part) for part in answer)
        return GOLD_SEPARATOR.join(part for part in parts if part)
    return str(answer).strip()


def _query_text(row: Mapping[str, Any]) -> str:
    query = row.get("query")
    if query is None or not str(query).strip():
        query = row.get("question")
    return "" if query is None else str(query).strip()


def _pid(row: Mapping[str, Any], row_index: int, pid_prefix: str) -> str:
    pid = row.get("pid", row.get("id"))
    return f"{pid_prefix}{row_index}" if pid is None or str(pid) == "" else f"{pid_prefix}{pid}"


def load_queries(source: str | os.PathLike | Iterable[Mapping[str, Any]], *,
                 default_kind: str = "exact", pid_prefix: str = "") -> QueryDataset:
    """Reads and normalises training queries from a JSON-lines path or an iterable of dicts.

    Args:
      source: a `.jsonl` path, or dicts with `query`/`question`, `answer`, optional `pid`/`id`,
        `kind` and any other fields (kept unchanged).
      default_kind: scorer kind for rows without `kind`.
      pid_prefix: prepended to every pid (row number when the row has none), so that sources
        mixed together keep distinct pids.

    Rows whose answer is missing or empty, or whose query is missing or empty, are skipped; the
    counts are in the result and logged.
    """
    rows = read_jsonl(source) if isinstance(source, (str, os.PathLike)) else list(source)
    records: list[QueryRecord] = []
    without_answer = without_query = 0
    for row_index, row in enumerate(rows):
        answer = join_gold_answers(row.get("answer"))
        query = _query_text(row)
        if not answer:
            without_answer += 1
        elif not query:
            without_query += 1
        else:
            extra = {k: v for k, v in row.items() if k not in _ALIASES}
            records.append({**extra, "pid": _pid(row, row_index, pid_prefix), "query": query, "answer": answer,
                            "kind": str(row.get("kind") or default_kind)})
    if without_answer or without_query:
        _log.warning("training queries from %s: kept %d rows, skipped %d without an answer and %d "
                     "without a query", _describe(source), len(records), without_answer, without_query)
    return QueryDataset(tuple(records), without_answer, without_query)


def concatenate_queries(datasets: Sequence[QueryDataset]) -> QueryDataset:
    """Several query sets as one (e.g. NQ search + DeepMath math; the iterator shuffles them together).

    Raises ValueError when two records share a pid: load the sources with different `pid_prefix`.
    """
    records = tuple(record for dataset in datasets for record in dataset.records)
    seen: set[str] = set()
    for record in records:
        if record["pid"] in seen:
            raise ValueError(f"pid {record['pid']!r} occurs in more than one record; load each source "
                             "with its own pid_prefix (e.g. 'nq-', 'math-') so pids stay unique")
        seen.add(record["pid"])
    return QueryDataset(records,
                        sum(d.skipped_without_answer for d in datasets),
                        sum(d.skipped_without_query for d in datasets))


def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "records in memory"


# ----------------------------------------------------------------------------------------------
# The grain iterator
# ----------------------------------------------------------------------------------------------


def _copy_batch(records: Sequence[QueryRecord]) -> list[QueryRecord]:
    return [dict(record) for record in records]


def make_query_iterator(source: QueryDataset | str | os.PathLike | Iterable[Mapping[str, Any]], *,
                        batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                        shard_index: int | None = None, shard_count: int | None = None,
                        drop_remainder: bool = False) -> grain.DatasetIterator:
    """A checkpointable iterator over this process's share of global batches (lists) of query dicts.

    Args:
      source: a `QueryDataset`, or anything `load_queries` reads.
      batch_size: records per global batch (all processes together); each process gets
        batch_size / shard_count of them.
      seed: shuffle seed (use the same seed on every process); each epoch is shuffled anew.
      shuffle: False keeps source order (evaluation, debugging).
      num_epochs: None repeats forever; batches run across epoch boundaries either way.
      shard_index, shard_count: this process's share of each batch; default `jax.process_index()` and
        `jax.process_count()`.
      drop_remainder: drop a final short batch (only matters when `num_epochs` is finite).

    Returns:
      A grain `DatasetIterator`; `get_state()` is a JSON-serialisable dict and `set_state()` on a
      freshly built iterator with the same arguments resumes exactly.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None (repeat forever), got {num_epochs}")
    dataset = source if isinstance(source, QueryDataset) else load_queries(source)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if batch_size % shard_count:
        raise ValueError(f"a batch of {batch_size} queries cannot be shared by {shard_count} processes; make the "
                         f"batch size a multiple of {shard_count}")
    if not dataset.records:
        raise ValueError("no training queries to iterate over")
    share = batch_size // shard_count
    mine = slice(shard_index * share, (shard_index + 1) * share)
    queries = grain.MapDataset.source(list(dataset.records))
    if shuffle:
        queries = queries.shuffle(seed=seed)
    queries = (queries.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder, batch_fn=_copy_batch)
               .map(lambda batch: batch[mine]))
    return iter(queries.to_iter_dataset(_IN_MEMORY_READ))
