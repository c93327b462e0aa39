"""Solve one question with the AgentFlow loop and print every turn.

    python -m agentflow_jax.solve --model=/path/to/qwen2.5-7b-instruct --tools=python,search \\
        --search_corpus=wiki.jsonl "In what year was the city of Velmora founded?"
    python -m agentflow_jax.solve --engine=openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct \\
        --tools=python,generalist --json=trajectory.json "What is 4817 times 36?"

`--model` loads a local HF-format Qwen2 directory into the in-process JAX engine; `--engine` takes
any engine spec (`openai:URL,MODEL`, `jax:DIR`). The planner uses `--planner_engine` when given,
else the same engine.
"""

from __future__ import annotations

import json
import sys
import textwrap

from absl import app, flags

from agentflow_jax import cli
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, Trajectory, rollout_batch
from agentflow_jax.engines import Engine, engine_from_spec
from agentflow_jax.tools import build_toolbox

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Local HF-format Qwen2 directory (in-process JAX engine).")
flags.DEFINE_string("engine", None, "Engine spec instead of --model: 'openai:URL,MODEL' or 'jax:DIR'.")
flags.DEFINE_string("planner_engine", None, "Engine spec for the planner (default: the same engine).")
flags.DEFINE_string("tokenizer", None, "Tokenizer for --model when the directory has none ('qwen2.5', a dir, "
                    "or a SentencePiece .model).")
flags.DEFINE_list("tools", ["python", "generalist"], "Tools by short name: python, generalist, search, google, "
                  "wikipedia, web_rag.")
flags.DEFINE_string("search_corpus", None, "JSON-lines corpus for the 'search' tool (BM25, in-process).")
flags.DEFINE_string("retrieval_url", None, "A /retrieve endpoint for the 'search' tool instead of a corpus.")
flags.DEFINE_integer("max_turns", 10, "Planner turns at most (evaluation setting of the paper).")
flags.DEFINE_float("max_time_s", 300.0, "Time limit of the whole loop in seconds.")
flags.DEFINE_float("tool_timeout_s", 120.0, "Time limit of one tool call in seconds.")
flags.DEFINE_integer("max_new_tokens", 1024, "Tokens per model call at most.")
flags.DEFINE_float("planner_temperature", 0.0, "Planner sampling temperature (0 = greedy).")
flags.DEFINE_integer("max_cache_length", 8192, "KV-cache slots per sequence for --model.")
flags.DEFINE_string("json", None, "Write the whole trajectory as JSON to this file ('-' for stdout).")


def _engines() -> tuple[Engine, Engine]:
    if (FLAGS.model is None) == (FLAGS.engine is None):
        raise app.UsageError("give exactly one of --model=DIR or --engine=SPEC")
    options = {}
    if FLAGS.model is not None:
        spec = f"jax:{FLAGS.model}"
        options = {"max_cache_length": FLAGS.max_cache_length}
        if FLAGS.tokenizer:
            options["tokenizer"] = FLAGS.tokenizer
    else:
        spec = FLAGS.engine
    frozen = engine_from_spec(spec, **options)
    planner = engine_from_spec(FLAGS.planner_engine) if FLAGS.planner_engine else frozen
    return planner, frozen


def _tool_config() -> dict:
    config: dict = {"call_timeout_s": FLAGS.tool_timeout_s}
    if "search" in FLAGS.tools:
        if (FLAGS.search_corpus is None) == (FLAGS.retrieval_url is None):
            raise app.UsageError("the 'search' tool needs exactly one of --search_corpus or --retrieval_url")
        config["search"] = ({"corpus_path": FLAGS.search_corpus} if FLAGS.search_corpus
                            else {"url": FLAGS.retrieval_url})
    return config


def format_trajectory(trajectory: Trajectory, *, result_chars: int = 600) -> str:
    """Human-readable account of a trajectory: each turn's step, command, result and verdict."""
    lines = [f"Query: {trajectory.memory.query}", f"Analysis: {trajectory.memory.query_analysis}", ""]
    for i, turn in enumerate(trajectory.turns, 1):
        step = turn.planner.step
        tool = step.tool_name or f"{step.raw_tool_name or '?'} (not a tool)"
        lines += [f"== Turn {i} ==", f"Tool: {tool}", f"Sub-goal: {step.sub_goal}"]
        if step.parse_error:
            lines.append(f"Planner output problem: {step.parse_error}")
        if turn.command is not None:
            lines.append(f"Command: {json.dumps(dict(turn.command.arguments), ensure_ascii=False)}")
        result = turn.result.as_text()
        if len(result) > result_chars:
            result = result[:result_chars] + f"... [{len(result) - result_chars} more chars]"
        lines += ["Result:", textwrap.indent(result, "  "), f"Verdict: {'STOP' if turn.stop else 'CONTINUE'}", ""]
    lines += [f"Stopped by: {trajectory.stop_reason}", f"Final output: {trajectory.generator_text.strip()}",
              f"Answer: {trajectory.answer}"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    question = " ".join(argv[1:]).strip()
    if not question:
        raise app.UsageError('give the question as the last argument, e.g. solve --model=DIR "What is 2+2?"')
    planner, frozen = _engines()
    toolbox = build_toolbox(FLAGS.tools, engine=frozen, config=_tool_config())
    calls = SamplingParams(max_new_tokens=FLAGS.max_new_tokens)
    config = RolloutConfig(max_turns=FLAGS.max_turns, max_time_s=FLAGS.max_time_s,
                           planner=SamplingParams(max_new_tokens=FLAGS.max_new_tokens,
                                                  temperature=FLAGS.planner_temperature,
                                                  top_p=0.99 if FLAGS.planner_temperature > 0 else 1.0),
                           analysis=calls, executor=calls, verifier=calls, generator=calls)
    (trajectory,) = rollout_batch([question], n=1, planner=planner, frozen=frozen, toolbox=toolbox, config=config)
    print(format_trajectory(trajectory))
    if FLAGS.json:
        text = json.dumps(json.loads(trajectory.to_json()), ensure_ascii=False, indent=2)
        if FLAGS.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(FLAGS.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    cli.run(main)
