"""Solve one question with the AgentFlow loop, printing every step as it happens.

    python -m agentflow_jax.solve --model=/models/Qwen2.5-1.5B-Instruct --tools=python,search \\
        --search_corpus=wiki.jsonl "In what year was the city of Velmora founded?"
    python -m agentflow_jax.solve --engine=openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct \\
        --planner_engine=jax:runs/qwen2_5_1_5b_sft/model_hf --role_engine=verifier=jax:/models/Qwen2.5-0.5B-Instruct \\
        --tools=python,generalist --json=trajectory.json "What is 4817 times 36?"

Engines: `--model=DIR` (a local HF-format Qwen2 directory, in-process JAX engine) or `--engine=SPEC`
(any engine spec: `openai:URL,MODEL`, `jax:DIR`, ...) serves every module; `--planner_engine=SPEC`
replaces it for the planner and `--role_engine=ROLE=SPEC` (repeatable) for one frozen role:
analysis, executor, verifier, generator, or tools (the LLM inside the tools). One engine is built
per distinct spec.

Output: the query analysis, then for each turn the planner's step (tool, sub-goal), the command and
the tool's result, and the verifier's verdict, each printed (and flushed) when it happens; the
final answer last. `--json=FILE` also writes the whole trajectory as JSON; with `--json=-` the JSON
goes to stdout and the turns to stderr.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any, Mapping, Sequence, TextIO

from absl import app, flags

from agentflow_jax import cli
from agentflow_jax.agent import modules
from agentflow_jax.agent.rollout import (FrozenEngines, PlannerCall, RolloutConfig, RolloutEvent, SamplingParams,
                                         Trajectory, rollout_batch)
from agentflow_jax.engines import Engine, engine_from_spec
from agentflow_jax.experiment import FROZEN_ROLES
from agentflow_jax.tools import build_toolbox
from agentflow_jax.tools.base import ToolCall, Toolbox, ToolResult

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Local HF-format Qwen2 directory (in-process JAX engine) serving every module.")
flags.DEFINE_string("engine", None, "Engine spec instead of --model: 'openai:URL,MODEL' or 'jax:DIR'.")
flags.DEFINE_string("planner_engine", None, "Engine spec for the planner (default: the same engine).")
flags.DEFINE_multi_string("role_engine", [], "ROLE=SPEC: the engine of one frozen role (analysis, executor, "
                          "verifier, generator, tools); repeat the flag for several roles.")
flags.DEFINE_string("tokenizer", None, "Tokenizer for --model when the directory has none ('qwen2.5', a dir, "
                    "or a SentencePiece .model).")
flags.DEFINE_list("tools", ["python", "generalist"], "Tools by short name: python, generalist, search, google, "
                  "wikipedia, web_rag.")
flags.DEFINE_string("search_corpus", None, "JSON-lines corpus for the 'search' tool (BM25, in-process).")
flags.DEFINE_string("retrieval_url", None, "A /retrieve endpoint for the 'search' tool instead of a corpus.")
flags.DEFINE_enum("python_isolation", "full", ["full", "best_effort", "none"],
                  "The Python tool's sandbox: 'full' refuses to run without every isolation layer; 'best_effort' "
                  "runs with what the host allows and says what is missing.")
flags.DEFINE_integer("max_turns", 10, "Planner turns at most (evaluation setting of the paper).")
flags.DEFINE_float("max_time_s", 300.0, "Time limit of the whole loop in seconds.")
flags.DEFINE_float("tool_timeout_s", 120.0, "Time limit of one tool call in seconds.")
flags.DEFINE_integer("max_new_tokens", 1024, "Tokens per model call at most.")
flags.DEFINE_float("planner_temperature", 0.0, "Planner sampling temperature (0 = greedy).")
flags.DEFINE_integer("max_cache_length", 8192, "KV-cache slots per sequence for --model.")
flags.DEFINE_string("json", None, "Write the whole trajectory as JSON to this file ('-': stdout, the turns to stderr).")

RESULT_CHARS = 600


# ------------------------------------------------------------------------------------------------
# What is printed: one function per step, shared by the live printer and `format_trajectory`
# ------------------------------------------------------------------------------------------------


def analysis_lines(query: str, analysis: str) -> list[str]:
    return [f"Query: {query}", f"Analysis: {analysis}", ""]


def planner_lines(turn: int, call: PlannerCall) -> list[str]:
    step = call.step
    tool = step.tool_name or f"{step.raw_tool_name or '?'} (not a tool)"
    lines = [f"== Turn {turn} ==", f"Tool: {tool}", f"Sub-goal: {step.sub_goal}"]
    if step.parse_error:
        lines.append(f"Planner output problem: {step.parse_error}")
    return lines


def result_lines(command: ToolCall | None, result: ToolResult, *, result_chars: int = RESULT_CHARS) -> list[str]:
    lines = []
    if command is not None:
        lines.append(f"Command: {json.dumps(dict(command.arguments), ensure_ascii=False)}")
    text = result.as_text()
    if len(text) > result_chars:
        text = text[:result_chars] + f"... [{len(text) - result_chars} more chars]"
    return lines + ["Result:", textwrap.indent(text, "  ")]


def verdict_lines(stop: bool) -> list[str]:
    return [f"Verdict: {'STOP' if stop else 'CONTINUE'}", ""]


def answer_lines(trajectory: Trajectory) -> list[str]:
    return [f"Stopped by: {trajectory.stop_reason}", f"Final output: {trajectory.generator_text.strip()}",
            f"Answer: {trajectory.answer}"]


def format_trajectory(trajectory: Trajectory, *, result_chars: int = RESULT_CHARS) -> str:
    """Human-readable account of a finished trajectory: each turn's step, command, result and verdict
    (the same lines `TurnPrinter` writes as they happen)."""
    lines = analysis_lines(trajectory.memory.query, trajectory.memory.query_analysis)
    for i, turn in enumerate(trajectory.turns, 1):
        lines += planner_lines(i, turn.planner) + result_lines(turn.command, turn.result, result_chars=result_chars)
        lines += verdict_lines(turn.stop)
    return "\n".join(lines + answer_lines(trajectory))


class TurnPrinter:
    """A rollout observer (`rollout_batch(..., observer=)`) that writes each step of one trajectory to
    `out` as soon as it happens, and flushes, so a person (or a pipe) sees the agent work."""

    def __init__(self, query: str, out: TextIO, *, trajectory: int = 0, result_chars: int = RESULT_CHARS):
        self.query, self.out, self.trajectory, self.result_chars = query, out, trajectory, result_chars

    def __call__(self, event: RolloutEvent) -> None:
        if event.trajectory != self.trajectory:
            return
        if event.kind == "analysis":
            lines = analysis_lines(self.query, modules.parse_query_analysis(event.data))
        elif event.kind == "planner":
            lines = planner_lines(event.turn, event.data)
        elif event.kind == "result":
            lines = result_lines(*event.data, result_chars=self.result_chars)
        elif event.kind == "verdict":
            lines = verdict_lines(event.data)
        else:
            lines = answer_lines(event.data)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def solve(question: str, *, planner: Engine, frozen: Engine | FrozenEngines, toolbox: Toolbox, config: RolloutConfig,
          out: TextIO | None = None) -> Trajectory:
    """Runs the agent on one question, writing each step to `out` (default: `sys.stdout` at the call)
    as it happens; returns the finished trajectory. `frozen`: one engine for every frozen module, or
    one per module; the tools' LLM is the toolbox's."""
    printer = TurnPrinter(question, sys.stdout if out is None else out)
    (trajectory,) = rollout_batch([question], n=1, planner=planner, frozen=frozen, toolbox=toolbox, config=config,
                                  observer=printer)
    return trajectory


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def role_specs(default: str, overrides: Sequence[str]) -> dict[str, str]:
    """The engine spec of every frozen role: `default`, or the spec of a `ROLE=SPEC` override."""
    specs = dict.fromkeys(FROZEN_ROLES, default)
    for override in overrides:
        role, sep, spec = override.partition("=")
        if not sep or role.strip() not in FROZEN_ROLES or not spec.strip():
            raise app.UsageError(f"--role_engine={override!r}: expected ROLE=SPEC with ROLE in {list(FROZEN_ROLES)}")
        specs[role.strip()] = spec.strip()
    return specs


def build_engines(default: str, planner: str | None, roles: Mapping[str, str],
                  options: Mapping[str, Mapping[str, Any]]) -> tuple[Engine, FrozenEngines, Engine]:
    """(planner engine, the frozen modules' engines, the tools' LLM engine), one engine per distinct
    spec; `options[spec]` are that spec's constructor options."""
    built: dict[str, Engine] = {}

    def engine(spec: str) -> Engine:
        if spec not in built:
            built[spec] = engine_from_spec(spec, **options.get(spec, {}))
        return built[spec]

    frozen = FrozenEngines(**{role: engine(roles[role]) for role in FROZEN_ROLES if role != "tools"})
    return engine(planner or default), frozen, engine(roles["tools"])


