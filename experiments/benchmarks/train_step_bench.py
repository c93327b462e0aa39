"""Throughput (tokens/s) of one Flow-GRPO update: ours (JAX) vs transformers + torch autograd, same weights.

One update = forward + backward of the Flow-GRPO policy loss (log-ratio clamp, asymmetric clip,
dual clip, k3 KL to reference log-probs, token-mean aggregation, entropy metric) followed by an
optimizer step (global-norm clip 1.0 + AdamW). The table reports loss+grad and the optimizer step
separately and the full update (both in one jitted call for ours; `loss.backward()` then
`clip_grad_norm_` + `AdamW.step()` for torch). Batch 8 rows x 512 tokens (prompt 384 + response 128,
so 128 loss tokens per row) on the ~40M-parameter benchmark config, both on the CPU in one process,
torch with one thread per core. Before timing, the script checks once that both implementations
give the same loss and gradient norms (printed).

Ours computes LM-head logits only at loss-mask positions (`policy_loss` passes the loss mask to
`logprobs.token_logprobs`); the plain torch loss computes logits at all B * T positions, as
`model(...).logits` does. A second torch row applies the same trick in torch (`lm_head` on the
hidden states of loss positions only) to separate the algorithmic saving from the framework.

Achieved FLOP/s are model FLOPs of the update divided by its time, as a fraction of the best
matmul rate measured in the same process (jnp.dot of 4096x512 @ 512x1408 and 2048^3, same dtype):

  model FLOPs = 6 * P * B * T  +  12 * L * B * T^2 * (H * Dh)

P counts the parameters once (the LM head is tied, so every parameter is used in one matmul per
token; norms and biases are negligible): 2 FLOPs per parameter per token in the forward pass,
4 in the backward pass. The second term is the attention score and value matmuls (QK^T, PV:
2 * 2 * T^2 * H * Dh per layer and row forward, x3 for forward + backward) at full T x T, as our
kernel computes them (no causal skipping). Recomputation (checkpointed LM-head chunks) and the
optimizer are not counted, so the fraction is a model-FLOP utilisation. Rows that apply the LM
head on loss positions only execute fewer FLOPs than this convention counts: the script also
prints those ("executed"), with the LM-head share 6 * V * D * N_loss instead of 6 * V * D * B * T.

The variants are timed in rounds (each runs once per round) so that load from other processes on
a shared machine falls on all of them alike; the table shows medians over rounds, and the ratio
lines also give the ratio of the fastest rounds.

    python experiments/benchmarks/train_step_bench.py [--batch 8 --prompt 384 --response 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from typing import Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from agentflow_jax.models import qwen2
from agentflow_jax.rl import logprobs as logprobs_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TurnRecord, pack_turns
from common import BENCH_CONFIG, machine_summary, median_seconds

LR, WEIGHT_DECAY, MAX_GRAD_NORM, BETAS, EPS = 1e-6, 0.01, 1.0, (0.9, 0.999), 1e-8


def hf_config(cfg: dict) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"], tie_word_embeddings=cfg["tie_word_embeddings"])


def model_flops(config: qwen2.Qwen2Config, batch: int, length: int) -> float:
    attn_width = config.num_heads * config.dim_per_head
    return 6.0 * config.num_params * batch * length + 12.0 * config.num_layers * batch * length ** 2 * attn_width


def executed_flops(config: qwen2.Qwen2Config, batch: int, length: int, loss_tokens: int) -> float:
    """`model_flops` with the (tied) LM head applied to the loss tokens only."""
    head = config.vocab_size * config.hidden_size
    return model_flops(config, batch, length) - 6.0 * head * (batch * length - loss_tokens)


def matmul_peak(dtype, repeats: int) -> tuple[float, str]:
    """Best FLOP/s of a large jnp.dot in `dtype` (float32 accumulation), and which shape gave it."""
    best, best_shape = 0.0, ""
    for m, k, n in ((4096, 512, 1408), (2048, 2048, 2048)):
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dtype)
        dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        seconds = median_seconds(lambda: dot(a, b).block_until_ready(), repeats=max(repeats, 5), warmup=2)
        rate = 2.0 * m * k * n / seconds
        if rate > best:
            best, best_shape = rate, f"{m}x{k}x{n}"
    return best, best_shape


def interleaved_seconds(fns: dict, *, repeats: int, warmup: int = 1) -> dict:
    """Wall times of each fn() (which must block until done), run in rounds: key -> list of `repeats` seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def make_records(batch: int, prompt: int, response: int, vocab: int, seed: int) -> list[TurnRecord]:
    """`batch` planner calls (4 samples per query) of random tokens; rewards alternate 0/1."""
    rng = np.random.default_rng(seed)
    records = []
    for row in range(batch):
        ids = rng.integers(1, vocab, prompt + response).tolist()
        records.append(TurnRecord(query_id=row // 4, trajectory_id=row, prompt_ids=tuple(ids[:prompt]),
                                  response_ids=tuple(ids[prompt:]), sampler_logprobs=(0.0,) * response,
                                  reward=float(row % 2)))
    return records


