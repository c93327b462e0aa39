"""Forward throughput (tokens/s) of our float32 Qwen2 vs transformers' PyTorch model, same weights.

Batch 8 x 256 tokens on the ~40M-parameter benchmark config, both on the CPU in one process. The
three variants (ours float32, ours bfloat16, transformers float32) run in interleaved rounds after
one untimed call each; medians.

    python experiments/benchmarks/forward_bench.py [--batch 8 --length 256 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from agentflow_jax.models import config as model_config, hf_io
from common import BENCH_CONFIG, interleaved_seconds, load_average, machine_summary, medians


def hf_config(cfg: dict) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"], tie_word_embeddings=cfg["tie_word_embeddings"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config(BENCH_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = hf_io.load_pretrained(tmp)
        ours_bf16 = hf_io.load_pretrained(tmp, dtype=jnp.bfloat16)

    ids = np.random.RandomState(0).randint(0, BENCH_CONFIG["vocab_size"], (args.batch, args.length))
    ids_jax, ids_torch = jnp.asarray(ids, jnp.int32), torch.from_numpy(ids)

    def jax_runner(model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
        return lambda: forward(state, ids_jax).block_until_ready()

    def run_hf():
        with torch.inference_mode():
            hf(input_ids=ids_torch, use_cache=False)

    tokens = args.batch * args.length
    load_before = load_average()
    median = medians(interleaved_seconds({"ours": jax_runner(ours), "ours bf16": jax_runner(ours_bf16),
                                          "transformers": run_hf}, args.repeats))
    t_ours, t_bf16, t_hf = median["ours"], median["ours bf16"], median["transformers"]
    print(f"machine: {machine_summary()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average before {load_before}, after {load_average()}")
    print(f"model: {model_config.Qwen2Config(**BENCH_CONFIG).num_params / 1e6:.1f}M params, float32, batch "
          f"{args.batch} x {args.length} tokens; medians of {args.repeats} interleaved rounds")
    print(f"ours (JAX):          {tokens / t_ours:10.0f} tokens/s  ({t_ours * 1e3:.1f} ms)")
    print(f"transformers (torch): {tokens / t_hf:10.0f} tokens/s  ({t_hf * 1e3:.1f} ms)")
    print(f"ratio ours / transformers (both float32): {t_hf / t_ours:.2f}")
    print(f"ours in bfloat16 (params and compute):   {tokens / t_bf16:10.0f} tokens/s, "
          f"ratio to transformers float32: {t_hf / t_bf16:.2f}")

if __name__ == "__main__":
    main()
