"""SFT step time with the LM head on every position (the toy warm start's setting) against the LM
head on target positions only (`SFTTrainer(loss_positions_only=True)`, what `python -m
agentflow_jax.sft` runs), on Qwen2.5's vocabulary and planner-call-shaped rows (a long prompt, a
short reply). Both take the same optimizer step; the ratio is the speed-up.

    python experiments/benchmarks/sft_step_bench.py [--rows 8 --length 512 --target 64]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import interleaved_seconds, machine_summary

from agentflow_jax.models import qwen2
from agentflow_jax.models.config import Qwen2Config
from agentflow_jax.optim import OptimConfig, make_optimizer
from agentflow_jax.supervised import Example, SFTTrainer, pack_examples

QWEN_VOCAB = 151_936


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--target", type=int, default=64, help="reply tokens per row (the rest is prompt)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_layers=args.layers, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    examples = [Example(tuple(rng.integers(0, QWEN_VOCAB, args.length - args.target).tolist()),
                        tuple(rng.integers(0, QWEN_VOCAB, args.target).tolist())) for _ in range(args.rows)]
    batch = pack_examples(examples, length=args.length, rows=args.rows, pad_id=0)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-5))
    trainers = {name: SFTTrainer(qwen2.init_random(config, seed=0), optimizer, chunk_size=512,
                                 loss_positions_only=only) for name, only in (("every", False), ("targets", True))}

    def step(trainer: SFTTrainer):
        return lambda: float(trainer.step(batch)[0])

    times = interleaved_seconds({name: step(trainer) for name, trainer in trainers.items()}, args.repeats)
    every, targets = statistics.median(times["every"]), statistics.median(times["targets"])
    print(f"{machine_summary()}; {config.num_params / 1e6:.1f}M parameters, {args.rows} x {args.length} tokens, "
          f"{args.target} target tokens per row")
    print(f"LM head on every position: {every:.3f} s per step; on target positions only: {targets:.3f} s per step; "
          f"ratio {every / targets:.2f}x")


if __name__ == "__main__":
    main()
