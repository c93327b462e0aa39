"""Text-generation engines: what the agent's modules, the tools' LLM and the reward judge call.

An engine turns a batch of chat requests into a batch of generations (`base.Engine`). Kinds:

  jax       the in-process JAX sampler (policy or frozen weights); reports exact token ids and
            log-probs, which training consumes (`jax_engine.JaxEngine`)
  openai    a client of any OpenAI-compatible `/chat/completions` server: vLLM, SGLang, hosted
            APIs (`openai_compat.OpenAIChatEngine`)
  scripted  replies from a function or canned queues, for tests (`scripted.ScriptedEngine`)

Engines are named in configs and on command lines by spec strings resolved by `registry`:
"jax:DIR", "openai:URL,MODEL", and kinds other packages register (e.g. the toy world's "toy:...").
"""

from agentflow_jax.engines.base import Engine, EngineError, Generation, GenerationRequest, Message
from agentflow_jax.engines.registry import engine_from_spec, engine_kinds, register_engine_kind
from agentflow_jax.engines.scripted import ScriptedEngine, prompt_contains

__all__ = ["Engine", "EngineError", "Generation", "GenerationRequest", "Message", "ScriptedEngine",
           "engine_from_spec", "engine_kinds", "prompt_contains", "register_engine_kind"]
