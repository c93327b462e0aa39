"""Engine specs: strings such as "openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct" or "jax:/models/q"
name an engine in a config file or on a command line; `engine_from_spec` builds it.

A spec is `KIND:ARGS`. Built-in kinds:

  jax:DIR            a local HF-format Qwen2 directory served by the in-process JAX sampler
                     (options: tokenizer, dtype, max_cache_length, seed)
  openai:URL,MODEL   an OpenAI-compatible server (options: api_key, timeout_s, max_retries,
                     backoff_s, max_concurrency, vllm_extras)

Other packages add kinds without this module importing them: programmatically with
`register_engine_kind`, or declaratively with a Python entry point in the group
"agentflow_jax.engines" whose object is a factory `(args, options) -> Engine` (the toy world
registers "toy" this way in setup.py).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable, Mapping

from agentflow_jax.engines.base import Engine

EngineFactory = Callable[[str, Mapping[str, Any]], Engine]
"""(ARGS of the spec, constructor options) -> Engine."""

ENTRY_POINT_GROUP = "agentflow_jax.engines"
_SPEC_EXAMPLE = "openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct"


def _openai_engine(args: str, options: Mapping[str, Any]) -> Engine:
    from agentflow_jax.engines.openai_compat import OpenAIChatEngine

    base_url, sep, model = args.rpartition(",")
    if not sep or not base_url.strip() or not model.strip():
        raise ValueError(f"openai engine spec needs 'openai:URL,MODEL', e.g. {_SPEC_EXAMPLE!r}; got 'openai:{args}'")
    return OpenAIChatEngine(base_url.strip(), model.strip(), **options)


def _jax_engine(args: str, options: Mapping[str, Any]) -> Engine:
    from agentflow_jax.engines.jax_engine import JaxEngine  # imports JAX only when asked for

    if not args.strip():
        raise ValueError("jax engine spec needs 'jax:DIR' (a local HF-format Qwen2 directory)")
    return JaxEngine.from_directory(args.strip(), **options)


_REGISTERED: dict[str, EngineFactory] = {"openai": _openai_engine, "jax": _jax_engine}


def register_engine_kind(kind: str, factory: EngineFactory) -> None:
    """Makes `kind:ARGS` specs build engines with `factory(ARGS, options)` (replacing an earlier one)."""
    if not kind or ":" in kind or kind != kind.strip().lower():
        raise ValueError(f"engine kind must be a lowercase name without ':', got {kind!r}")
    _REGISTERED[kind] = factory


def engine_kinds() -> dict[str, EngineFactory]:
    """Every kind a spec may name: the built-in and registered ones, then installed entry points."""
    kinds = dict(_REGISTERED)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        kinds.setdefault(entry.name, _LazyEntryPoint(entry))
    return kinds


class _LazyEntryPoint:
    """An entry point's factory, imported when it is first used."""

    def __init__(self, entry: importlib.metadata.EntryPoint):
        self.entry = entry

    def __call__(self, args: str, options: Mapping[str, Any]) -> Engine:
        return self.entry.load()(args, options)


def engine_from_spec(spec: str, **options: Any) -> Engine:
    """Builds the engine a spec names, e.g. 'openai:URL,MODEL'; `options` go to its constructor.

    Raises:
      ValueError: an unknown kind (the message lists the known ones) or malformed ARGS.
    """
    kind, sep, args = spec.partition(":")
    kinds = engine_kinds()
    factory = kinds.get(kind.strip().lower()) if sep else None
    if factory is None:
        raise ValueError(f"unknown engine spec {spec!r}; expected KIND:ARGS with KIND in {sorted(kinds)}, "
                         f"e.g. {_SPEC_EXAMPLE!r}")
    return factory(args, options)
