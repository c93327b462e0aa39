"""The training mixture of the paper (SPEC section 3): NQ (search) and DeepMath-103K (math), shuffled,
written as one query file of our schema (`data.pipeline.load_queries`) with each row's scorer kind.

    python -m agentflow_jax.data.mixture --nq=nq/train.parquet --deepmath=deepmath/data \\
        --output=/data/nq_deepmath_train.jsonl
    python -m agentflow_jax.data.mixture --reference=combined_train.parquet --output=train.jsonl

Sources are local copies (parquet, a JSON list, or JSON lines; a directory means every such file in
it, in name order; several paths are comma-separated):

  --nq         Search-R1's NQ layout: `question` and `golden_answers`, or only the chat `prompt`
               (the question after its last "Question:") and `reward_model.ground_truth.target`; `id`
  --deepmath   DeepMath-103K: `question`, `final_answer`, `difficulty`, `topic` (the three
               `r1_solution_*` are not copied: they are ~95% of the data set's bytes)
  --reference  the AgentFlow reference's training file: `id`, `question`, `result` (golds joined
               with "; "), `source` ("nq" or "mathhard"), `extra_info.ground_truth`

A written row: {"pid", "query", "answer" (golds joined with "; "), "kind", "source", ...kept fields}.
Kinds: NQ rows get --nq_kind (default "judge", as the paper's GPT-4o judge: exact match would score
"William Shakespeare" against "Shakespeare" as wrong); math rows get --math_kind (default "auto": the
exact "math" scorer when the gold answer is a number, the judge otherwise, e.g. "\\frac{\\pi}{4}").

Rows that cannot be used (no question, no gold answer) are never dropped silently: they are counted
by source and reason, printed, and written with the kept counts to `<output>.report.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

from agentflow_jax.data.pipeline import DataFileError, join_gold_answers, read_rows
from agentflow_jax.rl.rewards import SCORE_KINDS, clean_math_answer, parse_number

LAYOUTS = ("nq", "deepmath", "reference")
MATH_KINDS = ("auto",) + SCORE_KINDS
_FILE_EXTENSIONS = (".parquet", ".json", ".jsonl")
# The columns each layout reads (parquet files are read for these columns only).
_COLUMNS = {
    "nq": ("id", "question", "golden_answers", "prompt", "reward_model", "data_source"),
    "deepmath": ("question", "final_answer", "difficulty", "topic"),
    "reference": ("id", "question", "result", "source", "extra_info"),
}
_IDENTIFYING = {"nq": ("question", "prompt"), "deepmath": ("final_answer",), "reference": ("result",)}


@dataclasses.dataclass
class SourceReport:
    """What one source gave: rows read, rows kept, rows rejected by reason, kept rows by scorer kind."""

    layout: str
    paths: list[str]
    read: int = 0
    kept: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    kinds: dict[str, int] = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "paths": self.paths, "read": self.read, "kept": self.kept,
                "rejected": dict(self.rejected), "kinds": dict(self.kinds)}


@dataclasses.dataclass(frozen=True)
class Kinds:
    """Scorer kinds: `search` for NQ rows (a SCORE_KINDS kind), `math` for math rows ("auto" or a kind)."""

    search: str = "judge"
    math: str = "auto"

    def __post_init__(self):
        if self.search not in SCORE_KINDS:
            raise ValueError(f"the NQ scorer kind must be one of {list(SCORE_KINDS)}, got {self.search!r}")
        if self.math not in MATH_KINDS:
            raise ValueError(f"the math scorer kind must be one of {list(MATH_KINDS)}, got {self.math!r}")

    def of_math(self, gold: str) -> str:
        """The kind of a math row: "math" for a numeric gold answer under "auto", else the judge."""
        if self.math != "auto":
            return self.math
        return "math" if parse_number(clean_math_answer(gold)) is not None else "judge"


# ----------------------------------------------------------------------------- reading

def source_files(path: str) -> list[str]:
    """The data files a source path names: the file, or a directory's parquet / JSON files by name."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(_FILE_EXTENSIONS))
        if not files:
            raise DataFileError(f"directory {path!r} has no {'/'.join(_FILE_EXTENSIONS)} files")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source file {path!r} does not exist")
    return [path]


