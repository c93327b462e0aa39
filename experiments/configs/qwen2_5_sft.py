"""Supervised warm start of a Qwen2.5-Instruct planner from recorded trajectories (python -m agentflow_jax.sft).

    python -m agentflow_jax.sft --config=experiments/configs/qwen2_5_sft.py:1.5b \\
        --config.model.path=/models/Qwen2.5-1.5B-Instruct \\
        --config.data.train_path=runs/flow_grpo/trajectories.jsonl

The argument after the colon is the model size: 0.5b, 1.5b (default) or 7b. The data are the
planner calls of a run's `trajectories.jsonl` (what `train` writes; raise `train.log_trajectories`
to record more of them), kept only where the trajectory's answer was right against the run's
query file (`data.queries_path`). A chat file works the same way with
`--config.data.format=chat --config.data.train_path=chats.jsonl` (loss on the assistant messages).
The model directory's own tokenizer and chat template are used, and copied next to the exported
weights (`<workdir>/model_hf`). Shared settings (seed, mesh, dtypes, AdamW) come from base.py.
"""

import ml_collections

from agentflow_jax.config_reader import load_config_module

base = load_config_module("base.py", relative_to=__file__)

# size -> (peak learning rate, tokens per optimizer step)
SIZES = {"0.5b": (1e-5, 32_768), "1.5b": (1e-5, 32_768), "7b": (5e-6, 65_536)}


def get_config(size: str = "1.5b") -> ml_collections.ConfigDict:
    if size.lower() not in SIZES:
        raise ValueError(f"unknown model size {size!r}: use qwen2_5_sft.py:SIZE with SIZE in {sorted(SIZES)}")
    size = size.lower()
    learning_rate, tokens_per_batch = SIZES[size]
    shared = base.get_config()
    config = ml_collections.ConfigDict()
    config.seed = shared.seed
    config.workdir = f"runs/qwen2_5_{size.replace('.', '_')}_sft"
    config.mesh = shared.mesh                              # FSDP over every device

    config.model = shared.model
    config.model.path = f"/models/Qwen2.5-{size.upper()}-Instruct"   # local HF directory (never downloaded)
    config.model.tokenizer = ""                            # the directory's own tokenizer and chat template

    config.data = ml_collections.ConfigDict()
    config.data.format = "trajectories"
    config.data.train_path = "runs/flow_grpo/trajectories.jsonl"
    config.data.eval_path = ""
    config.data.assistant_turns = "all"
    config.data.splits = ("train",)
    config.data.correct_only = True
    config.data.queries_path = shared.data.train_path     # the gold answers of the run's queries
    config.data.skip_too_long = True

    config.batch = ml_collections.ConfigDict()
    config.batch.length_buckets = (1024, 2048, 4096, 8192)  # planner prompts: tools + memory (<= 12,000 chars)
    config.batch.tokens_per_batch = tokens_per_batch
    config.batch.chunk_size = 512

    config.optim = shared.optim
    config.optim.learning_rate = learning_rate
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"
    config.optim.end_lr_fraction = 0.1

    config.train = ml_collections.ConfigDict()
    config.train.steps = 300
    config.train.log_every = 10
    config.train.save_every = 100
    config.train.keep_checkpoints = 2
    config.train.progress_bar = True
    config.train.export_hf = True
    config.train.export_dtype = "bfloat16"

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 50
    config.eval.at_start = True
    config.eval.max_examples = 512
    return config
