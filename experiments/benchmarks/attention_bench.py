"""Causal attention forward + backward: ours (`models.attention.causal_attention`) vs torch's fused SDPA.

Both compute the gradient of sum(attention(q, k, v) * c) with respect to q, k and v for the
layers of the benchmark config (experiments/benchmarks/common.py: 8 heads over 2 key/value heads,
head size 64, 8 layers) on a batch of 8 x 512 tokens, in float32 on the CPU in one process.
Ours: one jitted gradient of a `lax.scan` over the layers, with the tiles the training path uses
(`attention.default_tiles`, or `--query-chunk` / `--key-chunk`). Torch:
`scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per layer, then `backward()`.
Before timing, the script checks that the two give the same output and gradients. Rounds
interleave the two; medians and the ratio are printed.

    python experiments/benchmarks/attention_bench.py [--batch 8 --length 512 --query-chunk 128 --key-chunk 512]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from agentflow_jax.models import attention
from common import BENCH_CONFIG, interleaved_seconds, load_average, machine_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--query-chunk", type=int, help="default: attention.default_tiles(length)")
    parser.add_argument("--key-chunk", type=int, help="default: attention.default_tiles(length)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    layers, heads, kv_heads = BENCH_CONFIG["num_layers"], BENCH_CONFIG["num_heads"], BENCH_CONFIG["num_kv_heads"]
    head_dim = BENCH_CONFIG["hidden_size"] // heads
    b, t = args.batch, args.length
    rng = np.random.default_rng(0)
    q = rng.standard_normal((layers, b, t, heads, head_dim), np.float32)
    k = rng.standard_normal((layers, b, kv_heads, t, head_dim), np.float32)
    v = rng.standard_normal((layers, b, kv_heads, t, head_dim), np.float32)
    c = rng.standard_normal((layers, b, t, heads, head_dim), np.float32)
    query_chunk, key_chunk = attention.default_tiles(t)
    query_chunk, key_chunk = args.query_chunk or query_chunk, args.key_chunk or key_chunk
    valid = jnp.ones((b, t), bool)

    def ours_loss(q, k, v, c):
        def layer(total, xs):
            q, k, v, c = xs
            out = attention.causal_attention(q, k, v, valid, query_chunk=query_chunk, key_chunk=key_chunk)
            return total + jnp.sum(out * c), out

        return jax.lax.scan(layer, 0.0, (q, k, v, c))

    ours_grad = jax.jit(jax.grad(lambda *a: ours_loss(*a)[0], argnums=(0, 1, 2)))
    jq, jk, jv, jc = (jnp.asarray(x) for x in (q, k, v, c))
    # torch layout: q [L, B, H, T, Dh], k/v [L, B, K, T, Dh]
    tq = torch.from_numpy(q.transpose(0, 1, 3, 2, 4).copy()).requires_grad_()
    tk, tv = (torch.from_numpy(x).requires_grad_() for x in (k, v))
    tc = torch.from_numpy(c.transpose(0, 1, 3, 2, 4).copy())

    def torch_step() -> list[torch.Tensor]:
        for x in (tq, tk, tv):
            x.grad = None
        outs = [torch.nn.functional.scaled_dot_product_attention(tq[i], tk[i], tv[i], is_causal=True,
                                                                 enable_gqa=True) for i in range(layers)]
        sum((out * tc[i]).sum() for i, out in enumerate(outs)).backward()
        return outs

    outs = torch.stack(torch_step()).detach().numpy().transpose(0, 1, 3, 2, 4)
    ours_out = np.asarray(jax.jit(ours_loss)(jq, jk, jv, jc)[1])
    grads = ours_grad(jq, jk, jv, jc)
    torch_grads = (tq.grad.numpy().transpose(0, 1, 3, 2, 4), tk.grad.numpy(), tv.grad.numpy())
    worst = max([float(np.max(np.abs(ours_out - outs)))]
                + [float(np.max(np.abs(np.asarray(g) - e))) for g, e in zip(grads, torch_grads)])
    print(f"check: max |ours - torch| over output and gradients {worst:.1e}: {'OK' if worst < 1e-3 else 'MISMATCH'}")
    if worst >= 1e-3:
        raise SystemExit("ours and torch disagree: not timing")

    load_before = load_average()
    times = interleaved_seconds({"ours (JAX)": lambda: jax.block_until_ready(ours_grad(jq, jk, jv, jc)),
                                 "torch SDPA": torch_step}, args.repeats)
    median = {name: float(np.median(ts)) for name, ts in times.items()}
    flops = 6.0 * layers * b * t * t * heads * head_dim  # score and value matmuls over the causal half, fwd + bwd
    print(f"machine: {machine_summary()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average before {load_before}, after {load_average()}")
    print(f"{layers} layers x [{b} x {t}] tokens, {heads} heads over {kv_heads} kv heads, head size {head_dim}, "
          f"float32; ours in tiles of {query_chunk} queries x {key_chunk} keys")
    for name, seconds in median.items():
        print(f"{name:12s} median {seconds * 1e3:7.0f} ms  ({flops / seconds / 1e9:5.1f} GFLOP/s causal-equivalent)")
    print(f"ratio ours / torch SDPA (speed): {median['torch SDPA'] / median['ours (JAX)']:.2f}")


if __name__ == "__main__":
    main()
