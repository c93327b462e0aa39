"""The paper's Flow-GRPO run (SPEC.md section 3): Qwen2.5-7B-Instruct planner, 32 queries x 8 rollouts.

    python -m agentflow_jax.train --config=experiments/configs/qwen2_5_7b_flow_grpo.py \\
        --config.model.path=/models/Qwen2.5-7B-Instruct \\
        --config.data.train_path=/data/nq_deepmath_train.jsonl --config.data.eval_path=/data/aime24.jsonl

Data files are JSON lines with "query", "answer" (several gold answers joined with "; ") and
"kind" ("judge" for NQ, "math" or "judge" for DeepMath, "math" for AIME): build the training file
with `python -m agentflow_jax.data.mixture` and name the judge's engine in `engines.judge`. The search tool needs either a local corpus
(`tools.settings.search.corpus_path`) or a Search-R1 `/retrieve` server (`...search.url`); the
Google tool reads SERPER_API_KEY or GOOGLE_API_KEY + GOOGLE_CSE_ID from the environment. Every
value not set here is the paper's, from base.py.
"""

from agentflow_jax.config_reader import load_config_module

base = load_config_module("base.py", relative_to=__file__)


def get_config():
    config = base.get_config()
    config.workdir = "runs/qwen2_5_7b_flow_grpo"
    return config
