"""Supervised fine-tuning: the masked next-token loss on (prompt, target) token sequences.

Examples are packed into rows with the same packer as Flow-GRPO's planner calls
(`rl.batch.pack_sequences`: loss only on the positions that predict target tokens), grouped into
length buckets with a constant token budget per batch, and trained with the project's optimizer
(`optim.make_optimizer`). The jitted step compiles once per bucket (`SFTTrainer.trace_counts`).

    trainer = SFTTrainer(model, make_optimizer(optim_config, total_steps=steps), chunk_size=512)
    model, stats = train_supervised(trainer, examples, steps=steps, buckets=(128, 256),
                                    tokens_per_batch=4096, pad_id=tokenizer.pad_token_id, seed=0)
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from typing import Any, Callable, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agentflow_jax.rl.batch import PackedSequences, pack_sequences
from agentflow_jax.rl.logprobs import token_logprobs


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenised example: the prompt ids and the target ids (the reply, ending with its stop token).

    `group` names the example's kind for per-group statistics (e.g. the agent role it imitates).
    """

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    group: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def bucket_of(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `length` tokens, or None."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return None


def batch_plan(examples: Sequence[Example], buckets: Sequence[int], tokens_per_batch: int,
               rng: random.Random) -> list[tuple[int, list[Example]]]:
    """One epoch: (bucket length, examples) batches of `tokens_per_batch // length` rows, shuffled."""
    by_bucket: dict[int, list[Example]] = collections.defaultdict(list)
    for example in examples:
        by_bucket[bucket_of(example.length, buckets)].append(example)
    plan = []
    for length, rows in sorted(by_bucket.items()):
        rng.shuffle(rows)
        size = max(1, tokens_per_batch // length)
        plan.extend((length, rows[i:i + size]) for i in range(0, len(rows), size))
    rng.shuffle(plan)
    return plan


def pack_examples(examples: Sequence[Example], *, length: int, rows: int, pad_id: int) -> PackedSequences:
    """`rows` x `length` arrays of the examples (loss on target tokens only); extra rows are padding."""
    return pack_sequences([e.prompt_ids for e in examples], [e.target_ids for e in examples], pad_id=pad_id,
                          length=length, rows=rows)


class SFTTrainer:
    """The parameters, the optimizer state and one jitted step (per sequence length) of SFT.

    The loss is the mean negative log-likelihood of the target tokens of a batch.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, *, chunk_size: int = 512):
        self.graphdef, self.params = nnx.split(model)
        self.optimizer = optimizer
        self.opt_state = optimizer.init(self.params)
        self.trace_counts: collections.Counter[int] = collections.Counter()
        self._chunk_size = chunk_size
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(self, params, opt_state, input_ids, attention_mask, targets, loss_mask):
        self.trace_counts[input_ids.shape[1]] += 1

        def loss_fn(p):
            logp, _ = token_logprobs(self.graphdef, p, input_ids, attention_mask, targets,
                                     chunk_size=min(self._chunk_size, input_ids.shape[1]))
            return -(logp * loss_mask).sum() / jnp.maximum(loss_mask.sum(), 1.0)

        nll, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll, optax.tree.norm(grads)

    def step(self, batch: PackedSequences) -> tuple[jax.Array, jax.Array]:
        """One optimizer step; returns (target NLL, gradient norm) as device scalars."""
        self.params, self.opt_state, nll, grad_norm = self._step(
            self.params, self.opt_state, batch.input_ids, batch.attention_mask, batch.targets, batch.loss_mask)
        return nll, grad_norm

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def train_supervised(trainer: SFTTrainer, examples: Sequence[Example], *, steps: int, buckets: Sequence[int],
                     tokens_per_batch: int, pad_id: int, seed: int, log_every: int = 25,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs `steps` optimizer steps over `examples` (epochs reshuffled by `seed`); returns statistics.

    Raises:
      ValueError: an example longer than the largest bucket.
    """
    too_long = [e for e in examples if bucket_of(e.length, buckets) is None]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the largest length bucket ({buckets[-1]}; "
                         f"longest {max(e.length for e in too_long)} tokens): add a larger bucket")
    rng = random.Random(seed)
    plan: list[tuple[int, list[Example]]] = []
    history, window = [], []
    tokens = target_tokens = epochs = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if not plan:
            plan = batch_plan(examples, buckets, tokens_per_batch, rng)
            epochs += 1
        length, rows = plan.pop()
        batch = pack_examples(rows, length=length, rows=max(1, tokens_per_batch // length), pad_id=pad_id)
        window.append(trainer.step(batch))
        tokens += int(batch.attention_mask.sum())
        target_tokens += int(batch.loss_mask.sum())
        if step % log_every == 0 or step == steps:
            nll = float(np.mean([float(x) for x, _ in window]))
            elapsed = time.perf_counter() - start
            history.append({"step": step, "target_nll": nll, "grad_norm": float(window[-1][1]),
                            "elapsed_s": round(elapsed, 1)})
            log(f"step {step}/{steps} epoch {epochs}: target nll {nll:.4f} grad norm {float(window[-1][1]):.2f}  "
                f"{tokens / elapsed:.0f} tok/s  {elapsed:.0f}s")
            window = []
    elapsed = time.perf_counter() - start
    return {"steps": steps, "epochs_started": epochs, "tokens": tokens, "target_tokens": target_tokens,
            "seconds": round(elapsed, 1), "tokens_per_s": round(tokens / max(elapsed, 1e-9)),
            "compiles_per_bucket": dict(trainer.trace_counts), "history": history}
