"""The Flow-GRPO update both update benchmarks time (train_step_bench.py on CPU, gpu_bench.py on GPU):
its inputs, its matmul FLOPs, and the same loss transcribed to PyTorch for transformers' Qwen2.

Imports only the model, batch and loss modules of agentflow_jax (no trainer, agent or data code),
so it runs on an image with JAX, Flax, PyTorch and transformers alone.
"""

from __future__ import annotations

import functools

import flax.nnx as nnx
import jax
import numpy as np
import torch
import transformers

from agentflow_jax.models import config as model_config
from agentflow_jax.rl import logprobs as logprobs_lib
from agentflow_jax.rl import loss as loss_lib
from agentflow_jax.rl.batch import TurnRecord, pack_turns


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


def update_flops(config: model_config.Qwen2Config, batch: int, length: int, head_positions: int) -> float:
    """Matmul FLOPs of forward + backward with the LM head at `head_positions` positions.

      6 * P_decoder * B * T  +  6 * V * D * N_head  +  6 * L * B * T^2 * (H * Dh)

    2 FLOPs per weight per token in the forward pass and 4 in the backward pass: the decoder weights
    (the P parameters less the embedding and an untied LM head; norms and biases are negligible) at
    all B * T positions, the LM head at the positions it is computed at, and the attention score and
    value matmuls over the causal half of the T x T scores. Recomputation is not counted.
    """
    head = config.vocab_size * config.hidden_size
    attention = 6.0 * config.num_layers * batch * length ** 2 * config.num_heads * config.dim_per_head
    decoder = config.num_params - head * (1 if config.tie_word_embeddings else 2)
    return 6.0 * decoder * batch * length + 6.0 * head * head_positions + attention


def make_loss_inputs(graphdef: nnx.GraphDef, params: nnx.State, config: model_config.Qwen2Config, *, batch: int,
                     prompt: int, response: int,
                     loss_config: loss_lib.LossConfig) -> tuple[loss_lib.LossInputs, dict[str, np.ndarray]]:
    """Loss inputs of `batch` random rows with old / reference log-probs near the current policy's (so
    that ratios and KL are realistic: some clipping), and the same tensors as numpy for torch."""
    records = make_records(batch, prompt, response, config.vocab_size, seed=0)
    packed = pack_turns(records, pad_id=0)
    current, _ = jax.jit(functools.partial(logprobs_lib.token_logprobs, graphdef))(
        params, packed.input_ids, packed.attention_mask, packed.targets, mask=packed.loss_mask)
    current = np.asarray(current, np.float32) * packed.loss_mask
    rng = np.random.default_rng(1)
    old = (current + rng.normal(0, 0.2, current.shape) * packed.loss_mask).astype(np.float32)
    ref = (current + rng.normal(0, 0.3, current.shape) * packed.loss_mask).astype(np.float32)
    advantages = rng.normal(0, 1, packed.input_ids.shape[0]).astype(np.float32)
    inputs = loss_lib.make_loss_inputs(packed, advantages, old, ref, loss_config)
    arrays = {"input_ids": packed.input_ids.astype(np.int64), "attention_mask": packed.attention_mask.astype(np.int64),
              "targets": packed.targets.astype(np.int64), "loss_mask": packed.loss_mask.astype(np.float32),
              "advantages": advantages, "old_logprobs": old, "ref_logprobs": ref}
    return inputs, arrays


def torch_policy_loss(model: transformers.Qwen2ForCausalLM, t: dict[str, torch.Tensor], config: loss_lib.LossConfig,
                      loss_positions_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean Flow-GRPO loss, mean entropy) of `loss.policy_loss`'s formulas in torch;
    `loss_positions_only`: the LM head on loss-mask positions only (as ours), else on every position."""
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
    log_probs = torch.log_softmax(logits.float() / config.temperature, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a metric only (entropy_coef = 0), as ours computes it
        entropy = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum() / mask.sum()
    ratio = torch.exp(torch.clamp(logp - old, -config.log_ratio_clamp, config.log_ratio_clamp))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * config.dual_clip), pg)
    d = torch.clamp(logp - ref, -config.log_ratio_clamp, config.log_ratio_clamp)
    kl = torch.clamp(torch.exp(-d) + d - 1, -config.k3_value_clamp, config.k3_value_clamp)
    return ((pg + config.kl_coef * kl) * mask).sum() / mask.sum(), entropy
