"""Small HTTP helpers for the tools (stdlib urllib): timeouts everywhere, errors that say what to do.

Every failure becomes `HttpRequestError` with a message naming the service, what went wrong and,
when it is clear, what to change. URLs in messages lose their query string, which may hold API keys.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

USER_AGENT = "agentflow_jax/0.1 (tool-using research agent; python urllib)"


class HttpRequestError(RuntimeError):
    """A request to a tool backend failed (unreachable, timeout, HTTP error status, bad payload)."""


def _public(url: str) -> str:
    """`url` without its query string and fragment (they may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def fetch(url: str, *, service: str, timeout_s: float, method: str = "GET",
          params: Mapping[str, Any] | None = None, json_body: Any = None,
          headers: Mapping[str, str] | None = None, max_bytes: int = 5_000_000) -> tuple[bytes, str]:
    """Performs one request; returns (body bytes, content type). Reads at most `max_bytes` bytes."""
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode(params)}"
    data = None
    all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    if json_body is not None:
        data = json.dumps(json_body).encode("utf-8")
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(max_bytes)
            return body, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        excerpt = e.read(300).decode("utf-8", errors="replace").strip()
        raise HttpRequestError(f"{service} answered HTTP {e.code} {e.reason} for {_public(url)}"
                               f"{': ' + excerpt if excerpt else ''}{_status_hint(e.code)}") from None
    except (TimeoutError, socket.timeout):
        raise HttpRequestError(f"{service} did not answer within {timeout_s:g} s ({_public(url)}); "
                               "try again later or raise the timeout") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise HttpRequestError(f"{service} did not answer within {timeout_s:g} s ({_public(url)}); "
                                   "try again later or raise the timeout") from None
        raise HttpRequestError(f"could not reach {service} at {_public(url)}: {e.reason}; check the "
                               "network connection and the endpoint URL") from None
    except (ConnectionError, OSError) as e:
        raise HttpRequestError(f"connection to {service} at {_public(url)} failed: {e}") from None


def fetch_json(url: str, *, service: str, timeout_s: float, **kwargs: Any) -> Any:
    """`fetch`, then parses the body as JSON (a clear error when it is not JSON)."""
    body, _ = fetch(url, service=service, timeout_s=timeout_s, **kwargs)
    try:
        return json.loads(body.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        excerpt = body[:120].decode("utf-8", errors="replace")
        raise HttpRequestError(f"{service} returned a response that is not valid JSON ({e.msg} at "
                               f"position {e.pos}); it starts with {excerpt!r}") from None


def _status_hint(code: int) -> str:
    if code in (401, 403):
        return " (check that the API key is valid and allowed to use this endpoint)"
    if code == 429:
        return " (rate limited: slow down or check the quota)"
    if code >= 500:
        return " (a server-side failure: try again later)"
    return ""
