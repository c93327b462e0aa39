"""Compile time of the Qwen2 forward pass: deep (28 layers) vs shallow (2 layers) at equal width.

Layers run under one lax.scan, so compile time should not grow with depth (target ratio < 2).
Compiles from abstract shapes only (no weights are allocated); the two depths take turns over
--repeats rounds (a fresh jit each time) and the ratio is of the medians.

    python experiments/benchmarks/compile_bench.py [--preset qwen2.5-1.5b --batch 2 --length 128]
"""

from __future__ import annotations

import argparse
import functools

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax.models import config as model_config, qwen2
from common import interleaved_seconds, load_average, machine_summary, medians


def compile_once(config: model_config.Qwen2Config, batch: int, length: int) -> None:
    """Lowers and compiles the forward pass of `config` (a fresh jit, so nothing is reused)."""
    graphdef, abstract_state = nnx.split(qwen2.abstract_model(config))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)).lower(abstract_state, ids).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen2.5-1.5b", help="width source (a qwen2 preset)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = model_config.preset(args.preset)
    load_before = load_average()
    median = medians(interleaved_seconds(
        {layers: functools.partial(compile_once, base.replace(num_layers=layers), args.batch, args.length)
         for layers in (2, 28)}, args.repeats))
    print(f"machine: {machine_summary()}; width from {args.preset} (hidden {base.hidden_size}); load average "
          f"before {load_before}, after {load_average()}; medians of {args.repeats} interleaved rounds")
    print(f"compile  2 layers: {median[2]:.2f} s")
    print(f"compile 28 layers: {median[28]:.2f} s")
    print(f"ratio 28/2 layers: {median[28] / median[2]:.2f}  (target < 2)")

if __name__ == "__main__":
    main()
