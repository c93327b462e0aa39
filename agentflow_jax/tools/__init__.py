"""agentflow_jax.tools."""
