"""agentflow_jax.data."""
