"""`Sampler`: batched generation with a Qwen2 model, n samples per prompt, exact token log-probs.

    sampler = Sampler(model, max_cache_length=4096)               # or Sampler(model, mesh=mesh)
    out = sampler.generate(prompts, max_new_tokens=256, temperature=0.7, top_p=0.99, n=8,
                           frequency_penalty=1.2, stop_token_ids=(151645,), seed=0)
    out.tokens[i * n + j]      # sample j of prompt i: generated ids (a final stop token included)
    out.logprobs[i * n + j]    # log_softmax((logits - penalty * counts) / T) of each id, full vocabulary
    out.finish_reason[i * n + j]                                   # "stop" | "length"
    sampler.update_params(reference_params)                        # same compiled code
    reference = sampler.with_params(reference_params)              # a second sampler, same code

Prompts are left-padded to a length bucket and the batch to a batch bucket (dummy rows), and the
new-token budget is bucketed too, so calls of similar sizes reuse one compiled prefill and one
compiled decode loop; `trace_counts` says how often each was traced (= compiled). The cache holds
the prompt bucket plus the new-token bucket, so decode attention never reads more than the call
can use. On CPU both programs walk the batch in blocks of rows that stay in the processor caches
(`row_blocks`; see `buckets`). On NVIDIA GPUs the decode step runs unrolled over packed per-layer
weights and reads only the cache slots each row uses (`kernels`; see `models.kernels`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from agentflow_jax import sharding
from agentflow_jax.models import kernels as kernels_lib
from agentflow_jax.models.qwen2 import KVCache
from agentflow_jax.sampling import buckets, loop, rules

Array = jax.Array
FINISH_STOP, FINISH_LENGTH = "stop", "length"
_MAX_SEED = 2**32


@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """Generations, grouped by prompt (prompt 0's n samples first), one entry per sample.

    Attributes:
      tokens: generated token ids; when a sample ends with a stop token that token is the last
        entry (it was sampled, and training needs its log-prob).
      logprobs: for each entry of `tokens`, the float32 log-prob of the distribution it was drawn
        from, over the full vocabulary and before top-k / top-p truncation:
        log_softmax((logits - frequency_penalty * counts) / T)[token], counts = occurrences of each
        token among the sample's earlier generated tokens, T = 1 for greedy decoding. Without a
        frequency penalty this is the policy's log-prob at temperature T (what the trainer
        recomputes); with one it is the penalised behaviour distribution's.
      finish_reason: "stop" (ended with a stop token) or "length" (reached max_new_tokens).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """Device state after the prompts, ready to decode.

    Attributes:
      logits: [R, V] float32 next-token logits (R = padded prompts x samples per prompt).
      cache: KV cache with R rows.
      num_samples: the first `num_samples` rows are real (prompts x n), the rest padding.
      capacity: static size of the generated-token buffers (>= max_new_tokens).

    `Sampler.decode` donates the cache: a Prefilled can be decoded once.
    """

    logits: Array
    cache: KVCache
    num_samples: int
    capacity: int