def _engines() -> tuple[Engine, FrozenEngines, Engine]:
    if (FLAGS.model is None) == (FLAGS.engine is None):
        raise app.UsageError("give exactly one of --model=DIR or --engine=SPEC")
    options = {}
    if FLAGS.model is not None:
        default = f"jax:{FLAGS.model}"
        options[default] = {"max_cache_length": FLAGS.max_cache_length}
        if FLAGS.tokenizer:
            options[default]["tokenizer"] = FLAGS.tokenizer
    else:
        default = FLAGS.engine
    return build_engines(default, FLAGS.planner_engine, role_specs(default, FLAGS.role_engine), options)


def _tool_config() -> dict:
    config: dict = {"call_timeout_s": FLAGS.tool_timeout_s}
    if "python" in FLAGS.tools:
        config["python"] = {"require": FLAGS.python_isolation}
    if "search" in FLAGS.tools:
        if (FLAGS.search_corpus is None) == (FLAGS.retrieval_url is None):
            raise app.UsageError("the 'search' tool needs exactly one of --search_corpus or --retrieval_url")
        config["search"] = ({"corpus_path": FLAGS.search_corpus} if FLAGS.search_corpus
                            else {"url": FLAGS.retrieval_url})
    return config


def main(argv: list[str]) -> None:
    question = " ".join(argv[1:]).strip()
    if not question:
        raise app.UsageError('give the question as the last argument, e.g. solve --model=DIR "What is 2+2?"')
    planner, frozen, tools_engine = _engines()
    toolbox = build_toolbox(FLAGS.tools, engine=tools_engine, config=_tool_config())
    calls = SamplingParams(max_new_tokens=FLAGS.max_new_tokens)
    config = RolloutConfig(max_turns=FLAGS.max_turns, max_time_s=FLAGS.max_time_s,
                           planner=SamplingParams(max_new_tokens=FLAGS.max_new_tokens,
                                                  temperature=FLAGS.planner_temperature,
                                                  top_p=0.99 if FLAGS.planner_temperature > 0 else 1.0),
                           analysis=calls, executor=calls, verifier=calls, generator=calls)
    trajectory = solve(question, planner=planner, frozen=frozen, toolbox=toolbox, config=config,
                       out=sys.stderr if FLAGS.json == "-" else sys.stdout)
    if FLAGS.json:
        text = json.dumps(json.loads(trajectory.to_json()), ensure_ascii=False, indent=2)
        if FLAGS.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(FLAGS.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    cli.run(main)
