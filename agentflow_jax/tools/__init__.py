"""The agent's tools, and `build_toolbox`, which assembles a Toolbox from short names and a config.

Short names (the tools appear in the toolbox in the order given):

  python      Python_Code_Generator_Tool   (engine writes code, `sandbox` runs it)
  generalist  Generalist_Solution_Generator_Tool (one engine call)
  search      Local_Search_Tool            (BM25 over a local corpus, in-process or via /retrieve)
  google      Ground_Google_Search_Tool    (Serper or Google Programmable Search; needs a key)
  wikipedia   Wikipedia_RAG_Search_Tool    (MediaWiki API)
  web_rag     Web_RAG_Search_Tool          (fetch a page, BM25 over its chunks, engine answers)

`config` is a mapping (or anything with `.to_dict()`, e.g. an ml_collections ConfigDict) with the
Toolbox settings `call_timeout_s` and `max_workers` and one optional section per short name, whose
keys are the tool's constructor arguments, e.g.

  {"call_timeout_s": 60,
   "python": {"wall_timeout_s": 10, "memory_bytes": 2**31, "max_new_tokens": 1024},
   "search": {"corpus_path": "world/corpus.jsonl", "topk": 3},   # or {"url": ".../retrieve"}
   "google": {"num_results": 5}}

The "python" section takes the `SandboxLimits` fields plus PythonCoderTool's own arguments. A
misspelt name or key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

from agentflow_jax.engines import Engine
from agentflow_jax.tools.base import Tool, Toolbox, normalize_tool_name
from agentflow_jax.tools.generator import GeneralistSolutionTool
from agentflow_jax.tools.python_coder import PythonCoderTool
from agentflow_jax.tools.sandbox import SandboxLimits
from agentflow_jax.tools.search import BM25Index, LocalSearchTool, RetrievalSearchTool
from agentflow_jax.tools.web import GoogleSearchTool, WebRagTool, WikipediaSearchTool

_TOOLBOX_KEYS = ("call_timeout_s", "max_workers")


def _allowed_keys(constructor: Callable[..., Any], drop: Sequence[str] = ()) -> set[str]:
    params = inspect.signature(constructor).parameters
    return {name for name, p in params.items() if p.kind == p.KEYWORD_ONLY and name not in drop}


def _check_keys(tool: str, section: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"config section {tool!r} has unknown key(s) {unknown}; valid keys: {sorted(allowed)}")


def _need_engine(tool: str, engine: Engine | None) -> Engine:
    if engine is None:
        raise ValueError(f"tool {tool!r} calls a language model: pass engine= to build_toolbox")
    return engine


def _python(engine: Engine | None, section: dict[str, Any]) -> Tool:
    limit_keys = {f.name for f in dataclasses.fields(SandboxLimits)}
    _check_keys("python", section, limit_keys | _allowed_keys(PythonCoderTool, drop=("limits",)))
    limits = SandboxLimits(**{k: v for k, v in section.items() if k in limit_keys})
    options = {k: v for k, v in section.items() if k not in limit_keys}
    return PythonCoderTool(_need_engine("python", engine), limits=limits, **options)


def _generalist(engine: Engine | None, section: dict[str, Any]) -> Tool:
    _check_keys("generalist", section, _allowed_keys(GeneralistSolutionTool))
    return GeneralistSolutionTool(_need_engine("generalist", engine), **section)


def _search(engine: Engine | None, section: dict[str, Any]) -> Tool:
    del engine  # BM25 needs no model
    if ("url" in section) == ("corpus_path" in section):
        raise ValueError('config section "search" needs exactly one of "corpus_path" (a JSON-lines corpus '
                         'searched in-process) or "url" (a /retrieve server endpoint)')
    if "url" in section:
        _check_keys("search", section, {"url"} | _allowed_keys(RetrievalSearchTool))
        return RetrievalSearchTool(**section)
    _check_keys("search", section, {"corpus_path", "index_dir"} | _allowed_keys(LocalSearchTool))
    index = BM25Index.load_or_build(section.pop("corpus_path"), section.pop("index_dir", None))
    return LocalSearchTool(index, **section)


def _google(engine: Engine | None, section: dict[str, Any]) -> Tool:
    del engine
    _check_keys("google", section, _allowed_keys(GoogleSearchTool))
    return GoogleSearchTool(**section)


def _wikipedia(engine: Engine | None, section: dict[str, Any]) -> Tool:
    del engine
    _check_keys("wikipedia", section, _allowed_keys(WikipediaSearchTool))
    return WikipediaSearchTool(**section)


def _web_rag(engine: Engine | None, section: dict[str, Any]) -> Tool:
    _check_keys("web_rag", section, _allowed_keys(WebRagTool))
    return WebRagTool(_need_engine("web_rag", engine), **section)


TOOL_FACTORIES: dict[str, Callable[[Engine | None, dict[str, Any]], Tool]] = {
    "python": _python,
    "generalist": _generalist,
    "search": _search,
    "google": _google,
    "wikipedia": _wikipedia,
    "web_rag": _web_rag,
}


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a mapping or have .to_dict(), got {type(config).__name__}")


def build_toolbox(names: Sequence[str], *, engine: Engine | None = None, config: Any = None) -> Toolbox:
    """A Toolbox holding the tools named by short name, in the order given (see module docstring)."""
    config = _as_dict(config)
    valid_sections = set(TOOL_FACTORIES) | set(_TOOLBOX_KEYS)
    unknown_sections = sorted(set(config) - valid_sections)
    if unknown_sections:
        raise ValueError(f"unknown tool config key(s) {unknown_sections}; valid keys: {sorted(valid_sections)}")
    keys = [normalize_tool_name(n) for n in names]
    unknown = [n for n, k in zip(names, keys) if k not in TOOL_FACTORIES]
    if unknown:
        raise ValueError(f"unknown tool name(s) {unknown}; valid names: {list(TOOL_FACTORIES)}")
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"tool(s) {duplicates} requested more than once")
    tools = [TOOL_FACTORIES[k](engine, _as_dict(config.get(k))) for k in keys]
    return Toolbox(tools, **{k: config[k] for k in _TOOLBOX_KEYS if k in config})


__all__ = ["TOOL_FACTORIES", "build_toolbox"]