class Sampler:
    """Generates from a Qwen2 model (see module docstring).

    Args:
      model: a `Qwen2ForCausalLM` (its parameters are used, not copied, unless placed on `mesh`).
      max_cache_length: most slots a sequence may use (prompt + generated tokens).
      max_rows: most sequences (prompts x n) one `generate` call keeps in its KV cache; a larger
        call runs as consecutive calls over whole prompts (at least one prompt's n samples each)
        and returns the same samples (None: no limit). It bounds the rollout's cache memory.
      mesh: optional device mesh; parameters are placed with `rules` and the batch is sharded
        over the mesh axes the rules give to "batch" (data and fsdp by default).
      rules: sharding rules table or preset name (default "sampling": weights tensor-parallel,
        replicated over data / fsdp).
      row_blocks: run prefill and decode over the batch in blocks of rows sized to stay in the CPU
        caches (`buckets.PREFILL_BLOCK_TOKENS`, `buckets.DECODE_BLOCK_BYTES`); outputs do not
        depend on it. None = when the parameters live on CPU (accelerators take the whole batch).
      kernels: implementation choices of prefill and decode (`models.kernels`); outputs do not
        depend on them. None = the model's `kernels` if set, else those that pay on the platform of
        the parameters (on a mesh of several devices the decode layers stay under `lax.scan`,
        whose sharded weights need no repacking).
    """

    def __init__(self, model: nnx.Module, *, max_cache_length: int = 4096, max_rows: int | None = None,
                 mesh: Mesh | None = None, rules: sharding.Rules | str = "sampling", row_blocks: bool | None = None,
                 kernels: kernels_lib.Kernels | None = None):
        graphdef, params = nnx.split(model)
        self._setup(graphdef, params, max_cache_length=max_cache_length, max_rows=max_rows, mesh=mesh, rules=rules,
                    row_blocks=row_blocks, kernels=kernels)

    @classmethod
    def from_state(cls, graphdef: nnx.GraphDef, params: nnx.State, *, max_cache_length: int = 4096,
                   max_rows: int | None = None, mesh: Mesh | None = None, rules: sharding.Rules | str = "sampling",
                   row_blocks: bool | None = None, kernels: kernels_lib.Kernels | None = None) -> "Sampler":
        """A sampler for `nnx.split(model)` parts (e.g. the trainer's graphdef and policy params)."""
        sampler = cls.__new__(cls)
        sampler._setup(graphdef, params, max_cache_length=max_cache_length, max_rows=max_rows, mesh=mesh,
                       rules=rules, row_blocks=row_blocks, kernels=kernels)
        return sampler

    def _setup(self, graphdef: nnx.GraphDef, params: nnx.State, *, max_cache_length: int, max_rows: int | None,
               mesh: Mesh | None, rules: sharding.Rules | str, row_blocks: bool | None,
               kernels: kernels_lib.Kernels | None) -> None:
        if max_cache_length < 2:
            raise ValueError(f"max_cache_length must be >= 2 (a prompt token and a new token), got {max_cache_length}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None (no limit), got {max_rows}")
        self.max_cache_length = max_cache_length
        self.max_rows = max_rows
        self.mesh = mesh
        self.rules = sharding.rules_from(rules)
        model = nnx.merge(graphdef, params)
        self.config = model.config
        leaves = jax.tree.leaves(params)
        if kernels is None:
            kernels = model.kernels
            if kernels is None:
                kernels = kernels_lib.for_platform(kernels_lib.platform_of(next(iter(leaves[0].devices()))))
            if mesh is not None and mesh.size > 1:
                kernels = kernels.replace(decode_layers="scan")
        self.kernels = kernels
        model.kernels = kernels  # the prefill's attention follows the sampler's choice too
        graphdef = nnx.graphdef(model)
        self._graphdef = graphdef
        if mesh is not None:
            self._param_shardings = sharding.state_shardings(params, mesh, self.rules)
        else:
            self._param_shardings = jax.tree.map(lambda x: x.sharding, params)
        # Committed to these shardings, as update_params' arrays will be: jit keys its compiled
        # code on committedness too, so uncommitted initial params would recompile after a swap.
        self._params = jax.device_put(params, self._param_shardings)
        leaves = jax.tree.leaves(self._params)
        self._param_bytes = sum(leaf.nbytes for leaf in leaves)
        if row_blocks is None:
            row_blocks = all(device.platform == "cpu" for device in leaves[0].devices())
        self.row_blocks = row_blocks
        self._batch_shards = self._count_batch_shards()
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._prefill_fn = jax.jit(self._counted("prefill", functools.partial(loop.prefill, graphdef)),
                                   static_argnames=("cache_length", "samples_per_prompt", "rows_per_block",
                                                    "query_chunk"))
        self._decode_fn = jax.jit(
            self._counted("decode", functools.partial(loop.decode, graphdef, kernels=kernels)),
            static_argnames=("capacity", "rows_per_block"), donate_argnames=("cache",))

    # -- public API ---------------------------------------------------------------------------------

    @property
    def params(self) -> nnx.State:
        """The parameters currently sampled from."""
        return self._params

    def update_params(self, params: nnx.State | nnx.Module) -> None:
        """Swaps in other weights of the same model (e.g. policy <-> frozen reference).

        They are placed on the current parameters' shardings, so the compiled code is reused.

        Raises:
          ValueError: a different structure, shape or dtype than the current parameters.
        """
        self._params = self._placed(params)

    def with_params(self, params: nnx.State | nnx.Module) -> "Sampler":
        """A second sampler over other weights of the same model (e.g. the frozen reference next to
        the policy) sharing this one's compiled code and `trace_counts`. Raises as `update_params`."""
        other = copy.copy(self)
        other._params = self._placed(params)
        return other

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, frequency_penalty: float = 0.0, n: int = 1,
                 stop_token_ids: Sequence[int] = (), seed: int = 0,
                 sample_ids: Sequence[int] | None = None) -> SamplerOutput:
        """Samples `n` continuations of every prompt.

        Args:
          prompts: token ids per prompt (non-empty, within the vocabulary).
          max_new_tokens: most tokens generated per sample (a stop token counts).
          temperature: 0 = greedy; otherwise logits are divided by it before sampling.
          top_p: nucleus mass kept (1 = off). top_k: most likely tokens kept (0 = off).
          frequency_penalty: subtracted from a token's logit once for every time the sample has
            already generated it, before temperature / top-k / top-p (vLLM's frequency_penalty;
            the reference rollouts use 1.2; 0 = off and costs nothing; negative values favour
            repeats). The returned log-probs are those of the penalised distribution
            (`SamplerOutput.logprobs`).
          n: samples per prompt; each prompt is prefilled once and its cache shared.
          stop_token_ids: a sample ends after emitting one of these (it is kept in the output).
          seed: the same seed gives the same samples (each sample's randomness depends only on
            the seed and its sample id, not on the batch it is in or its padding).
          sample_ids: len(prompts) * n distinct non-negative ids, one per sample in output order
            (e.g. trajectory ids that stay the same however rollouts are split over processes);
            default prompt_index * n + j.
        Returns:
          SamplerOutput with len(prompts) * n entries.
        """
        rule = rules.sampling_rule(temperature, top_p, top_k, frequency_penalty)
        if not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        stop_ids = self._stop_id_array(stop_token_ids)
        per_call = prompts_per_call(len(prompts), n, self.max_rows)
        if per_call >= len(prompts):
            return self._decode(self.prefill(prompts, n=n, max_new_tokens=max_new_tokens), rule, stop_ids, seed,
                                max_new_tokens, sample_ids)
        # Consecutive calls of whole prompts; each sample keeps its id, so its draws do not change.
        ids = _row_sample_ids(sample_ids, len(prompts) * n, len(prompts) * n)
        parts = [self._decode(self.prefill(prompts[start:start + per_call], n=n, max_new_tokens=max_new_tokens),
                              rule, stop_ids, seed, max_new_tokens,
                              ids[start * n:(start + per_call) * n].tolist())
                 for start in range(0, len(prompts), per_call)]
        return SamplerOutput(tokens=[t for p in parts for t in p.tokens],
                             logprobs=[lp for p in parts for lp in p.logprobs],
                             finish_reason=[r for p in parts for r in p.finish_reason])

    def decode(self, prefilled: Prefilled, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, frequency_penalty: float = 0.0, stop_token_ids: Sequence[int] = (),
               seed: int = 0, sample_ids: Sequence[int] | None = None) -> SamplerOutput:
        """Runs the jitted decode alone on a `prefill` result (what `generate` does second).

        `max_new_tokens` may be below the capacity the prefill reserved (the cache then has room
        that is never written; useful to time decode over a long cache). Other arguments as in
        `generate`. The prefilled cache is donated.
        """
        if not 1 <= max_new_tokens <= prefilled.capacity:
            raise ValueError(f"max_new_tokens must be in [1, {prefilled.capacity}] (the prefill's capacity), "
                             f"got {max_new_tokens}")
        if not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        return self._decode(prefilled, rules.sampling_rule(temperature, top_p, top_k, frequency_penalty),
                            self._stop_id_array(stop_token_ids), seed, max_new_tokens, sample_ids)

    def _decode(self, prefilled: Prefilled, rule: rules.SamplingRule, stop_ids: Array, seed: int,
                max_new_tokens: int, sample_ids: Sequence[int] | None) -> SamplerOutput:
        rows = prefilled.logits.shape[0]
        ids = _row_sample_ids(sample_ids, prefilled.num_samples, rows)
        with self._tracing_context():
            state = self._decode_fn(
                self._params, prefilled.cache, prefilled.logits, rule, jnp.asarray(seed, jnp.uint32),
                self._place_batch(ids), self._place_batch(np.arange(rows) >= prefilled.num_samples), stop_ids,
                jnp.asarray(max_new_tokens, jnp.int32), capacity=prefilled.capacity,
                rows_per_block=self._decode_rows_per_block(prefilled.cache))
        tokens, log_probs, lengths, stopped = jax.device_get(
            (state.tokens, state.log_probs, state.lengths, state.stopped))
        real = range(prefilled.num_samples)
        return SamplerOutput(
            tokens=[tokens[r, :lengths[r]].tolist() for r in real],
            logprobs=[log_probs[r, :lengths[r]].tolist() for r in real],
            finish_reason=[FINISH_STOP if stopped[r] else FINISH_LENGTH for r in real],
        )

    def prefill(self, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int = 256) -> Prefilled:
        """Runs the jitted prefill alone (what `generate` does first); results stay on device.

        Useful to time the prefill (block on `.logits`). Arguments as in `generate`.
        """
        prompts = self._check_prompts(prompts)
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_bucket, capacity = buckets.cache_layout(max(map(len, prompts)), max_new_tokens,
                                                       self.max_cache_length)
        group_shards = self._batch_shards // math.gcd(self._batch_shards, n)
        rows = buckets.batch_bucket(len(prompts), multiple_of=group_shards)
        input_ids, mask = _left_pad(prompts, rows, prompt_bucket)
        rows_per_block = rows
        if self.row_blocks:
            rows_per_block = buckets.rows_per_block(rows, prompt_bucket, buckets.PREFILL_BLOCK_TOKENS,
                                                    group_shards) or group_shards
        with self._tracing_context():
            logits, cache = self._prefill_fn(self._params, self._place_batch(input_ids), self._place_batch(mask),
                                             cache_length=prompt_bucket + capacity, samples_per_prompt=n,
                                             rows_per_block=rows_per_block, query_chunk=buckets.PREFILL_QUERY_CHUNK)
        return Prefilled(logits=logits, cache=cache, num_samples=len(prompts) * n, capacity=capacity)

    # -- internals ----------------------------------------------------------------------------------

    def _placed(self, params: nnx.State | nnx.Module) -> nnx.State:
        """params checked against the current ones and put on their shardings."""
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        old_def, new_def = jax.tree.structure(self._params), jax.tree.structure(params)
        if old_def != new_def:
            raise ValueError(f"got a parameter tree of a different structure:\n{new_def}\nexpected\n{old_def}")
        mismatched = [
            f"{jax.tree_util.keystr(path)}: {new.shape} {new.dtype} (expected {old.shape} {old.dtype})"
            for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(self._params), jax.tree.leaves(params))
            if old.shape != new.shape or old.dtype != new.dtype]
        if mismatched:
            raise ValueError("got parameters of other shapes / dtypes than the sampler's model: "
                             + "; ".join(mismatched))
        return jax.device_put(params, self._param_shardings)

    def _decode_rows_per_block(self, cache: KVCache) -> int:
        """Rows per decode block: with `row_blocks`, the most rows whose KV cache fits in
        DECODE_BLOCK_BYTES next to the weights; the whole batch without, or when the weights alone
        exceed it (each block re-reads them every step)."""
        rows = cache.valid.shape[0]
        if not self.row_blocks:
            return rows
        row_bytes = (cache.k.nbytes + cache.v.nbytes) // rows
        budget = buckets.DECODE_BLOCK_BYTES - self._param_bytes
        return buckets.rows_per_block(rows, row_bytes, budget, self._batch_shards) or rows

    def _counted(self, name: str, fn: Callable) -> Callable:
        """fn, counting in `trace_counts[name]` each time JAX traces it (i.e. compiles it)."""

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.trace_counts[name] += 1
            return fn(*args, **kwargs)

        traced.__name__ = traced.__qualname__ = f"sampler_{name}"  # names the program in compile logs
        return traced

    def _tracing_context(self) -> contextlib.AbstractContextManager:
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.activation_sharding(self.mesh, self.rules)

    def _count_batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        axes = dict(self.rules).get("batch")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return math.prod(self.mesh.shape.get(axis, 1) for axis in axes)

    def _place_batch(self, array: np.ndarray) -> Array:
        """Host array with a leading batch axis -> device array (batch-sharded on the mesh)."""
        if self.mesh is None:
            return jnp.asarray(array)
        axes = ("batch",) + (None,) * (array.ndim - 1)
        spec = sharding.partition_spec(array.shape, axes, self.mesh, self.rules)
        return jax.device_put(array, NamedSharding(self.mesh, spec))

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        checked = []
        vocab = self.config.vocab_size
        for i, prompt in enumerate(prompts):
            ids = np.asarray(prompt)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(f"prompt {i} must be a flat list of int token ids, got {type(prompt).__name__} "
                                 f"of shape {ids.shape} and dtype {ids.dtype}")
            if ids.size == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                                 "(e.g. a BOS or chat-template token)")
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
            checked.append(ids.astype(np.int32))
        return checked

    @staticmethod
    def _stop_id_array(stop_token_ids: Sequence[int]) -> Array:
        """[S] int32, padded with -1 to a power of two >= 8 (few distinct shapes)."""
        ids = [int(t) for t in stop_token_ids]
        if any(t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {ids}")
        size = max(8, 1 << max(len(ids) - 1, 0).bit_length())
        return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def prompts_per_call(num_prompts: int, n: int, max_rows: int | None) -> int:
    """How many of `num_prompts` prompts (n samples each) one sampler call takes when its KV cache
    holds at most `max_rows` sequences (None: all of them); at least one prompt."""
    if max_rows is None:
        return num_prompts
    return min(num_prompts, max(1, max_rows // max(n, 1)))


def _row_sample_ids(sample_ids: Sequence[int] | None, samples: int, rows: int) -> np.ndarray:
    """[rows] int32: the given ids of the `samples` real rows (default 0..samples-1), then ids for the
    padding rows that no real row has."""
    if sample_ids is None:
        return np.arange(rows, dtype=np.int32)
    ids = np.asarray(sample_ids, np.int64)
    if ids.shape != (samples,) or (ids < 0).any() or len(np.unique(ids)) != samples or ids.max() >= 2**31 - rows:
        raise ValueError(f"sample_ids must be {samples} distinct ids in [0, 2**31 - {rows}) (one per sample), got "
                         f"{list(sample_ids)[:8]}...")
    padding = ids.max() + 1 + np.arange(rows - samples)
    return np.concatenate([ids, padding]).astype(np.int32)


def _left_pad(prompts: list[np.ndarray], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, length] int32 ids and bool mask, prompts right-aligned; extra rows hold one dummy
    token (id 0) so no row is all padding."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    mask[len(prompts):, -1] = True
    return ids, mask
