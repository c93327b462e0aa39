"""Throughput (tokens/s) of one Flow-GRPO update: ours (JAX) vs transformers' PyTorch Qwen2 + torch autograd.

One update is what `FlowGRPOTrainer` runs per optimizer batch: forward + backward of the Flow-GRPO
policy loss (log-ratio clamp, asymmetric clip, dual clip, k3 KL to reference log-probs, token-mean
aggregation, entropy metric), then, if the gradients are finite, global-norm clipping to 1.0 and an
AdamW step. Ours runs the trainer's code: `loss.make_value_and_grad` + `loss.accumulate_gradients`
and a jitted optax update of `trainer.make_optimizer` with donated buffers. Torch runs the same
loss (transcribed below) on `Qwen2ForCausalLM(...).logits`, `loss.backward()`, `clip_grad_norm_`
and `AdamW.step()`.

Both run in float32 on the CPU in one process from the same weights (ours loads the checkpoint of
the transformers model), torch with one thread per core. Batch 8 rows x 512 tokens (prompt 384 +
response 128, so 1024 loss tokens) on the ~40M-parameter benchmark config. Before timing, the
script checks that both give the same loss and the same gradient of every parameter, and stops
if they do not.

Ours runs twice: as configured by default (`model.remat = False`) and with remat (`model.remat =
True`, each layer recomputed in the backward pass), each on its own copy of the parameters.

Ours applies the LM head at loss-mask positions only (`policy_loss` passes the loss mask to
`logprobs.token_logprobs`); transformers' `model(...).logits` computes it at all B * T positions.
A third row applies the same saving in torch (`lm_head` on the hidden states of loss positions
only), to separate the algorithmic saving from the framework.

FLOP/s are the matmul FLOPs an update needs divided by its time, as a fraction of the best float32
matmul rate measured in the same process (jnp.dot and torch.mm of 4096x512 @ 512x1408 and 2048^3):

  FLOPs = 6 * (P - V * D) * B * T  +  6 * V * D * N_head  +  6 * L * B * T^2 * (H * Dh)

2 FLOPs per weight per token in the forward pass and 4 in the backward pass: the decoder weights
(P parameters less the tied V x D embedding; norms and biases are negligible) at all B * T
positions, the LM head at the N_head positions a row computes it at (B * T for transformers'
logits, the loss tokens for the other two), and the attention score and value matmuls over the
causal half of the T x T scores. Recomputation (checkpointed LM-head chunks) and masked scores
that an implementation computes anyway are not counted, and neither is the optimizer.

The variants run in rounds (each once per round, after one untimed call that also compiles ours),
so that load from other processes on a shared machine falls on all of them alike; the table shows
medians over rounds, the ratio lines also the ratio of the fastest rounds.

    python experiments/benchmarks/train_step_bench.py [--batch 8 --prompt 384 --response 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from typing import Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from agentflow_jax.models import config as model_config, hf_io
from agentflow_jax.rl import logprobs as logprobs_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import pack_turns
from agentflow_jax.rl.trainer import make_optimizer
from common import BENCH_CONFIG, interleaved_seconds, machine_summary
from flow_grpo_update import make_records, torch_policy_loss, update_flops

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-6, 0.01, 1.0
TOLERANCE = 1e-4  # absolute on loss and mean entropy; relative on each parameter's gradient (L2 norms)


def hf_config(cfg: dict) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"], tie_word_embeddings=cfg["tie_word_embeddings"])


def ours_update_fn(graphdef: nnx.GraphDef, params: nnx.State, inputs: loss_lib.LossInputs,
                   loss_config: loss_lib.LossConfig) -> tuple[loss_lib.ValueAndGrad, Callable[[], None]]:
    """(value_and_grad, update): one update as `FlowGRPOTrainer` runs it, on its own copy of the parameters."""
    value_and_grad = loss_lib.make_value_and_grad(graphdef, loss_config)
    tx = make_optimizer(LR, weight_decay=WEIGHT_DECAY, grad_clip=MAX_GRAD_NORM)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply_updates(params, opt_state, grads):  # as FlowGRPOTrainer._apply_updates
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    state = {"params": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}  # donated by each update

    def update() -> None:
        acc = loss_lib.accumulate_gradients(value_and_grad, state["params"], [inputs])
        if bool(acc.is_finite):
            state["params"], state["opt"], grad_norm = apply_updates(state["params"], state["opt"], acc.grads)
            grad_norm.block_until_ready()

    return value_and_grad, update


def matmul_peak() -> dict[str, float]:
    """Best float32 matmul FLOP/s of jnp.dot and of torch.mm (fastest of 10 runs of two shapes)."""
    rng, dot = np.random.default_rng(0), jax.jit(jnp.dot)
    fns, flops = {}, {}
    for m, k, n in ((4096, 512, 1408), (2048, 2048, 2048)):
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        fns[f"jnp.dot {m}x{k}x{n}"] = lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready()
        fns[f"torch.mm {m}x{k}x{n}"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
        flops[f"jnp.dot {m}x{k}x{n}"] = flops[f"torch.mm {m}x{k}x{n}"] = 2.0 * m * k * n
    return {key: flops[key] / min(times) for key, times in interleaved_seconds(fns, repeats=10).items()}


def ours_grads_by_hf_name(grads: nnx.State, config: model_config.Qwen2Config) -> dict[str, np.ndarray]:
    """Our gradients in the layout and under the names of the transformers checkpoint."""
    out = {}
    for mapping in hf_io.mappings(config):
        node = grads
        for key in mapping.path:
            node = node[key]
        value = np.asarray(node[...])
        for i, name in enumerate(mapping.names(config)):
            out[name] = mapping.to_hf(value[i] if mapping.per_layer else value, config)
    return out


def check_agreement(name: str, ours: tuple[float, float, dict[str, np.ndarray]], loss_torch: float,
                    entropy_torch: float, model: torch.nn.Module) -> None:
    """Prints how one torch variant agrees with ours (loss, entropy, gradients); exits beyond TOLERANCE."""
    loss_ours, entropy_ours, grads_ours = ours
    grads_torch = {key: p.grad.double().numpy() for key, p in model.named_parameters()}
    if grads_torch.keys() != grads_ours.keys():
        raise SystemExit(f"parameter names differ: {sorted(grads_torch.keys() ^ grads_ours.keys())}")
    worst, worst_name = max((np.linalg.norm(grads_ours[key] - g) / np.linalg.norm(g), key)
                            for key, g in grads_torch.items())
    norm = lambda grads: np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))  # noqa: E731
    ok = max(abs(loss_ours - loss_torch), abs(entropy_ours - entropy_torch), worst) < TOLERANCE
    print(f"check {name}: loss ours {loss_ours:.7f} torch {loss_torch:.7f}; entropy ours {entropy_ours:.5f} "
          f"torch {entropy_torch:.5f}; grad norm ours {norm(grads_ours):.6e} torch {norm(grads_torch):.6e}; "
          f"worst |g_ours - g_torch| / |g_torch| of {len(grads_torch)} tensors {worst:.1e} ({worst_name}): "
          f"{'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(f"ours and {name} disagree beyond {TOLERANCE}: not timing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens per row")
    parser.add_argument("--response", type=int, default=128, help="response (loss) tokens per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count())
    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    config = model_config.Qwen2Config(**BENCH_CONFIG)
    hf = transformers.Qwen2ForCausalLM(hf_config(BENCH_CONFIG)).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        graphdef, params = nnx.split(hf_io.load_pretrained(tmp))
        remat_graphdef = nnx.graphdef(hf_io.load_pretrained(tmp, remat=True))  # same params, layers recomputed

    loss_config = loss_lib.LossConfig()  # the reference run's: token-mean, k3 KL coef 0.001, dual clip 3
    batch = pack_turns(make_records(args.batch, args.prompt, args.response, config.vocab_size, seed=0), pad_id=0)
    rows, length = batch.input_ids.shape
    loss_tokens = int(batch.loss_mask.sum())

    # Old / reference log-probs near the current policy's, so that ratios and KL are realistic (some clipping).
    current, _ = jax.jit(functools.partial(logprobs_lib.token_logprobs, graphdef))(
        params, batch.input_ids, batch.attention_mask, batch.targets)
    current = np.asarray(current) * batch.loss_mask
    rng = np.random.default_rng(1)
    old = (current + rng.normal(0, 0.2, current.shape) * batch.loss_mask).astype(np.float32)
    ref = (current + rng.normal(0, 0.3, current.shape) * batch.loss_mask).astype(np.float32)
    advantages = rng.normal(0, 1, rows).astype(np.float32)
    inputs = loss_lib.make_loss_inputs(batch, advantages, old, ref, loss_config)
    t_in = {"input_ids": torch.from_numpy(batch.input_ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(batch.attention_mask.astype(np.int64)),
            "targets": torch.from_numpy(batch.targets.astype(np.int64)),
            "loss_mask": torch.from_numpy(batch.loss_mask), "advantages": torch.from_numpy(advantages),
            "old_logprobs": torch.from_numpy(old), "ref_logprobs": torch.from_numpy(ref)}

    # ---- ours: the trainer's update, without and with remat (model.remat) ---------------------------
    ours = {"ours (JAX)": ours_update_fn(graphdef, params, inputs, loss_config),
            "ours (JAX), remat": ours_update_fn(remat_graphdef, params, inputs, loss_config)}

    # ---- torch -------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)  # betas, eps as optax

    def torch_loss_and_grad(loss_positions_only: bool) -> tuple[float, float]:
        optimizer.zero_grad(set_to_none=True)
        loss, entropy = torch_policy_loss(hf, t_in, loss_config, loss_positions_only)
        loss.backward()
        return float(loss.detach()), float(entropy)

    def torch_update(loss_positions_only: bool) -> None:
        torch_loss_and_grad(loss_positions_only)
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_GRAD_NORM)):
            optimizer.step()

    # ---- check, once, that ours (both) and torch (both) compute the same loss and gradients ----------
    for ours_name, (value_and_grad, _) in ours.items():
        (loss_ours, metrics), grads = value_and_grad(params, inputs)
        final = loss_lib.finalize_metrics(metrics)
        print(f"{ours_name}: loss inputs: ratio clipped low/high {final['pg_clipfrac_low']:.3f}/"
              f"{final['pg_clipfrac_high']:.3f}, dual clipped {final['dual_clipfrac']:.3f}, kl {final['kl']:.4f}")
        result = (float(loss_ours), final["entropy"], ours_grads_by_hf_name(grads, config))
        for name, loss_positions_only in (("transformers+torch", False), ("torch, LM head on loss tokens", True)):
            check_agreement(f"{ours_name} vs {name}", result, *torch_loss_and_grad(loss_positions_only), hf)
        del grads, result

    # ---- timing ------------------------------------------------------------------------------------
    peaks = matmul_peak()
    peak = max(peaks.values())
    variants = {**{name: update for name, (_, update) in ours.items()},
                "transformers+torch": functools.partial(torch_update, False),
                "torch, LM head on loss tokens": functools.partial(torch_update, True)}
    times = interleaved_seconds(variants, args.repeats)
    median = {name: float(np.median(ts)) for name, ts in times.items()}
    fastest = {name: min(ts) for name, ts in times.items()}

    tokens = rows * length
    flops = {name: update_flops(config, rows, length, tokens if name == "transformers+torch" else loss_tokens)
             for name in variants}
    print(f"machine: {machine_summary()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"model: {config.num_params / 1e6:.1f}M params, float32; batch {rows} x {length} tokens "
          f"({loss_tokens} loss tokens)")
    print("matmul peak (float32): " + ", ".join(f"{key} {rate / 1e9:.1f}" for key, rate in peaks.items())
          + f" GFLOP/s; peak = {peak / 1e9:.1f} GFLOP/s")
    print(f"update = loss + grad + clip + AdamW; wall time over {args.repeats} rounds; FLOPs as in the docstring")
    print(f"{'':31s} {'median ms':>10s} {'fastest ms':>11s} {'tokens/s':>9s} {'TFLOP':>6s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s}")
    for name, seconds in median.items():
        print(f"{name:31s} {seconds * 1e3:10.0f} {fastest[name] * 1e3:11.0f} {tokens / seconds:9.0f} "
              f"{flops[name] / 1e12:6.3f} {flops[name] / seconds / 1e9:8.1f} {flops[name] / seconds / peak:8.1%}")
    for ours_name in ours:
        for name in ("transformers+torch", "torch, LM head on loss tokens"):
            print(f"ratio {ours_name} / {name} (tokens/s, float32): {median[name] / median[ours_name]:.2f} median, "
                  f"{fastest[name] / fastest[ours_name]:.2f} fastest rounds")


if __name__ == "__main__":
    main()
