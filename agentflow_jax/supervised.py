"""Supervised fine-tuning: the masked next-token loss on (prompt, target) token sequences.

Examples are packed into rows with the same packer as Flow-GRPO's planner calls
(`rl.batch.pack_sequences`: loss only on the positions that predict target tokens), grouped into
length buckets with a constant token budget per batch, and trained with the project's optimizer
(`optim.make_optimizer`). The jitted step compiles once per bucket (`SFTTrainer.trace_counts`).

    trainer = SFTTrainer(model, make_optimizer(optim_config, total_steps=steps), chunk_size=512)
    model, stats = train_supervised(trainer, examples, steps=steps, buckets=(128, 256),
                                    tokens_per_batch=4096, pad_id=tokenizer.pad_token_id, seed=0)

Chats become examples through the tokenizer's chat template (`chat_examples`): one example per
assistant message that carries loss, its prompt being exactly what the model is given when it
writes that message (the conversation before it plus the generation prompt), as in the agent.

On a device mesh (`SFTTrainer(..., mesh=...)`) the parameters and the optimizer state keep the
parameters' shardings (`sharding.TRAINING_RULES` by default), batches are split over the batch
axes (rows padded with inert rows to a multiple of their size) and activations are constrained
by their logical axes; the step gives the 1-device step's result. The trainer's `TrainState`
(params, optimizer state, step, seed) is what `checkpoint.TrainCheckpointer` saves and restores;
the data order is a function of the seed and the step, so a restored run continues exactly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from agentflow_jax import sharding
from agentflow_jax.models.tokenizer import Tokenizer
from agentflow_jax.rl.batch import PackedSequences, pack_sequences
from agentflow_jax.rl.logprobs import token_logprobs
from agentflow_jax.train_state import TrainState


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


def chat_examples(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], trained: Sequence[int],
                  *, group: str = "") -> list[Example]:
    """One example per trained assistant message of a chat.

    The prompt of message k is `tokenizer.encode_chat(messages[:k])` with the generation prompt
    (ChatML: the chat so far, then `<|im_start|>assistant\\n`), i.e. exactly what the model reads when
    it writes message k; the target is the message's content encoded as plain text followed by the
    end-of-turn token (`tokenizer.eos_token_ids[0]`: `<|im_end|>` for ChatML vocabularies). Earlier
    assistant messages are context of the later examples and carry loss in their own.

    Args:
      messages: {"role", "content"} dicts.
      trained: indices of assistant messages whose tokens carry loss.
    Raises:
      ValueError: an index that is not an assistant message, or the first message.
    """
    examples = []
    for index in trained:
        if not 0 < index < len(messages) or messages[index]["role"] != "assistant":
            raise ValueError(f"message {index} is not an assistant message after the first one; "
                             "only assistant messages can be targets")
        prompt = tokenizer.encode_chat(messages[:index], add_generation_prompt=True)
        target = tokenizer.encode(messages[index]["content"], allow_special=False) + [tokenizer.eos_token_ids[0]]
        examples.append(Example(prompt_ids=tuple(prompt), target_ids=tuple(target), group=group))
    return examples


def check_batching(length_buckets: Sequence[int], tokens_per_batch: int) -> None:
    """Raises ValueError unless the buckets are increasing lengths >= 8 and a batch holds a row of the longest."""
    buckets = list(length_buckets)
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 8:
        raise ValueError(f"length_buckets must be increasing lengths >= 8, got {buckets}")
    if tokens_per_batch < buckets[-1]:
        raise ValueError(f"tokens_per_batch ({tokens_per_batch}) must hold at least one row of the "
                         f"longest bucket ({buckets[-1]})")


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


def batch_stream(examples: Sequence[Example], buckets: Sequence[int], tokens_per_batch: int,
                 seed: int) -> Iterator[tuple[int, int, list[Example]]]:
    """Endless (epoch, bucket length, examples) batches: epoch after epoch of `batch_plan`, each
    reshuffled; the sequence depends on the arguments only (a resumed run skips what it has seen)."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        plan = batch_plan(examples, buckets, tokens_per_batch, rng)
        epoch += 1
        while plan:
            length, rows = plan.pop()
            yield epoch, length, rows


def pack_examples(examples: Sequence[Example], *, length: int, rows: int, pad_id: int) -> PackedSequences:
    """`rows` x `length` arrays of the examples (loss on target tokens only); extra rows are padding."""
    return pack_sequences([e.prompt_ids for e in examples], [e.target_ids for e in examples], pad_id=pad_id,
                          length=length, rows=rows)


