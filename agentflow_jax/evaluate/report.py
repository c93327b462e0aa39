"""Summaries of benchmark runs, the paper's Table 1 with our row beside it, and a bar chart.

    summary = summarize("aime24", runs)            # runs: per-sample item records (runner.run_benchmark)
    write_summary(summary, "runs/eval/aime24")     # runs/eval/aime24/summary.json
    write_table_and_chart("runs/eval")             # table.md, chart.png, summary.json over every benchmark there

A summary (JSON): benchmark, title, group, kind, items, samples; accuracy (fraction, mean over
samples), accuracy_std (sample standard deviation over samples, 0 for one), accuracy_per_sample;
the means over samples of exact / f1 (open QA), turns, seconds, tagged (replies with <answer>),
tool use (fraction of trajectories calling each tool), stop reasons, accuracy and tool choice per
qtype when items have them; paper: the paper's accuracies in % (named benchmarks only).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from agentflow_jax.data.benchmarks import BENCHMARKS, GROUPS, PAPER_SYSTEMS

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
CHART_FILE = "chart.png"
OURS = "ours (this run)"


def summarize(name: str, runs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The summary of `runs` (one list of item records per sample) of benchmark `name` (module docstring)."""
    if not runs or not runs[0]:
        raise ValueError("summarize needs at least one sample with at least one item")
    benchmark = BENCHMARKS.get(name)
    per_sample = [float(np.mean([r["correct"] for r in run])) for run in runs]
    records = [r for run in runs for r in run]
    summary: dict[str, Any] = {
        "benchmark": name, "title": benchmark.title if benchmark else name,
        "group": benchmark.group if benchmark else "custom",
        "kind": benchmark.kind if benchmark else sorted({r["kind"] for r in records}),
        "items": len(runs[0]), "samples": len(runs),
        "accuracy": float(np.mean(per_sample)),
        "accuracy_std": float(np.std(per_sample, ddof=1)) if len(runs) > 1 else 0.0,
        "accuracy_per_sample": per_sample,
    }
    for key in ("exact", "f1"):
        if any(key in r for r in records):
            summary[key] = _mean_over_samples(runs, lambda r: r.get(key, 0.0))
    summary.update(turns=_mean_over_samples(runs, lambda r: r["turns"]),
                   seconds=_mean_over_samples(runs, lambda r: r["seconds"]),
                   tagged=_mean_over_samples(runs, lambda r: r["tagged"]))
    tools = collections.Counter(tool for r in records for tool in set(r["tools"]) if tool is not None)
    summary["tool_use"] = {tool: count / len(records) for tool, count in sorted(tools.items())}
    reasons = collections.Counter(r["stop_reason"] for r in records)
    summary["stop_reasons"] = {reason: count / len(records) for reason, count in sorted(reasons.items())}
    for qtype in sorted({r["qtype"] for r in records if "qtype" in r}):
        rows = [r for r in records if r.get("qtype") == qtype]
        summary[f"accuracy/{qtype}"] = float(np.mean([r["correct"] for r in rows]))
        with_tools = [r for r in rows if "expected_tools" in r]
        if with_tools:
            summary[f"tool_choice/{qtype}"] = float(np.mean([r["tools"] == r["expected_tools"] for r in with_tools]))
    if benchmark:
        summary["paper"] = dict(zip(PAPER_SYSTEMS, benchmark.paper))
    return summary


def _mean_over_samples(runs: Sequence[Sequence[Mapping[str, Any]]], value) -> float:
    return float(np.mean([np.mean([float(value(r)) for r in run]) for run in runs]))


