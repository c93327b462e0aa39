"""agentflow_jax.sampling."""
