"""The paper's ten benchmarks (SPEC section 4): names, scorers, the items used, the paper's accuracies,
and the reader of benchmark files.

A benchmark file is a JSON list of objects or JSON lines, in the reference implementation's format:
`pid` (or `idx` / `id`), `query` (or `question`), `answer` (a string, a number or a list of gold
answers; a list written as a string, "['james madison']", is read as the list), and for multiple
choice `choices` or `options` (a list of option texts, "A. ..." prefixes allowed). Other fields are
kept. The benchmark picks the scorer (`rl.rewards`):

  benchmark                              scorer   notes
  bamboogle, 2wiki, hotpotqa, musique    judge    the LLM judge; exact match and F1 are reported beside it
  gaia                                   judge
  aime24, amc23                          math     numeric equivalence
  gameof24                               game24   the exact checker; the gold is the puzzle's four numbers,
                                                  read from `numbers`, else a `question` that lists them,
                                                  else the first reference solution
  gpqa, medqa                            choice   option letter extraction, then comparison

`custom` takes each row's own `kind` (any scorer of `rl.rewards.SCORE_KINDS`), e.g. the toy world's
held-out questions; a row without one is an error.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import re
from typing import Any, Mapping

from agentflow_jax.data.pipeline import DataFileError, join_gold_answers, read_rows
from agentflow_jax.rl.rewards import SCORE_KINDS

PAPER_SYSTEMS = ("Qwen2.5-7B-Instruct alone", "GPT-4o alone", "AgentFlow, untrained planner",
                 "AgentFlow + Flow-GRPO")
"""The rows of the paper's Table 1 (SPEC section 4), in the order of `Benchmark.paper`."""

