"""Batched rollout vs the same trajectories run one at a time (target speed-up >= 8x).

A tiny random Qwen2 model serves every module through the in-process JAX engine (greedy, so the
batched and the one-at-a-time runs produce the same trajectories, which the script checks);
tools are scripted. Both modes are warmed up (compiled), then run in --repeats interleaved rounds;
medians, with the load average before and after.

    python experiments/benchmarks/rollout_bench.py [--trajectories 64 --max_new_tokens 48]
"""

from __future__ import annotations

import argparse
import tempfile

from agentflow_jax.agent import prompts
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.agent.memory import Memory
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, rollout_batch
from agentflow_jax.models import config as model_config, qwen2
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.sampling import Sampler
from agentflow_jax.tools.base import Tool, ToolArgument, Toolbox, ToolMetadata
from common import interleaved_seconds, load_average, machine_summary, medians


class LookupTool(Tool):
    metadata = ToolMetadata(name="Lookup_Tool", description="Looks a name up in a table.",
                            inputs=(ToolArgument("query", "str", "the name"),), output_type="str")

    def run(self, query):
        return f"{query} was founded in {1000 + len(query) * 37}."


def build(args) -> tuple[JaxEngine, Toolbox, list[str]]:
    toolbox = Toolbox([LookupTool()])
    queries = [f"In what year was the city number {i} founded?" for i in range(args.trajectories)]
    # Trained on the agent's own prompts (as the toy world's tokenizer is), so prompts are ~100-300 tokens.
    texts = [m["content"] for q in queries for m in prompts.build_planner_prompt(
        Memory(q), toolbox, step=1, max_steps=3, compact_tools=True)]
    texts += [m["content"] for q in queries for m in prompts.build_verifier_prompt(
        Memory(q).add_turn(tool_name="Lookup_Tool", sub_goal=q, command="", result=LookupTool().run(q), ok=True),
        toolbox, compact_tools=True)]
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=args.vocab,
                                             model_path=f"{tempfile.mkdtemp()}/bench.model")
    config = model_config.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                               num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    engine = JaxEngine(Sampler(qwen2.init_random(config, seed=0), max_cache_length=2048), tokenizer)
    return engine, toolbox, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine, toolbox, queries = build(args)
    calls = SamplingParams(max_new_tokens=args.max_new_tokens)
    config = RolloutConfig(max_turns=3, planner=calls, analysis=calls, executor=calls, verifier=calls,
                           generator=calls, compact_tools=True)

    def batched():
        return rollout_batch(queries, n=1, planner=engine, frozen=engine, toolbox=toolbox, config=config)

    def one_at_a_time():
        return [rollout_batch([q], n=1, planner=engine, frozen=engine, toolbox=toolbox, config=config)[0]
                for q in queries]

    load_before = load_average()
    median = medians(interleaved_seconds({"batched": batched, "one at a time": one_at_a_time}, args.repeats))
    t_batched, t_single = median["batched"], median["one at a time"]
    out_batched, out_single = batched(), one_at_a_time()

    def trace(t):
        return [(turn.planner.text, turn.result.as_text(), turn.verifier_text) for turn in t.turns], t.generator_text

    same = all(trace(a) == trace(b) for a, b in zip(out_batched, out_single))
    turns = sum(len(t.turns) for t in out_batched)
    print(f"machine: {machine_summary()}; load average before {load_before}, after {load_average()}")
    print(f"{len(queries)} trajectories, {turns} turns, identical trajectories in both modes: {same}")
    print(f"batched:          {t_batched:7.2f} s  (median of {args.repeats} interleaved rounds)")
    print(f"one at a time:    {t_single:7.2f} s")
    print(f"speed-up batched / one at a time: {t_single / t_batched:.1f}x  (target >= 8x)")


if __name__ == "__main__":
    main()
