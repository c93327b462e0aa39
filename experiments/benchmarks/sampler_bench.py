"""Sampler speed against transformers `generate` (PyTorch CPU), same random weights, one process.

    python experiments/benchmarks/sampler_bench.py                      # the default table
    python experiments/benchmarks/sampler_bench.py --batches 1,16 --bf16

Prints greedy new tokens/s of both systems (float32) for each batch size and their ratio (with
--bf16 also our sampler with bfloat16 weights and compute against the same float32 baseline),
then the prefill time of one prompt sampled n times (prefill once, cache broadcast) against the
same prompt repeated n times. For each comparison the variants run in interleaved rounds (one
untimed call each first, which also compiles ours) and the table shows medians over --repeats
rounds, so load from other processes on a shared machine falls on all of them alike; the load
average is printed at the start and after each row. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from agentflow_jax.models import hf_io
from agentflow_jax.sampling import Sampler
from common import interleaved_seconds, load_average, medians


SHORT_NAMES = {"float32": "f32", "bfloat16": "bf16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--group-n", type=int, default=8, help="samples per prompt in the prefill comparison")
    parser.add_argument("--bf16", action="store_true",
                        help="also time our sampler with bfloat16 weights and compute (same weights, cast)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_models(args: argparse.Namespace, directory: str):
    """transformers model and ours ({dtype name: model}) with identical random weights (tied embeddings)."""
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(directory)
    dtypes = ("float32", "bfloat16") if args.bf16 else ("float32",)
    return hf, {name: hf_io.load_pretrained(directory, dtype=jnp.dtype(name)) for name in dtypes}


def hf_greedy(hf: transformers.Qwen2ForCausalLM, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return out[:, prompts.shape[1]:].numpy()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.RandomState(args.seed)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} threads "
          f"{torch.get_num_threads()} | transformers {transformers.__version__} | {os.cpu_count()} CPU cores")
    print(f"model: vocab {args.vocab}, hidden {args.hidden}, mlp {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads / {args.kv_heads} KV heads, tied, float32; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; medians of {args.repeats} interleaved rounds; "
          f"load average (1/5/15 min) at the start {load_average()}\n")
    with tempfile.TemporaryDirectory() as directory:
        hf, ours = build_models(args, directory)
    samplers = {name: Sampler(model, max_cache_length=args.prompt_len + args.new_tokens)
                for name, model in ours.items()}
    sampler = samplers["float32"]

    header = f"{'batch':>5} | {'HF f32 tok/s':>12}"
    for name in samplers:
        header += f" | {'ours ' + SHORT_NAMES[name] + ' tok/s':>15} | {'ratio':>6} | {'same tokens':>11}"
    print(header + f" | {'load after':>14}")
    for batch in batches:
        prompts = rng.randint(0, args.vocab, size=(batch, args.prompt_len)).astype(np.int64)
        runs = {"hf": lambda: hf_greedy(hf, prompts, args.new_tokens)}
        for name, each in samplers.items():
            runs[name] = lambda each=each: each.generate(prompts.tolist(), max_new_tokens=args.new_tokens,
                                                         temperature=0.0)
        median = medians(interleaved_seconds(runs, args.repeats))
        hf_tokens = hf_greedy(hf, prompts, args.new_tokens)
        new_tokens = batch * args.new_tokens
        row = f"{batch:>5} | {new_tokens / median['hf']:>12.1f}"
        for name in samplers:
            same = np.mean(np.array(runs[name]().tokens) == hf_tokens)
            row += f" | {new_tokens / median[name]:>15.1f} | {median['hf'] / median[name]:>5.2f}x | {same:>11.1%}"
        print(row + f" | {load_average():>14}", flush=True)

    prompt = rng.randint(0, args.vocab, size=args.prompt_len).tolist()
    n = args.group_n

    def prefill(prompts: list[list[int]], samples: int) -> Callable[[], object]:
        def run():
            prefilled = sampler.prefill(prompts, n=samples, max_new_tokens=args.new_tokens)
            return jax.block_until_ready((prefilled.logits, prefilled.cache))
        return run

    median = medians(interleaved_seconds({"group": prefill([prompt], n), "repeated": prefill([prompt] * n, 1)},
                                         args.repeats))
    print(f"\nprefill of one {args.prompt_len}-token prompt for {n} samples: group (prefill once, broadcast cache) "
          f"{median['group'] * 1e3:.2f} ms | prompt repeated {n}x {median['repeated'] * 1e3:.2f} ms | ratio "
          f"{median['repeated'] / median['group']:.2f}x")
    print(f"load average (1/5/15 min) at the end: {load_average()}; other processes on these cores slow both "
          "systems, PyTorch's OpenMP threads most, so compare runs at a low load")

if __name__ == "__main__":
    main()
