"""Compile time of the Qwen2 forward pass: deep (28 layers) vs shallow (2 layers) at equal width.

Layers run under one lax.scan, so compile time should not grow with depth (target ratio < 2).
Compiles from abstract shapes only (no weights are allocated).

    python experiments/benchmarks/compile_bench.py [--hidden 896 --batch 2 --length 128]
"""

from __future__ import annotations

import argparse
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from agentflow_jax.models import config as model_config, qwen2
from common import machine_summary


def compile_seconds(config: model_config.Qwen2Config, batch: int, length: int) -> float:
    graphdef, abstract_state = nnx.split(qwen2.abstract_model(config))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    start = time.perf_counter()
    forward.lower(abstract_state, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen2.5-1.5b", help="width source (a qwen2 preset)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    base = model_config.preset(args.preset)
    shallow, deep = base.replace(num_layers=2), base.replace(num_layers=28)
    compile_seconds(base.replace(num_layers=1), args.batch, args.length)  # warm JAX's own start-up
    t_shallow = compile_seconds(shallow, args.batch, args.length)
    t_deep = compile_seconds(deep, args.batch, args.length)
    print(f"machine: {machine_summary()}; width from {args.preset} (hidden {base.hidden_size})")
    print(f"compile  2 layers: {t_shallow:.2f} s")
    print(f"compile 28 layers: {t_deep:.2f} s")
    print(f"ratio 28/2 layers: {t_deep / t_shallow:.2f}  (target < 2)")


if __name__ == "__main__":
    main()
