"""agentflow_jax: AgentFlow's four-module agent and Flow-GRPO training in JAX / Flax NNX."""

__version__ = "0.1.0"
