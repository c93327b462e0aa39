"""The in-process engine: chat requests -> exact token ids -> the JAX sampler -> text.

Every generation keeps the prompt token ids fed to the model, the sampled token ids (ending
with the stop token when the model stopped) and their log-probs, exactly as sampled: training
consumes these and never re-tokenises text.

The same compiled sampler serves the policy and the frozen reference: two engines may share one
`Sampler` graph with different parameters (`Sampler.from_state(graphdef, params)`), or one engine
may swap weights with `sampler.update_params`.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Sequence

import jax.numpy as jnp

from agentflow_jax.engines.base import Generation, GenerationRequest
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import Tokenizer, load_tokenizer
from agentflow_jax.sampling import Sampler

_SEED_MODULUS = 2**32


class JaxEngine:
    """Answers chat requests with a `Sampler` and a `Tokenizer`.

    Requests with the same sampling parameters go to the sampler in one batched call. When a
    batch consists of runs of `k` identical requests (the `n` samples of each query at a
    trajectory's first planner turn), each distinct prompt is prefilled once and sampled `k` times.

    Args:
      sampler: the sampler (holds the parameters).
      tokenizer: encodes chats (ChatML generation prompt) and decodes samples.
      seed: base seed; call i uses a seed derived from (seed, i), so runs are reproducible.
      stop_token_ids: defaults to the tokenizer's eos ids.
    """

    def __init__(self, sampler: Sampler, tokenizer: Tokenizer, *, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(stop_token_ids if stop_token_ids is not None else tokenizer.eos_token_ids)
        self._seed = seed
        self._calls = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def from_directory(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                       dtype: Any = jnp.float32, max_cache_length: int = 4096, seed: int = 0) -> "JaxEngine":
        """Loads a local HF-format Qwen2 directory; the tokenizer comes from `tokenizer` or the same directory
        (its HF tokenizer files, else a SentencePiece `tokenizer.model`)."""
        model = hf_io.load_pretrained(path, dtype=dtype)
        return cls(Sampler(model, max_cache_length=max_cache_length),
                   load_tokenizer(tokenizer if tokenizer is not None else _tokenizer_spec(os.fspath(path))), seed=seed)

    def next_seed(self) -> int:
        """A fresh seed for the next sampler call (thread-safe, deterministic sequence)."""
        with self._lock:
            call = next(self._calls)
        return (self._seed * 1_000_003 + call) % _SEED_MODULUS

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One generation per request, in order (see class docstring for batching)."""
        results: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            key = (request.max_new_tokens, request.temperature, request.top_p, request.top_k,
                   request.frequency_penalty)
            groups.setdefault(key, []).append(i)
        for (max_new_tokens, temperature, top_p, top_k, frequency_penalty), indices in groups.items():
            prompts = [tuple(self.tokenizer.encode_chat(requests[i].messages)) for i in indices]
            unique, n = _runs_of_equal_length(prompts)
            sample_ids = [requests[i].sample_id for i in indices]
            out = self.sampler.generate([list(p) for p in unique], max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, top_k=top_k,
                                        frequency_penalty=frequency_penalty, n=n,
                                        stop_token_ids=self.stop_token_ids, seed=self.next_seed(),
                                        sample_ids=None if None in sample_ids else sample_ids)
            for i, prompt, tokens, logprobs, reason in zip(indices, prompts, out.tokens, out.logprobs,
                                                           out.finish_reason):
                text_ids = tokens[:-1] if reason == "stop" else tokens
                results[i] = Generation(text=self.tokenizer.decode(text_ids), finish_reason=reason,
                                        prompt_ids=prompt, token_ids=tuple(tokens), logprobs=tuple(logprobs))
        return results


def _runs_of_equal_length(prompts: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], int]:
    """(distinct prompts, k) when `prompts` is runs of k identical prompts each; else (prompts, 1)."""
    for k in range(len(prompts), 1, -1):
        if len(prompts) % k:
            continue
        starts = prompts[::k]
        if all(prompts[j] == starts[j // k] for j in range(len(prompts))):
            return starts, k
    return prompts, 1


def _tokenizer_spec(directory: str) -> str:
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return directory
    sentencepiece_model = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(sentencepiece_model):
        return sentencepiece_model
    raise FileNotFoundError(f"no tokenizer in {directory!r} (expected tokenizer.json / tokenizer_config.json or "
                            "a SentencePiece tokenizer.model); pass tokenizer= explicitly")
