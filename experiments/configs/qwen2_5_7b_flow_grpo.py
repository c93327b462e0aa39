"""The paper's Flow-GRPO run (SPEC.md section 3): Qwen2.5-7B-Instruct planner, 32 queries x 8 rollouts.

    python -m agentflow_jax.train --config=experiments/configs/qwen2_5_7b_flow_grpo.py:h100x8 \\
        --config.model.path=/models/Qwen2.5-7B-Instruct \\
        --config.data.train_path=/data/nq_deepmath_train.jsonl --config.data.eval_path=/data/aime24.jsonl

HARDWARE after the colon: h100x8 (default; also 8 x H200), v5p-8, or one (base.py's HARDWARE). The
frozen modules and the judge are the frozen Qwen2.5-7B-Instruct behind an OpenAI-compatible server
(vLLM beside the trainer: BUILD_NOTES.md). Data files are JSON lines with "query", "answer" (several
gold answers joined with "; ") and "kind" (the scorer: "judge" for NQ, "math" for DeepMath / AIME;
`python -m agentflow_jax.data.mixture` builds them). The search tool needs either a local corpus
(`tools.settings.search.corpus_path`) or a Search-R1 `/retrieve` server (`...search.url`); the
Google tool reads SERPER_API_KEY or GOOGLE_API_KEY + GOOGLE_CSE_ID from the environment. Every
value not set here is the paper's, from base.py. Check the machine first:

    python -m agentflow_jax.plan --config=experiments/configs/qwen2_5_7b_flow_grpo.py:h100x8 \\
        --mesh=fsdp:8 --accelerator=h100-80gb
"""

from agentflow_jax.config_reader import load_config_module

base = load_config_module("base.py", relative_to=__file__)


def get_config(hardware: str = "h100x8"):
    config = base.get_config()
    config.workdir = "runs/qwen2_5_7b_flow_grpo"
    return base.for_hardware(config, hardware)
