"""Flow-GRPO of a Qwen2.5-1.5B- or 0.5B-Instruct planner on one GPU: the paper's recipe (base.py) with
the smaller planner serving the frozen modules too (in-process, no server), and a rollout batch and
cache length that fit one 80 GB device (checked with `python -m agentflow_jax.plan`).

    python -m agentflow_jax.train --config=experiments/configs/qwen2_5_small_flow_grpo.py:1.5b,one \\
        --config.model.path=/models/Qwen2.5-1.5B-Instruct --config.data.train_path=... --config.data.eval_path=...

The argument is SIZE[,HARDWARE]: SIZE 1.5b (default) or 0.5b; HARDWARE one (default), h100x8 or v5p-8.
The judge is still an OpenAI-compatible endpoint (config.engines.judge) when the data has judged rows.
"""

from agentflow_jax.config_reader import load_config_module

base = load_config_module("base.py", relative_to=__file__)

# size -> (queries per step, max prompt tokens): rollout KV cache and update activations on one device.
SIZES = {"1.5b": (16, 6144), "0.5b": (32, 6144)}


def get_config(argument: str = "1.5b"):
    size, _, hardware = argument.lower().partition(",")
    if size not in SIZES:
        raise ValueError(f"unknown planner size {size!r}: use qwen2_5_small_flow_grpo.py:SIZE[,HARDWARE] with "
                         f"SIZE in {sorted(SIZES)}")
    queries, max_prompt = SIZES[size]
    config = base.get_config()
    config.workdir = f"runs/qwen2_5_{size.replace('.', '_')}_flow_grpo"
    config.model.path = f"/models/Qwen2.5-{size.upper()}-Instruct"
    config.model.max_cache_length = max_prompt + config.rollout.planner_max_new_tokens
    config.engines.frozen = "reference"
    config.data.batch_size = queries
    return base.for_hardware(config, hardware or "one")