GROUPS = ("search", "agentic", "math", "science")
CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark of Table 1.

    Attributes:
      name: the command-line name ("2wiki").
      title: the table's column title ("2Wiki").
      group: one of GROUPS.
      kind: the scorer (`rl.rewards.SCORE_KINDS`).
      items: how many items the paper evaluates (the file's first `items`).
      paper: accuracy in % of each of PAPER_SYSTEMS.
    """

    name: str
    title: str
    group: str
    kind: str
    items: int
    paper: tuple[float, float, float, float]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("bamboogle", "Bamboogle", "search", "judge", 125, (12.0, 68.8, 58.4, 69.6)),
    Benchmark("2wiki", "2Wiki", "search", "judge", 100, (23.0, 49.5, 60.0, 77.2)),
    Benchmark("hotpotqa", "HotpotQA", "search", "judge", 100, (21.0, 54.0, 51.3, 57.0)),
    Benchmark("musique", "Musique", "search", "judge", 100, (6.0, 24.0, 19.2, 25.3)),
    Benchmark("gaia", "GAIA", "agentic", "judge", 127, (3.2, 17.3, 17.2, 33.1)),
    Benchmark("aime24", "AIME24", "math", "math", 30, (6.7, 13.3, 16.7, 40.0)),
    Benchmark("amc23", "AMC23", "math", "math", 40, (47.5, 60.0, 47.4, 61.5)),
    Benchmark("gameof24", "Game of 24", "math", "game24", 100, (33.0, 32.0, 31.0, 53.0)),
    Benchmark("gpqa", "GPQA", "science", "choice", 100, (34.0, 31.0, 37.0, 47.0)),
    Benchmark("medqa", "MedQA", "science", "choice", 100, (66.0, 60.0, 76.0, 80.0)),
)}
BENCHMARK_NAMES = tuple(BENCHMARKS) + (CUSTOM,)


def describe_benchmarks() -> str:
    """One line per benchmark (for --helpfull): name, scorer, items used."""
    lines = [f"{b.name} ({b.title}, {b.group}: {b.kind} scorer, first {b.items} items)" for b in BENCHMARKS.values()]
    return "; ".join(lines + [f"{CUSTOM} (each row's own 'kind')"])


def load_benchmark(path: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """The items of a benchmark file as records for `evaluate`: `pid`, `query`, `answer` (golds joined
    with "; "), `kind`, `choices` when given, and every other field of the row.

    Raises:
      FileNotFoundError: no such file.
      DataFileError: the file is not JSON / JSON lines of objects, or a row lacks what its scorer
        needs (the message names the file and the row's line).

    Pids stay unique: a pid seen before gets "#n" for its n-th repeat (the reference's MedQA file
    repeats pids), so a rerun knows which items it has finished.
    """
    if name not in BENCHMARK_NAMES:
        raise DataFileError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARK_NAMES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {os.fspath(path)!r} does not exist")
    records, seen = [], collections.Counter()
    for index, (line, row) in enumerate(read_rows(path)):
        record = _record(row, index, name, f"{os.fspath(path)}:{line}")
        seen[record["pid"]] += 1
        if seen[record["pid"]] > 1:  # the reference's MedQA file repeats pids: the n-th repeat is "pid#n"
            record["pid"] = f"{record['pid']}#{seen[record['pid']] - 1}"
        records.append(record)
    if not records:
        raise DataFileError(f"{os.fspath(path)} holds no items")
    return records


def _record(row: Mapping[str, Any], index: int, name: str, where: str) -> dict[str, Any]:
    """One row in our schema (module docstring); DataFileError names `where` (file:line)."""
    query = next((str(row[k]).strip() for k in ("query", "question") if row.get(k) not in (None, "")), "")
    if not query:
        raise DataFileError(f"{where}: the item has no 'query' (or 'question')")
    kind = row.get("kind") if name == CUSTOM else BENCHMARKS[name].kind
    if kind not in SCORE_KINDS:
        raise DataFileError(f"{where}: the item's 'kind' is {kind!r}; a {CUSTOM} benchmark needs one of "
                            f"{list(SCORE_KINDS)} on every row")
    pid = next((row[k] for k in ("pid", "idx", "id") if row.get(k) not in (None, "")), index)
    record = {k: v for k, v in row.items() if k not in ("question", "options")}
    record.update(pid=str(pid), query=query, kind=kind)
    choices = next((row[k] for k in ("choices", "options") if row.get(k) is not None), None)
    if choices is not None:
        record["choices"] = _as_list(choices, where, "choices")
    if kind == "game24":
        record["answer"] = " ".join(map(str, _game24_numbers(row, where)))
        if row.get("answer") is not None:
            record["solutions"] = row["answer"]
    else:
        record["answer"] = join_gold_answers(_literal_list(row.get("answer")))
    if not record["answer"]:
        raise DataFileError(f"{where}: the item has no 'answer'")
    if kind == "choice" and "choices" not in record:
        raise DataFileError(f"{where}: a multiple-choice item needs 'choices' or 'options'")
    return record


def _literal_list(value: Any) -> Any:
    """A list written as a string ("['a', 'b']") as the list; anything else unchanged."""
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _as_list(value: Any, where: str, field: str) -> list[str] | dict[str, str]:
    value = _literal_list(value)
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, (list, tuple)) or not value:
        raise DataFileError(f"{where}: '{field}' must be a non-empty list of option texts, got {value!r}")
    return [str(v).strip() for v in value]


def _game24_numbers(row: Mapping[str, Any], where: str) -> list[int]:
    """The puzzle's numbers: `numbers`, else a `question` listing them, else the first solution's integers."""
    for source in (row.get("numbers"), row.get("question")):
        value = _literal_list(source)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            return list(value)
    solutions = _literal_list(row.get("answer"))
    first = solutions[0] if isinstance(solutions, (list, tuple)) and solutions else solutions
    numbers = [int(n) for n in re.findall(r"\d+", str(first or ""))]
    if not numbers:
        raise DataFileError(f"{where}: a Game of 24 item needs its numbers ('numbers', a 'question' such as "
                            "[4, 7, 8, 8], or a reference solution in 'answer')")
    return numbers
