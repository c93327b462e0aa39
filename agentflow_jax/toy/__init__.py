"""The CPU toy world: a stage on which Flow-GRPO must visibly improve a tiny planner in minutes.

    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py    # world -> warm start -> RL -> eval

Modules: `world` (generated cities, corpus, questions), `frozen` (the exact scripted frozen model
and its engine, registered as the "toy" engine kind), `demonstrations` (oracle replays through
the real rollout loop), `tokenizer` (SentencePiece on the world), `warm_start` (the supervised
pipeline) and `report`, `config` (the `config.toy` sections). The toy plugs into training only
through what a real run uses: a model directory, query files and an engine spec
(`engines.frozen = "toy:ideal,<world dir>"`); nothing on the training path imports this package.
"""
