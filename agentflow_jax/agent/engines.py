"""Text-generation engines the agent's modules call.

An engine turns a batch of chat requests into a batch of generations. Three kinds implement the
same `Engine` protocol: the in-process JAX sampler (policy or frozen parameters), an
OpenAI-compatible HTTP client, and a scripted engine for tests.

Only the in-process engine can report exact token ids and log-probs; training consumes those
(`Generation.prompt_ids`, `.token_ids`, `.logprobs`) and never re-tokenises text.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Protocol, Sequence

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
    """

    messages: tuple[Message, ...]
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """What an engine produced for one request.

    Attributes:
      text: the generated text (stop token not included).
      finish_reason: "stop" (a stop token or end of message) or "length" (hit max_new_tokens).
      prompt_ids: exact prompt token ids fed to the model, when the engine knows them.
      token_ids: exact sampled token ids, when the engine knows them.
      logprobs: log-prob of each sampled token under the sampling distribution, float32 values,
        same length as token_ids.
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


# ----------------------------------------------------------------------------- scripted engine

Responder = Callable[[GenerationRequest], str | Generation]
RequestPredicate = Callable[[GenerationRequest], bool]


def prompt_contains(fragment: str) -> RequestPredicate:
    """A predicate true when any message of the request contains `fragment` (e.g. a module's system prompt)."""
    return lambda request: any(fragment in message["content"] for message in request.messages)


class ScriptedEngine:
    """A deterministic, thread-safe engine for tests: replies come from a function or canned queues.

    Requests are answered one at a time under a lock, in batch order, and every request is recorded
    in `requests`. A reply may be a `str` (finish_reason "stop") or a full `Generation`.
    """

    def __init__(self, respond: Responder):
        self._respond = respond
        self._lock = threading.Lock()
        self._requests: list[GenerationRequest] = []

    @classmethod
    def from_queues(cls, queues: Sequence[tuple[RequestPredicate, Sequence[str | Generation]]]) -> ScriptedEngine:
        """Each request pops the next reply of the first queue whose predicate accepts it.

        A request no predicate accepts, or whose queue is exhausted, raises EngineError.
        """
        pending = [(predicate, collections.deque(replies)) for predicate, replies in queues]

        def respond(request: GenerationRequest) -> str | Generation:
            for index, (predicate, replies) in enumerate(pending):
                if predicate(request):
                    if not replies:
                        raise EngineError(f"ScriptedEngine: queue {index} is exhausted; "
                                          f"add replies for request {_request_snippet(request)}")
                    return replies.popleft()
            raise EngineError(f"ScriptedEngine: no queue accepts request {_request_snippet(request)}")

        return cls(respond)

    @property
    def requests(self) -> tuple[GenerationRequest, ...]:
        """Every request seen so far, in the order answered."""
        with self._lock:
            return tuple(self._requests)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Answers the batch in order, atomically with respect to other threads."""
        with self._lock:
            generations = []
            for request in requests:
                self._requests.append(request)
                reply = self._respond(request)
                generations.append(reply if isinstance(reply, Generation) else Generation(text=reply))
            return generations


def _request_snippet(request: GenerationRequest, limit: int = 120) -> str:
    last = request.messages[-1]["content"] if request.messages else ""
    return repr(last[:limit] + ("…" if len(last) > limit else ""))


# ----------------------------------------------------------------------------- OpenAI-compatible client

_RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_BODY_SNIPPET_CHARS = 300


class _RetryableError(Exception):
    """A failure worth another attempt (connection error, timeout, 408/429/5xx)."""


class OpenAIChatEngine:
    """Client of an OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, hosted APIs).

    Requests of a batch are sent concurrently (at most `max_concurrency` at a time) and answered in
    order. Connection errors, timeouts, 408, 429 and 5xx are retried up to `max_retries` times with
    exponential backoff (`backoff_s`, doubled each retry); other 4xx fail at once. Any failure raises
    EngineError naming the URL, the status and a snippet of the body -- never the API key.

    `top_k` is not part of OpenAI's API: a request with top_k > 0 needs `vllm_extras=True`
    (sent as the vLLM extension field) and is refused otherwise rather than silently ignored.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_concurrency: int = 8,
                 vllm_extras: bool = False):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or max_concurrency < 1 or timeout_s <= 0:
            raise ValueError("need max_retries >= 0, max_concurrency >= 1 and timeout_s > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.vllm_extras = vllm_extras

    def __repr__(self) -> str:
        return f"OpenAIChatEngine(url={self.url!r}, model={self.model!r})"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Sends the batch concurrently; generations in request order; raises EngineError on failure."""
        bodies = [self._request_body(r) for r in requests]
        if len(bodies) <= 1:
            return [self._complete(body) for body in bodies]
        with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(bodies)),
                                                   thread_name_prefix="openai-chat") as pool:
            return list(pool.map(self._complete, bodies))

    def _request_body(self, request: GenerationRequest) -> bytes:
        body = {"model": self.model, "messages": [dict(m) for m in request.messages],
                "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                "top_p": request.top_p}
        if request.top_k > 0:
            if not self.vllm_extras:
                raise ValueError(f"top_k={request.top_k} is not supported by the OpenAI API; construct "
                                 "OpenAIChatEngine(..., vllm_extras=True) for a vLLM server, or set top_k=0")
            body["top_k"] = request.top_k
        return json.dumps(body).encode("utf-8")

    def _complete(self, body: bytes) -> Generation:
        """POSTs one request, retrying transient failures with exponential backoff, and parses the answer."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._parse_answer(self._post(body))
            except _RetryableError as e:
                last_error = e
        raise EngineError(f"{last_error} (gave up after {attempts} attempt(s))")

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            message = f"POST {self.url} returned HTTP {e.code}: {self._snippet(e.read())}"
            if e.code in _RETRYABLE_STATUS:
                raise _RetryableError(message) from None
            raise EngineError(message) from None
        except OSError as e:  # URLError, TimeoutError, ConnectionError
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise _RetryableError(f"POST {self.url} timed out after {self.timeout_s:g} s") from None
            raise _RetryableError(f"POST {self.url} failed: {type(reason).__name__}: {reason}") from None

    def _parse_answer(self, raw: bytes) -> Generation:
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EngineError(f"POST {self.url} gave a malformed answer ({type(e).__name__}: {e}); "
                              f"expected choices[0].message.content: {self._snippet(raw)}") from None
        if not isinstance(text, str):
            raise EngineError(f"POST {self.url}: choices[0].message.content is not text: {self._snippet(raw)}")
        finish_reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return Generation(text=text, finish_reason=finish_reason)

    def _snippet(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return repr(text[:_BODY_SNIPPET_CHARS] + ("…" if len(text) > _BODY_SNIPPET_CHARS else ""))


# ----------------------------------------------------------------------------- engine specs

_SPEC_EXAMPLE = "openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct"


def _openai_engine_from_spec(rest: str, options: Mapping[str, Any]) -> Engine:
    base_url, sep, model = rest.rpartition(",")
    if not sep or not base_url.strip() or not model.strip():
        raise ValueError(f"openai engine spec needs 'openai:URL,MODEL', e.g. {_SPEC_EXAMPLE!r}; "
                         f"got 'openai:{rest}'")
    return OpenAIChatEngine(base_url.strip(), model.strip(), **options)


def _jax_engine_from_spec(rest: str, options: Mapping[str, Any]) -> Engine:
    from agentflow_jax.agent.jax_engine import JaxEngine  # imports JAX only when asked for

    if not rest.strip():
        raise ValueError("jax engine spec needs 'jax:DIR' (a local HF-format Qwen2 directory)")
    return JaxEngine.from_directory(rest.strip(), **options)


ENGINE_SPEC_PARSERS: dict[str, Callable[[str, Mapping[str, Any]], Engine]] = {
    "openai": _openai_engine_from_spec,
    "jax": _jax_engine_from_spec,
}


def engine_from_spec(spec: str, **options: Any) -> Engine:
    """Builds an engine from a spec string `KIND:ARGS`, e.g. 'openai:URL,MODEL'.

    `options` go to the engine's constructor (e.g. timeout_s=30). New kinds register a parser
    `(args, options) -> Engine` in ENGINE_SPEC_PARSERS.
    """
    kind, sep, rest = spec.partition(":")
    parser = ENGINE_SPEC_PARSERS.get(kind.strip().lower()) if sep else None
    if parser is None:
        raise ValueError(f"unknown engine spec {spec!r}; expected KIND:ARGS with KIND in "
                         f"{sorted(ENGINE_SPEC_PARSERS)}, e.g. {_SPEC_EXAMPLE!r}")
    return parser(rest, options)
