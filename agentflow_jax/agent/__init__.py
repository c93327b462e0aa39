"""agentflow_jax.agent."""