class SFTTrainer:
    """The training state (parameters, optimizer state, step) and one jitted step per sequence length.

    The loss is the mean negative log-likelihood of the target tokens of a batch.

    Args:
      model: the model to train (its parameters are split off; `model()` rebuilds it).
      optimizer: an optax transformation (`optim.make_optimizer`).
      chunk_size: positions per LM-head chunk (`rl.logprobs.token_logprobs`).
      mesh: a device mesh: parameters and optimizer state are placed by their logical axes and
        `rules`, batches split over the batch axes (module docstring). None: one device.
      rules: logical-axis rules on the mesh (default `sharding.TRAINING_RULES`).
      seed: the run's base seed, kept in the state (checkpoints record it).
      loss_positions_only: run the LM head on target positions only. Its cost then follows the
        target tokens instead of every token (prompts are most of a planner call); the head's
        gradient is summed in another order, so results differ from the default in the last bits.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, *, chunk_size: int = 512,
                 mesh: Mesh | None = None, rules: sharding.Rules | str | None = None, seed: int = 0,
                 loss_positions_only: bool = False):
        self.graphdef, params = nnx.split(model)
        self.optimizer = optimizer
        self.mesh, self.rules = mesh, rules
        self.trace_counts: collections.Counter[int] = collections.Counter()
        self._chunk_size = chunk_size
        self._loss_positions_only = loss_positions_only
        if mesh is None:
            self.state = TrainState.create(params, optimizer, seed=seed)
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
        else:
            params = sharding.shard_state(params, mesh, rules)
            param_shardings = jax.tree.map(lambda x: x.sharding, params)
            opt_shardings = jax.tree.map(lambda x: x.sharding, sharding.abstract_opt_state(optimizer, params))
            opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
            self.state = TrainState.create(params, optimizer, seed=seed, opt_state=opt_state)
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1),
                                 out_shardings=(param_shardings, opt_shardings, None, None))
        self._nll_sums = jax.jit(self._batch_nll_sums)

    # -- the computation --------------------------------------------------------------------------

    def _target_logprobs(self, params, input_ids, attention_mask, targets, loss_mask):
        """[B, T] log-probs of the targets (0 off the loss positions when `loss_positions_only`)."""
        logp, _ = token_logprobs(self.graphdef, params, input_ids, attention_mask, targets,
                                 chunk_size=min(self._chunk_size, input_ids.shape[1]),
                                 mask=loss_mask if self._loss_positions_only else None)
        return logp

    def _train_step(self, params, opt_state, input_ids, attention_mask, targets, loss_mask):
        self.trace_counts[input_ids.shape[1]] += 1

        def loss_fn(p):
            logp = self._target_logprobs(p, input_ids, attention_mask, targets, loss_mask)
            return -(logp * loss_mask).sum() / jnp.maximum(loss_mask.sum(), 1.0)

        nll, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll, optax.tree.norm(grads)

    def _batch_nll_sums(self, params, input_ids, attention_mask, targets, loss_mask):
        logp = self._target_logprobs(params, input_ids, attention_mask, targets, loss_mask)
        return -(logp * loss_mask).sum(), loss_mask.sum()

    # -- the interface ----------------------------------------------------------------------------

    @property
    def params(self) -> nnx.State:
        return self.state.params

    @property
    def batch_shards(self) -> int:
        """How many ways a batch's rows are split (1 without a mesh)."""
        if self.mesh is None:
            return 1
        axes = dict(sharding.rules_from(self.rules)).get("batch")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return math.prod(self.mesh.shape.get(axis, 1) for axis in axes)

    def rows_for(self, length: int, tokens_per_batch: int) -> int:
        """Rows of a batch of `length`-token rows: `tokens_per_batch // length` (at least 1), rounded
        up to a multiple of `batch_shards` (the extra rows are padding)."""
        rows = max(1, tokens_per_batch // length)
        return math.ceil(rows / self.batch_shards) * self.batch_shards

    def step(self, batch: PackedSequences) -> tuple[jax.Array, jax.Array]:
        """One optimizer step; returns (target NLL, gradient norm) as device scalars."""
        with self._tracing_context():
            params, opt_state, nll, grad_norm = self._step(self.state.params, self.state.opt_state,
                                                           *self._place(batch))
        self.state = self.state.replace(params=params, opt_state=opt_state, step=self.state.step + 1)
        return nll, grad_norm

    def nll_sums(self, batch: PackedSequences) -> tuple[jax.Array, jax.Array]:
        """(sum of the target tokens' NLL, number of target tokens) of a batch, without an update."""
        with self._tracing_context():
            return self._nll_sums(self.state.params, *self._place(batch))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params)

    def _tracing_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.mesh is None else sharding.activation_sharding(self.mesh, self.rules)

    def _place(self, batch: PackedSequences) -> tuple[Any, ...]:
        """The batch's four [B, T] arrays; on a mesh, split over the batch axes (every process holds
        the whole host batch and supplies the shards it owns)."""
        arrays = (batch.input_ids, batch.attention_mask, batch.targets, batch.loss_mask)
        if self.mesh is None:
            return arrays
        spec = sharding.partition_spec(batch.input_ids.shape, ("batch", "length"), self.mesh, self.rules)
        placement = NamedSharding(self.mesh, spec)
        return tuple(jax.make_array_from_callback(a.shape, placement, lambda index, a=a: a[index]) for a in arrays)


