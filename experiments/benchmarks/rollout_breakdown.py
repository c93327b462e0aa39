"""Where the rollout benchmark's time goes: its 8 sampler calls, 64 rows at once vs one row at a time.

`rollout_bench.py` makes, per trajectory, 8 greedy sampler calls of 48 new tokens whose longest
prompts have the lengths below (the same in every trajectory). This script times those calls
directly on the same tiny model (random prompt tokens; cost does not depend on their values):
prefill alone and prefill + decode, for 64 rows (row blocks on and off) and for one row, medians
of --repeats interleaved rounds in one process (load average printed before and after). It
prints the sampler time of the whole benchmark in both modes, their ratio, and the ceiling of
that ratio if batched decoding cost nothing (the prefill work per row is the same in both modes).

    python experiments/benchmarks/rollout_breakdown.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from agentflow_jax.models import config as model_config, qwen2
from agentflow_jax.sampling import Sampler
from common import load_average, machine_summary

PROMPT_LENGTHS = (125, 177, 247, 293, 366, 412, 485, 471)  # the benchmark's 8 calls (analysis ... generator)
ROWS = 64
NEW_TOKENS = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=768)
    args = parser.parse_args()
    config = model_config.Qwen2Config(vocab_size=args.vocab, hidden_size=128, intermediate_size=256, num_layers=2,
                               num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    model = qwen2.init_random(config, seed=0)
    samplers = {"blocks": Sampler(model, max_cache_length=2048, row_blocks=True),
                "whole": Sampler(model, max_cache_length=2048, row_blocks=False)}
    rng = np.random.default_rng(0)
    cases = [(mode, length, rows) for length in PROMPT_LENGTHS
             for mode, rows in (("blocks", ROWS), ("whole", ROWS), ("blocks", 1))]
    prompts = {(length, rows): rng.integers(1, args.vocab, (rows, length)).tolist()
               for length in PROMPT_LENGTHS for rows in (ROWS, 1)}

    def prefill(mode, length, rows):
        jax.block_until_ready(samplers[mode].prefill(prompts[length, rows], max_new_tokens=NEW_TOKENS).logits)

    def generate(mode, length, rows):
        samplers[mode].generate(prompts[length, rows], max_new_tokens=NEW_TOKENS, temperature=0.0)

    load_before = load_average()
    times = {}
    for repeat in range(args.repeats + 1):  # the first round compiles
        for case in cases:
            for name, fn in (("prefill", prefill), ("generate", generate)):
                start = time.perf_counter()
                fn(*case)
                elapsed = time.perf_counter() - start
                if repeat:
                    times.setdefault((name, case), []).append(elapsed)
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"machine: {machine_summary()}; medians of {args.repeats} interleaved rounds; load average before "
          f"{load_before}, after {load_average()}")
    print("prompt | 1 row: prefill, generate (ms) | 64 rows, row blocks: prefill, generate | 64 rows, whole batch")
    for length in PROMPT_LENGTHS:
        cells = [f"{median['prefill', case] * 1e3:6.1f} {median['generate', case] * 1e3:7.1f}"
                 for case in (("blocks", length, 1), ("blocks", length, ROWS), ("whole", length, ROWS))]
        print(f"{length:6d} | " + " | ".join(cells))

    def total(name, mode, rows):
        return sum(median[name, (mode, length, rows)] for length in PROMPT_LENGTHS) * (ROWS // rows)

    single, single_prefill = total("generate", "blocks", 1), total("prefill", "blocks", 1)
    for mode in ("blocks", "whole"):
        batched, batched_prefill = total("generate", mode, ROWS), total("prefill", mode, ROWS)
        print(f"{ROWS} trajectories' sampler time, {mode}: batched {batched:.2f} s (prefill {batched_prefill:.2f}) vs "
              f"one at a time {single:.2f} s (prefill {single_prefill:.2f}): {single / batched:.2f}x; "
              f"ceiling if batched decoding were free: {single / batched_prefill:.2f}x")


if __name__ == "__main__":
    main()