# ----------------------------------------------------------------------------------------------
# The same loss in PyTorch (a direct transcription of loss.py's formulas, token-mean aggregation)
# ----------------------------------------------------------------------------------------------


def torch_policy_loss(model, t: dict[str, torch.Tensor], config: loss_lib.LossConfig,
                      loss_positions_only: bool = False):
    """Token-mean Flow-GRPO loss; `loss_positions_only` applies the LM head to loss-mask positions only."""
    if loss_positions_only:
        hidden = model.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                             use_cache=False).last_hidden_state
        keep = t["loss_mask"] > 0
        logits = model.lm_head(hidden[keep])  # [N_loss, V]
        targets, old, ref = t["targets"][keep], t["old_logprobs"][keep], t["ref_logprobs"][keep]
        adv = t["advantages"].unsqueeze(-1).expand_as(t["loss_mask"])[keep]
        mask = torch.ones_like(old)
    else:
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).logits
        targets, old, ref = t["targets"], t["old_logprobs"], t["ref_logprobs"]
        adv = t["advantages"].unsqueeze(-1)
        mask = t["loss_mask"]
    logits = logits.float() / config.temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # metric only (entropy_coef = 0), as ours computes it
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    ratio = torch.exp(torch.clamp(logp - old, -config.log_ratio_clamp, config.log_ratio_clamp))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * config.dual_clip), pg)
    d = torch.clamp(logp - ref, -config.log_ratio_clamp, config.log_ratio_clamp)
    kl = torch.clamp(torch.exp(-d) + d - 1, -config.k3_value_clamp, config.k3_value_clamp)
    per_token = pg + config.kl_coef * kl
    loss = (per_token * mask).sum() / mask.sum()
    return loss, entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens per row")
    parser.add_argument("--response", type=int, default=128, help="response (loss) tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=logprobs_lib.DEFAULT_CHUNK_SIZE,
                        help="LossConfig.logits_chunk_size (positions per LM-head chunk)")
    parser.add_argument("--remat", action="store_true", help="build our model with remat=True")
    parser.add_argument("--no-bf16", action="store_true", help="skip our bfloat16 variant")
    parser.add_argument("--no-torch-masked", action="store_true",
                        help="skip the torch row that applies the LM head on loss positions only")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count())
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    config = qwen2.Qwen2Config(**BENCH_CONFIG)
    hf = transformers.Qwen2ForCausalLM(hf_config(BENCH_CONFIG)).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = qwen2.from_pretrained(tmp, remat=args.remat)
        ours_bf16 = None if args.no_bf16 else qwen2.from_pretrained(
            tmp, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat)

    loss_config = loss_lib.LossConfig(logits_chunk_size=args.chunk_size)  # token-mean, k3, dual clip 3
    batch = pack_turns(make_records(args.batch, args.prompt, args.response, config.vocab_size, seed=0), pad_id=0)
    rows, length = batch.input_ids.shape
    tokens = rows * length
    rng = np.random.default_rng(1)
    graphdef, params = nnx.split(ours)

    # Old / reference log-probs near the current policy's, so ratios and KL are realistic (some clipping).
    current, _ = jax.jit(functools.partial(logprobs_lib.token_logprobs, graphdef))(
        params, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(batch.targets))
    current = np.asarray(current) * batch.loss_mask
    old = (current + rng.normal(0, 0.2, current.shape) * batch.loss_mask).astype(np.float32)
    ref = (current + rng.normal(0, 0.3, current.shape) * batch.loss_mask).astype(np.float32)
    advantages = rng.normal(0, 1, rows).astype(np.float32)
    inputs = loss_lib.make_loss_inputs(batch, advantages, old, ref, loss_config)

    # ---- ours ----------------------------------------------------------------------------------
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                     optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY))

    def jax_fns(model):
        gdef, state = nnx.split(model)
        value_and_grad = loss_lib.make_value_and_grad(gdef, loss_config)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def update(state, opt_state, inputs):
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: loss_lib.policy_loss(gdef, p, inputs, loss_config), has_aux=True)(state)
            updates, opt_state = tx.update(grads, opt_state, state)
            return optax.apply_updates(state, updates), opt_state, loss, metrics

        @jax.jit
        def opt_only(grads, opt_state, state):
            updates, opt_state = tx.update(grads, opt_state, state)
            return optax.apply_updates(state, updates), opt_state

        return state, value_and_grad, update, opt_only

    def jax_timers(model) -> dict[str, Callable[[], object]]:
        state, value_and_grad, update, opt_only = jax_fns(model)
        (_, _), grads = value_and_grad(state, inputs)
        opt_state = tx.init(state)
        # The full update donates its state: carry it through the timed calls.
        carry = [jax.tree.map(jnp.copy, state), tx.init(state)]

        def step():
            carry[0], carry[1], loss, _ = update(carry[0], carry[1], inputs)
            loss.block_until_ready()

        return {"grad": lambda: jax.block_until_ready(value_and_grad(state, inputs)),
                "opt": lambda: jax.block_until_ready(opt_only(grads, opt_state, state)), "update": step}

    # ---- torch ---------------------------------------------------------------------------------
    t_in = {"input_ids": torch.from_numpy(batch.input_ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(batch.attention_mask.astype(np.int64)),
            "targets": torch.from_numpy(batch.targets.astype(np.int64)),
            "loss_mask": torch.from_numpy(batch.loss_mask), "advantages": torch.from_numpy(advantages),
            "old_logprobs": torch.from_numpy(old), "ref_logprobs": torch.from_numpy(ref)}
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def torch_grad(loss_positions_only: bool = False):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = torch_policy_loss(hf, t_in, loss_config, loss_positions_only)
        loss.backward()
        return loss.detach()

    def torch_opt():
        torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_GRAD_NORM)
        optimizer.step()

    # ---- check once that the two compute the same loss and gradients ------------------------------
    (loss_ours, metrics), grads = loss_lib.make_value_and_grad(graphdef, loss_config)(params, inputs)
    loss_torch = torch_grad()
    named = dict(hf.named_parameters())
    pairs = {
        "global": (optax.global_norm(grads), torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters()))),
        "embed_tokens (tied)": (jnp.linalg.norm(grads["embed_tokens"][...]), named["model.embed_tokens.weight"].grad),
        "layer 0 q_proj": (jnp.linalg.norm(grads["layers"]["attn"]["q_kernel"][...][0]),
                           named["model.layers.0.self_attn.q_proj.weight"].grad),
        "layer 0 k_proj bias": (jnp.linalg.norm(grads["layers"]["attn"]["k_bias"][...][0]),
                                named["model.layers.0.self_attn.k_proj.bias"].grad),
        f"layer {config.num_layers - 1} down_proj": (
            jnp.linalg.norm(grads["layers"]["mlp"]["down_kernel"][...][-1]),
            named[f"model.layers.{config.num_layers - 1}.mlp.down_proj.weight"].grad),
        "final norm": (jnp.linalg.norm(grads["final_norm"]["scale"][...]), named["model.norm.weight"].grad),
    }
    final = loss_lib.finalize_metrics(metrics)
    print(f"check: loss ours {float(loss_ours):.7f}  torch {float(loss_torch):.7f}  "
          f"|diff| {abs(float(loss_ours) - float(loss_torch)):.1e}   (ratio clipped low/high "
          f"{final['pg_clipfrac_low']:.3f}/{final['pg_clipfrac_high']:.3f}, dual {final['dual_clipfrac']:.3f}, "
          f"kl {final['kl']:.4f})")
    worst = 0.0
    for name, (ours_norm, torch_value) in pairs.items():
        a = float(ours_norm)
        b = float(torch_value if torch_value.ndim == 0 else torch_value.double().norm())
        rel = abs(a - b) / max(abs(b), 1e-30)
        worst = max(worst, rel)
        print(f"check: grad norm {name:<22} ours {a:.6e}  torch {b:.6e}  rel diff {rel:.1e}")
    loss_torch_masked = torch_grad(loss_positions_only=True)
    masked_global = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters())))
    masked_rel = abs(masked_global - float(pairs["global"][0])) / float(pairs["global"][0])
    print(f"check: torch with LM head on loss positions only: loss {float(loss_torch_masked):.7f}, "
          f"global grad norm {masked_global:.6e} (rel diff to ours {masked_rel:.1e})")
    worst = max(worst, masked_rel, abs(float(loss_torch_masked) - float(loss_ours)))
    print(f"check: {'OK' if worst < 1e-4 and abs(float(loss_ours) - float(loss_torch)) < 1e-4 else 'MISMATCH'} "
          f"(tolerance 1e-4)")
    del grads, metrics

    # ---- timing ------------------------------------------------------------------------------
    # Every variant runs once per round, round after round, so that load from other processes on a
    # shared machine falls on all of them alike; the table shows medians over rounds.
    peak32, shape32 = matmul_peak(jnp.float32, args.repeats)
    peak16 = shape16 = None
    if ours_bf16 is not None:
        peak16, shape16 = matmul_peak(jnp.bfloat16, args.repeats)

    def torch_timers(loss_positions_only: bool) -> dict[str, Callable[[], object]]:
        def update():
            torch_grad(loss_positions_only)
            torch_opt()

        return {"grad": lambda: torch_grad(loss_positions_only), "opt": torch_opt, "update": update}

    variants = {"ours float32": jax_timers(ours), "transformers+torch float32": torch_timers(False)}
    if not args.no_torch_masked:
        variants["torch, LM head on loss tokens"] = torch_timers(True)
    if ours_bf16 is not None:
        variants["ours bf16 compute, f32 params"] = jax_timers(ours_bf16)
    times = interleaved_seconds({(name, part): fn for name, parts in variants.items() for part, fn in parts.items()},
                                repeats=args.repeats)
    results = {name: tuple(statistics.median(times[name, part]) for part in ("grad", "opt", "update"))
               for name in variants}
    best = {name: min(times[name, "update"]) for name in variants}

    flops = model_flops(config, rows, length)
    loss_tokens = int(batch.loss_mask.sum())
    executed = executed_flops(config, rows, length, loss_tokens)
    print(f"machine: {machine_summary()}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"model: {config.num_params / 1e6:.1f}M params; batch {rows} x {length} tokens "
          f"({int(batch.loss_mask.sum())} loss tokens); LossConfig token-mean, k3 KL coef {loss_config.kl_coef}, "
          f"dual clip {loss_config.dual_clip}, logits chunk {loss_config.logits_chunk_size}; "
          f"remat {args.remat}; optimizer clip_by_global_norm({MAX_GRAD_NORM}) + AdamW")
    print(f"model FLOPs per update: {flops / 1e12:.3f} TFLOP (6*P*B*T + 12*L*B*T^2*H*Dh); executed with the LM "
          f"head on the {loss_tokens} loss tokens only: {executed / 1e12:.3f} TFLOP")
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"(shared machine: numbers are only comparable within one run)")
    print(f"matmul peak float32: {peak32 / 1e9:.1f} GFLOP/s ({shape32})"
          + (f"; bfloat16: {peak16 / 1e9:.1f} GFLOP/s ({shape16})" if peak16 else ""))
    print("update = loss+grad and optimizer step (ours: one jitted call); GFLOP/s and 'of peak' count model "
          "FLOPs (6PT convention); 'executed' counts the FLOPs that row's implementation actually needs")
    print(f"{'':32s} {'loss+grad ms':>12s} {'optim ms':>9s} {'update ms':>10s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'of peak':>8s} {'executed':>9s}")
    for name, (tg, to, tu) in results.items():
        peak = peak16 if "bf16" in name else peak32
        done = flops if name == "transformers+torch float32" else executed
        print(f"{name:32s} {tg * 1e3:12.1f} {to * 1e3:9.1f} {tu * 1e3:10.1f} {tokens / tu:9.0f} "
              f"{flops / tu / 1e9:8.1f} {flops / tu / peak:8.1%} {done / tu / peak:9.1%}")
    def ratio(name: str, over: str = "ours float32") -> str:
        return (f"{results[name][2] / results[over][2]:.2f} (median; fastest rounds: {best[name] / best[over]:.2f}; "
                f"loss+grad only: {results[name][0] / results[over][0]:.2f})")

    print(f"ratio ours / torch, full update (float32, tokens/s): {ratio('transformers+torch float32')}")
    if not args.no_torch_masked:
        print(f"ratio ours / torch with the LM head on loss tokens too: {ratio('torch, LM head on loss tokens')}")
    if ours_bf16 is not None:
        print(f"ratio ours bf16 / torch float32, full update: "
              f"{ratio('transformers+torch float32', 'ours bf16 compute, f32 params')}")


if __name__ == "__main__":
    main()
