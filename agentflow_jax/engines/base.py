"""The engine interface: chat requests in, generations (text, and exact token ids when known) out.

Only an engine that runs the model in-process can report exact token ids and log-probs; training
consumes those (`Generation.prompt_ids`, `.token_ids`, `.logprobs`) and never re-tokenises text.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One chat completion to produce.

    Attributes:
      messages: the conversation, oldest first.
      max_new_tokens: upper bound on generated tokens.
      temperature: 0 means greedy.
      top_p: nucleus mass kept (1.0 keeps everything).
      top_k: keep the k most likely tokens (0 disables).
      frequency_penalty: subtracted from a token's logit once per earlier occurrence in this
        generation, before temperature and truncation (vLLM / OpenAI semantics; 0 disables).
      sample_id: a stable id of this sample (e.g. its trajectory's index in the global batch) from
        which an in-process engine draws its randomness, so a sample does not depend on which other
        requests share its batch or on the process that runs it; None: its position in the call.
    """

    messages: tuple[Message, ...]
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    sample_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """What an engine produced for one request.

    Attributes:
      text: the generated text (stop token not included).
      finish_reason: "stop" (a stop token or end of message) or "length" (hit max_new_tokens).
      prompt_ids: exact prompt token ids fed to the model, when the engine knows them.
      token_ids: exact sampled token ids, when the engine knows them.
      logprobs: log-prob of each sampled token under the distribution it was drawn from (tempered,
        frequency-penalised, before top-k / top-p truncation), float32 values, same length as token_ids.
    """

    text: str
    finish_reason: str = "stop"
    prompt_ids: tuple[int, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None


class Engine(Protocol):
    """Anything that answers a batch of chat requests, one generation per request, in order."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        ...


class EngineError(RuntimeError):
    """An engine could not produce a generation (unreachable server, bad answer, exhausted script)."""