def write_summary(summary: Mapping[str, Any], directory: str) -> str:
    """Writes `<directory>/summary.json`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SUMMARY_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return path


def read_summaries(output_dir: str) -> list[dict[str, Any]]:
    """The benchmark summaries under `output_dir` (`<output_dir>/<benchmark>/summary.json`), in the
    paper's column order, then other benchmarks by name."""
    found = []
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else ():
        path = os.path.join(output_dir, name, SUMMARY_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found.append(json.load(f))
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(found, key=lambda s: (order.get(s["benchmark"], len(order)), s["benchmark"]))


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Accuracy (%) of the paper's four systems and of ours on the benchmarks of `summaries`, with the
    group averages (search, math, science) where every benchmark of a group is present."""
    columns = [s["title"] for s in summaries]
    groups = [g for g in GROUPS if g != "agentic" and _group_members(g) and
              _group_members(g) <= {s["benchmark"] for s in summaries}]
    header = ["system"] + columns + [f"{g} avg" for g in groups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, system in enumerate(PAPER_SYSTEMS):
        cells = [f"{s['paper'][system]:.1f}" if "paper" in s else "—" for s in summaries]
        averages = [np.mean([BENCHMARKS[b].paper[index] for b in _group_members(g)]) for g in groups]
        lines.append("| " + " | ".join([system] + cells + [f"{a:.1f}" for a in averages]) + " |")
    ours = [_percent(s) for s in summaries]
    by_name = {s["benchmark"]: s for s in summaries}
    averages = [np.mean([100 * by_name[b]["accuracy"] for b in _group_members(g)]) for g in groups]
    lines.append("| " + " | ".join([f"**{OURS}**"] + ours + [f"{a:.1f}" for a in averages]) + " |")
    notes = [f"{s['title']}: {s['items']} items x {s['samples']} sample(s)" for s in summaries]
    legend = "Accuracy in %; ours: mean ± standard deviation over samples. "
    return "\n".join(lines) + "\n\n" + legend + "; ".join(notes) + "\n"


def _group_members(group: str) -> set[str]:
    return {b.name for b in BENCHMARKS.values() if b.group == group}


def _percent(summary: Mapping[str, Any]) -> str:
    text = f"{100 * summary['accuracy']:.1f}"
    return text + f" ± {100 * summary['accuracy_std']:.1f}" if summary["samples"] > 1 else text


def bar_chart(summaries: Sequence[Mapping[str, Any]], path: str) -> str:
    """Grouped bars per benchmark: the paper's untrained and Flow-GRPO planners and ours (with the
    standard deviation over samples as an error bar); writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = PAPER_SYSTEMS[2:] if any("paper" in s for s in summaries) else ()
    x = np.arange(len(summaries))
    width = 0.8 / (len(systems) + 1)
    offsets = [(i - len(systems) / 2) * width for i in range(len(systems) + 1)]  # bars centred on each tick
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(summaries) + 2), 3.8))
    for offset, system in zip(offsets, systems):
        values = [s["paper"][system] if "paper" in s else np.nan for s in summaries]
        ax.bar(x + offset, values, width, label=f"paper: {system}", alpha=0.6)
    ax.bar(x + offsets[-1], [100 * s["accuracy"] for s in summaries], width,
           yerr=[100 * s["accuracy_std"] for s in summaries], capsize=3, label=OURS, color="black")
    ax.set_xticks(x, [s["title"] for s in summaries], rotation=20)
    ax.set_xlim(-0.6, len(summaries) - 0.4)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table_and_chart(output_dir: str) -> dict[str, str]:
    """table.md, chart.png and summary.json (every benchmark summary) in `output_dir`, over every
    benchmark evaluated there so far; returns their paths by name."""
    summaries = read_summaries(output_dir)
    if not summaries:
        raise ValueError(f"no benchmark summaries under {output_dir}")
    paths = {"table": os.path.join(output_dir, TABLE_FILE), "chart": os.path.join(output_dir, CHART_FILE),
             "summary": os.path.join(output_dir, SUMMARY_FILE)}
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(markdown_table(summaries))
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump({s["benchmark"]: s for s in summaries}, f, indent=1)
    bar_chart(summaries, paths["chart"])
    return paths
