"""A deterministic, thread-safe engine whose replies come from a function or canned queues (tests)."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Sequence

from agentflow_jax.engines.base import EngineError, Generation, GenerationRequest

Responder = Callable[[GenerationRequest], str | Generation]
RequestPredicate = Callable[[GenerationRequest], bool]


def prompt_contains(fragment: str) -> RequestPredicate:
    """A predicate true when any message of the request contains `fragment` (e.g. a module's system prompt)."""
    return lambda request: any(fragment in message["content"] for message in request.messages)


class ScriptedEngine:
    """Requests are answered one at a time under a lock, in batch order, and every request is recorded
    in `requests`. A reply may be a `str` (finish_reason "stop") or a full `Generation`.
    """

    def __init__(self, respond: Responder):
        self._respond = respond
        self._lock = threading.Lock()
        self._requests: list[GenerationRequest] = []

    @classmethod
    def from_queues(cls, queues: Sequence[tuple[RequestPredicate, Sequence[str | Generation]]]) -> "ScriptedEngine":
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
