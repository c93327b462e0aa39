"""agentflow_jax.rl."""
