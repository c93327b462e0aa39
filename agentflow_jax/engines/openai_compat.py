"""Client of an OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, hosted APIs), on httpx."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Any, Sequence

import httpx

from agentflow_jax.engines.base import EngineError, Generation, GenerationRequest

_RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_BODY_SNIPPET_CHARS = 300
_MAX_RETRY_AFTER_S = 60.0


class _RetryableError(Exception):
    """A failure worth another attempt (connection error, timeout, 408/429/5xx); `wait_s` from Retry-After."""

    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


class OpenAIChatEngine:
    """Sends each request of a batch concurrently (at most `max_concurrency` at a time); answers in order.

    Connection errors, timeouts, 408, 429 and 5xx are retried up to `max_retries` times with
    exponential backoff (`backoff_s`, doubled each retry, or the server's Retry-After when it gives
    one, capped at 60 s); other 4xx fail at once. Any failure raises EngineError naming the URL,
    the status and a snippet of the body -- never the API key (which defaults to $OPENAI_API_KEY).

    `top_k` is not part of OpenAI's API: a request with top_k > 0 needs `vllm_extras=True`
    (sent as the vLLM extension field) and is refused otherwise rather than silently ignored.
    Generations carry text only (no token ids): such an engine can serve the frozen modules and
    the judge, not a planner being trained.
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
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

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

    def _http(self) -> httpx.Client:
        """One connection pool per engine, created on first use (httpx clients are thread-safe)."""
        with self._client_lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._client = httpx.Client(timeout=self.timeout_s, headers=headers,
                                            limits=httpx.Limits(max_connections=self.max_concurrency))
            return self._client

    def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in request.messages],
                                "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                                "top_p": request.top_p}
        if request.frequency_penalty:
            body["frequency_penalty"] = request.frequency_penalty
        if request.top_k > 0:
            if not self.vllm_extras:
                raise ValueError(f"top_k={request.top_k} is not supported by the OpenAI API; construct "
                                 "OpenAIChatEngine(..., vllm_extras=True) for a vLLM server, or set top_k=0")
            body["top_k"] = request.top_k
        return body

    def _complete(self, body: dict[str, Any]) -> Generation:
        """POSTs one request, retrying transient failures with exponential backoff, and parses the answer."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._parse_answer(self._post(body))
            except _RetryableError as e:
                last_error = e
                if attempt + 1 < attempts:
                    time.sleep(e.wait_s if e.wait_s is not None else self.backoff_s * 2 ** attempt)
        raise EngineError(f"{last_error} (gave up after {attempts} attempt(s))")

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            response = self._http().post(self.url, json=body)
        except httpx.TimeoutException:
            raise _RetryableError(f"POST {self.url} timed out after {self.timeout_s:g} s") from None
        except httpx.TransportError as e:
            raise _RetryableError(f"POST {self.url} failed: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            message = f"POST {self.url} returned HTTP {response.status_code}: {self._snippet(response.content)}"
            if response.status_code in _RETRYABLE_STATUS:
                raise _RetryableError(message, _retry_after_s(response))
            raise EngineError(message)
        return response

    def _parse_answer(self, response: httpx.Response) -> Generation:
        try:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EngineError(f"POST {self.url} gave a malformed answer ({type(e).__name__}: {e}); "
                              f"expected choices[0].message.content: {self._snippet(response.content)}") from None
        if not isinstance(text, str):
            raise EngineError(f"POST {self.url}: choices[0].message.content is not text: "
                              f"{self._snippet(response.content)}")
        finish_reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return Generation(text=text, finish_reason=finish_reason)

    def _snippet(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return repr(text[:_BODY_SNIPPET_CHARS] + ("…" if len(text) > _BODY_SNIPPET_CHARS else ""))


def _retry_after_s(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (numeric form only), capped; None when absent."""
    try:
        return min(max(float(response.headers["Retry-After"]), 0.0), _MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None