def read_source_rows(path: str, layout: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every row of a file: where = "file:line" (JSON) or "file row N" (parquet)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = [c for c in _COLUMNS[layout] if c in parquet.schema_arrow.names]
        _check_layout(path, layout, columns)
        index = 0
        for batch in parquet.iter_batches(columns=columns, batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
        return
    rows = read_rows(path)
    if rows:
        _check_layout(path, layout, rows[0][1])
    for line, row in rows:
        yield f"{path}:{line}", row


def _check_layout(path: str, layout: str, columns: Sequence[str]) -> None:
    if not any(c in columns for c in _IDENTIFYING[layout]):
        raise DataFileError(f"{path} is not in the {layout} layout: it has none of the fields "
                            f"{list(_IDENTIFYING[layout])} (fields: {sorted(columns)})")


# ----------------------------------------------------------------------------- rows

def nq_row(row: Mapping[str, Any], index: int, kinds: Kinds) -> dict[str, Any] | str:
    """A Search-R1 NQ row in our schema, or the reason it cannot be used."""
    question = _text(row.get("question")) or _question_from_prompt(row.get("prompt"))
    golds = row.get("golden_answers")
    if golds is None:
        golds = ((row.get("reward_model") or {}).get("ground_truth") or {})
        golds = golds.get("target") if isinstance(golds, Mapping) else golds
    answer = join_gold_answers(_clean_golds(golds))
    if not question:
        return "no question"
    if not answer:
        return "no gold answer"
    return {"pid": f"nq-{index if row.get('id') is None else row['id']}", "query": question, "answer": answer,
            "kind": kinds.search, "source": "nq"}


def deepmath_row(row: Mapping[str, Any], index: int, kinds: Kinds) -> dict[str, Any] | str:
    """A DeepMath-103K row in our schema, or the reason it cannot be used."""
    question, answer = _text(row.get("question")), join_gold_answers(_clean_golds(row.get("final_answer")))
    if not question:
        return "no question"
    if not answer:
        return "no gold answer"
    record = {"pid": f"math-{index}", "query": question, "answer": answer, "kind": kinds.of_math(answer),
              "source": "deepmath"}
    record.update({k: row[k] for k in ("difficulty", "topic") if row.get(k) is not None})
    return record


def reference_row(row: Mapping[str, Any], index: int, kinds: Kinds) -> dict[str, Any] | str:
    """A row of the AgentFlow reference's training file in our schema, or the reason it cannot be used."""
    source = _text(row.get("source"))
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
    answer = join_gold_answers(_clean_golds(row.get("result") or extra.get("ground_truth")))
    question = _text(row.get("question"))
    if source not in ("nq", "mathhard"):
        return f"unknown source {source!r}"
    if not question:
        return "no question"
    if not answer:
        return "no gold answer"
    kind = kinds.search if source == "nq" else kinds.of_math(answer)
    return {"pid": f"{source}-{index if row.get('id') is None else row['id']}", "query": question, "answer": answer,
            "kind": kind, "source": "nq" if source == "nq" else "deepmath"}


CONVERTERS: dict[str, Callable[[Mapping[str, Any], int, Kinds], dict[str, Any] | str]] = {
    "nq": nq_row, "deepmath": deepmath_row, "reference": reference_row}


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _question_from_prompt(prompt: Any) -> str:
    """The question of a Search-R1 chat prompt: the last user message, after its last "Question:"."""
    if not isinstance(prompt, (list, tuple)):
        return ""
    users = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
    content = _text(users[-1]) if users else ""
    return content.rpartition("Question:")[2].strip() if "Question:" in content else content


def _clean_golds(golds: Any) -> Any:
    """Gold answers without empty or missing (None / NaN) entries; a scalar stays a scalar."""
    if isinstance(golds, (list, tuple)):
        return [g for g in golds if g is not None and g == g and str(g).strip()]
    if golds is None or (isinstance(golds, float) and golds != golds):
        return None
    return golds


# ----------------------------------------------------------------------------- the mixture

def build_mixture(sources: Sequence[tuple[str, str]], *, kinds: Kinds = Kinds(), seed: int | None = 0) -> tuple[
        list[dict[str, Any]], list[SourceReport]]:
    """The mixture's rows (shuffled with `seed`; None keeps source order) and one report per source.

    Args:
      sources: (layout, path) pairs; layout in LAYOUTS, path a file or a directory of files.
      kinds: the scorer kinds of NQ and math rows.
    Raises:
      DataFileError / FileNotFoundError: a missing file, a file in another layout, repeated pids.
    """
    rows, reports = [], []
    for layout, path in sources:
        if layout not in LAYOUTS:
            raise DataFileError(f"unknown source layout {layout!r}; expected one of {list(LAYOUTS)}")
        files = source_files(path)
        report = SourceReport(layout, files)
        for file in files:
            for where, row in read_source_rows(file, layout):
                converted = CONVERTERS[layout](row, report.read, kinds)
                report.read += 1
                if isinstance(converted, str):
                    report.rejected[converted] += 1
                    continue
                report.kept += 1
                report.kinds[converted["kind"]] += 1
                rows.append(converted)
        reports.append(report)
    seen = collections.Counter(r["pid"] for r in rows)
    repeated = [pid for pid, count in seen.items() if count > 1]
    if repeated:
        raise DataFileError(f"{len(repeated)} pids occur more than once (e.g. {repeated[0]!r}): give each source "
                            "once (two NQ files with the same ids would repeat questions)")
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows, reports


def write_mixture(rows: Sequence[Mapping[str, Any]], reports: Sequence[SourceReport], output: str) -> str:
    """Writes the rows as JSON lines to `output` and the reports to `<output>.report.json`; returns the
    report's path."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report_path = output + ".report.json"
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump({"output": output, "rows": len(rows), "sources": [r.to_json() for r in reports]}, f,
                  indent=1)
    return report_path


def format_report(reports: Sequence[SourceReport]) -> str:
    """One line per source: read, kept by kind, rejected by reason."""
    lines = []
    for r in reports:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items())) or "none"
        rejected = ", ".join(f"{reason}: {n}" for reason, n in sorted(r.rejected.items())) or "none"
        lines.append(f"{r.layout} ({len(r.paths)} file(s)): read {r.read}, kept {r.kept} ({kinds}); "
                     f"rejected {sum(r.rejected.values())} ({rejected})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    sources = [(layout, path) for layout, paths in (("nq", _NQ.value), ("deepmath", _DEEPMATH.value),
                                                    ("reference", _REFERENCE.value)) for path in paths or ()]
    if not sources:
        raise app.UsageError("give at least one source: --nq, --deepmath or --reference")
    if not _OUTPUT.value:
        raise app.UsageError("give --output=FILE.jsonl")
    rows, reports = build_mixture(sources, kinds=Kinds(_NQ_KIND.value, _MATH_KIND.value),
                                  seed=_MIXTURE_SEED.value if _SHUFFLE.value else None)
    report_path = write_mixture(rows, reports, _OUTPUT.value)
    print(format_report(reports))
    print(f"wrote {len(rows)} rows to {_OUTPUT.value}; report: {report_path}")


if __name__ == "__main__":  # flags only for the command, so importing the library defines none
    from absl import flags

    from agentflow_jax import cli

    _NQ = flags.DEFINE_list("nq", None, "NQ in Search-R1's layout: parquet / JSON files or directories.")
    _DEEPMATH = flags.DEFINE_list("deepmath", None, "DeepMath-103K: parquet / JSON files or directories.")
    _REFERENCE = flags.DEFINE_list("reference", None, "The AgentFlow reference's training file(s).")
    _OUTPUT = flags.DEFINE_string("output", None, "The training file to write (JSON lines).")
    _NQ_KIND = flags.DEFINE_enum("nq_kind", "judge", SCORE_KINDS, "Scorer kind of NQ rows.")
    _MATH_KIND = flags.DEFINE_enum("math_kind", "auto", MATH_KINDS, "Scorer kind of math rows (auto: 'math' for "
                                   "numeric gold answers, 'judge' otherwise).")
    _SHUFFLE = flags.DEFINE_bool("shuffle", True, "Shuffle the mixture (the paper's rows are shuffled).")
    _MIXTURE_SEED = flags.DEFINE_integer("mixture_seed", 0, "The shuffle's seed.")
    cli.run(main)
