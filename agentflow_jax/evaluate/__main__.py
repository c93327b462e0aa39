"""Evaluate the agent on the paper's benchmarks (SPEC section 4, Table 1).

    python -m agentflow_jax.evaluate --config=experiments/configs/qwen2_5_7b_flow_grpo.py \\
        --benchmark=aime24 --data=/data/aime24.json [--limit=N] [--samples=K] \\
        [--checkpoint=runs/qwen2_5_7b_flow_grpo/checkpoints [--step=S] | --model=DIR]
    python -m agentflow_jax.evaluate --config=FILE --all --data_dir=/data/benchmarks

The config is a training config (read and checked as training reads it): the planner's model and
tokenizer, the frozen modules' and judge's engines (`engines`), the tools, the frozen modules'
sampling (`rollout`), the evaluation batch size and planner temperature (`eval`). The loop limits
are the paper's evaluation limits (10 turns, 300 s per query, each query timed on its own) unless
--max_turns / --max_time_s say otherwise. Benchmark files: `data.benchmarks` (--benchmark=custom:
each row names its scorer `kind`, e.g. the toy world's held-out questions). --all reads
DIR/<name>.json, DIR/<name>.jsonl or DIR/<name>/data/data.json (the reference's test/ layout) for
each benchmark found.

Writes under --output_dir (default <workdir>/eval): <benchmark>/items.sample<k>.jsonl (one line per
finished item: a rerun skips them), <benchmark>/summary.json, and over every benchmark evaluated
there so far summary.json, table.md (the paper's numbers beside ours) and chart.png.
"""

from __future__ import annotations

import os

from absl import app, flags

from agentflow_jax import cli
from agentflow_jax.data.benchmarks import BENCHMARK_NAMES, BENCHMARKS, CUSTOM, describe_benchmarks, load_benchmark
from agentflow_jax.errors import UserError
from agentflow_jax.evaluate.agent import PlannerSource, build_agent
from agentflow_jax.evaluate.report import summarize, write_summary, write_table_and_chart
from agentflow_jax.evaluate.runner import run_benchmark
from agentflow_jax.experiment import read_experiment

_CONFIG = cli.config_flag()
_BENCHMARK = flags.DEFINE_enum("benchmark", None, BENCHMARK_NAMES, "The benchmark to run: " + describe_benchmarks())
_DATA = flags.DEFINE_string("data", None, "The benchmark's file: a JSON list or JSON lines of items.")
_ALL = flags.DEFINE_bool("all", False, "Run every benchmark whose file is in --data_dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory of benchmark files for --all.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate the first N items (default: the paper's count for a named "
                              "benchmark, every item for custom).", lower_bound=1)
_SAMPLES = flags.DEFINE_integer("samples", 1, "Independent runs over the items; the summary reports their mean "
                                "and standard deviation.", lower_bound=1)
_MODEL = flags.DEFINE_string("model", None, "The planner's HF-format directory (default: the config's model.path).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training run's checkpoint directory: the planner's "
                                  "weights are restored from it.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: <workdir>/eval).")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 10, "Planner turns per query at most (the paper's evaluation: 10).",
                                  lower_bound=1)
_MAX_TIME_S = flags.DEFINE_float("max_time_s", 300.0, "Seconds per query, each timed on its own (the paper's "
                                 "evaluation: 300).", lower_bound=1e-3)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def benchmark_files() -> list[tuple[str, str]]:
    """(benchmark name, file) pairs the flags ask for; raises UsageError for a wrong combination."""
    if _ALL.value == (_BENCHMARK.value is not None):
        raise app.UsageError("give either --benchmark=NAME --data=FILE or --all --data_dir=DIR")
    if not _ALL.value:
        if not _DATA.value:
            raise app.UsageError(f"--benchmark={_BENCHMARK.value} needs --data=FILE")
        return [(_BENCHMARK.value, _DATA.value)]
    if not _DATA_DIR.value:
        raise app.UsageError("--all needs --data_dir=DIR")
    if not os.path.isdir(_DATA_DIR.value):
        raise FileNotFoundError(f"--data_dir {_DATA_DIR.value!r} is not a directory")
    found = []
    for name in BENCHMARKS:
        candidates = [os.path.join(_DATA_DIR.value, *parts) for parts in
                      ((f"{name}.json",), (f"{name}.jsonl",), (name, "data", "data.json"))]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            print(f"{name}: no file in {_DATA_DIR.value} (looked for {', '.join(candidates)}); skipped")
        else:
            found.append((name, path))
    if not found:
        raise UserError(f"--data_dir {_DATA_DIR.value!r} holds no benchmark file")
    return found


def run_name(benchmark: str, path: str) -> str:
    """The result directory's name: the benchmark, or for custom the data file's name without extension."""
    return os.path.splitext(os.path.basename(path))[0] if benchmark == CUSTOM else benchmark


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config, source = cli.load_config(_CONFIG)
    experiment = read_experiment(config, source=source, extra_sections=("toy",))
    jobs = []
    for benchmark, path in benchmark_files():  # every file is read (and checked) before any model loads
        items = load_benchmark(path, benchmark)
        limit = _LIMIT.value or (BENCHMARKS[benchmark].items if benchmark in BENCHMARKS else len(items))
        jobs.append((run_name(benchmark, path), items[:limit]))
    agent = build_agent(experiment, PlannerSource(_MODEL.value, _CHECKPOINT.value, _STEP.value),
                        [item for _, items in jobs for item in items], max_turns=_MAX_TURNS.value,
                        max_time_s=_MAX_TIME_S.value)
    output_dir = _OUTPUT_DIR.value or experiment.path("eval")
    for name, items in jobs:
        runs = run_benchmark(items, agent, out_dir=os.path.join(output_dir, name), samples=_SAMPLES.value,
                             batch_size=experiment.eval.batch_size, progress=_PROGRESS.value, description=name)
        summary = summarize(name, runs)
        write_summary(summary, os.path.join(output_dir, name))
        paper = summary.get("paper", {}).get("AgentFlow + Flow-GRPO")
        print(f"{name}: accuracy {100 * summary['accuracy']:.1f}% ± {100 * summary['accuracy_std']:.1f} "
              f"({summary['items']} items x {summary['samples']} sample(s))"
              + (f"; the paper's AgentFlow + Flow-GRPO: {paper:.1f}%" if paper is not None else ""))
    paths = write_table_and_chart(output_dir)
    with open(paths["table"], encoding="utf-8") as f:
        print(f.read())
    print(f"table: {paths['table']}; chart: {paths['chart']}; summary: {paths['summary']}")


if __name__ == "__main__":
    cli.run(main)
