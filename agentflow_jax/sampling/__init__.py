"""Batched sampling from the Qwen2 model: bucketed prefill, `lax.while_loop` decode, group
sampling with one prefill per prompt, exact per-token log-probs (see `sampler.py`)."""

from agentflow_jax.sampling.rules import SamplingRule, sampling_rule
from agentflow_jax.sampling.sampler import Prefilled, Sampler, SamplerOutput

__all__ = ["Prefilled", "Sampler", "SamplerOutput", "SamplingRule", "sampling_rule"]