def mean_nll(trainer: SFTTrainer, examples: Sequence[Example], *, buckets: Sequence[int], tokens_per_batch: int,
             pad_id: int) -> float:
    """The NLL per target token over `examples` (held-out loss), batched by bucket like training."""
    total = count = 0.0
    by_bucket: dict[int, list[Example]] = collections.defaultdict(list)
    for example in examples:
        by_bucket[bucket_of(example.length, buckets)].append(example)
    for length, rows in sorted(by_bucket.items()):
        size = max(1, tokens_per_batch // length)
        for i in range(0, len(rows), size):
            nll, tokens = trainer.nll_sums(pack_examples(rows[i:i + size], length=length,
                                                         rows=trainer.rows_for(length, tokens_per_batch),
                                                         pad_id=pad_id))
            total, count = total + float(nll), count + float(tokens)
    return total / max(count, 1.0)


StepCallback = Callable[[int, Mapping[str, Any]], None]
"""`after_step(step, info)`: info has "nll" and "grad_norm" (device scalars), "tokens" and
"target_tokens" (of the batch), "epoch" and "elapsed_s"."""


def train_supervised(trainer: SFTTrainer, examples: Sequence[Example], *, steps: int, buckets: Sequence[int],
                     tokens_per_batch: int, pad_id: int, seed: int, log_every: int = 25,
                     log: Callable[[str], None] = print, after_step: StepCallback | None = None) -> dict[str, Any]:
    """Trains until `steps` optimizer steps are done (from the trainer's state: a restored trainer
    continues where it stopped, on the same batches); returns statistics of this call.

    Batches come from `batch_stream(examples, buckets, tokens_per_batch, seed)`; `after_step` is
    called after each step (logging, evaluation, checkpoints).

    Raises:
      ValueError: an example longer than the largest bucket.
    """
    too_long = [e for e in examples if bucket_of(e.length, buckets) is None]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the largest length bucket ({buckets[-1]}; "
                         f"longest {max(e.length for e in too_long)} tokens): add a larger bucket")
    stream = batch_stream(examples, buckets, tokens_per_batch, seed)
    first = trainer.state.step + 1
    for _ in range(first - 1):
        next(stream)
    history, window = [], []
    tokens = target_tokens = epoch = 0
    start = time.perf_counter()
    for step in range(first, steps + 1):
        epoch, length, rows = next(stream)
        batch = pack_examples(rows, length=length, rows=trainer.rows_for(length, tokens_per_batch), pad_id=pad_id)
        nll, grad_norm = trainer.step(batch)
        window.append((nll, grad_norm))
        batch_tokens, batch_targets = int(batch.attention_mask.sum()), int(batch.loss_mask.sum())
        tokens += batch_tokens
        target_tokens += batch_targets
        elapsed = time.perf_counter() - start
        if after_step is not None:
            after_step(step, {"nll": nll, "grad_norm": grad_norm, "tokens": batch_tokens,
                              "target_tokens": batch_targets, "epoch": epoch, "elapsed_s": elapsed})
        if step % log_every == 0 or step == steps:
            mean = float(np.mean([float(x) for x, _ in window]))
            history.append({"step": step, "target_nll": mean, "grad_norm": float(window[-1][1]),
                            "elapsed_s": round(elapsed, 1)})
            log(f"step {step}/{steps} epoch {epoch}: target nll {mean:.4f} grad norm {float(window[-1][1]):.2f}  "
                f"{tokens / elapsed:.0f} tok/s  {elapsed:.0f}s")
            window = []
    elapsed = time.perf_counter() - start
    return {"steps": steps, "epochs_started": epoch, "tokens": tokens, "target_tokens": target_tokens,
            "seconds": round(elapsed, 1), "tokens_per_s": round(tokens / max(elapsed, 1e-9)),
            "compiles_per_bucket": dict(trainer.trace_counts), "history": history}
