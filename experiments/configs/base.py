"""Shared defaults of every training config: the paper's Flow-GRPO run (SPEC.md section 3).

Other config files start from `get_config()` and change what differs:

    base = load_config_module("base.py", relative_to=__file__)
    config = base.get_config()
    config.model.path = "/models/Qwen2.5-1.5B-Instruct"

Values marked (ref) follow the reference implementation where the paper is silent. Every key is
checked by `agentflow_jax.experiment.read_experiment` before any compute.
"""

import ml_collections
from ml_collections import FieldReference

FROZEN_SERVER = "openai:http://127.0.0.1:8000/v1,Qwen/Qwen2.5-7B-Instruct"

# The machines the shipped configs target (`for_hardware`): the mesh, and where the rollout's KV
# cache would not fit in one sampler call, the most sequences per call (model.max_cache_rows; 0:
# all). Check a choice before renting it:
# `python -m agentflow_jax.plan --config=FILE:HARDWARE --mesh=... --accelerator=...`. Every axis is
# spelt out so that a command line can move devices between them (--config.mesh.tensor=2 ...).
HARDWARE = {
    # one node of 8 H100 / H200 GPUs: FSDP over all of them
    "h100x8": ({"data": 1, "fsdp": 8, "tensor": 1}, 0),
    # a TPU v5p-8 slice: 4 chips of 95 GB; the rollout in halves
    "v5p-8": ({"data": 1, "fsdp": 4, "tensor": 1}, 128),
    "one": ({}, 0),  # one device, no mesh
}


def for_hardware(config: ml_collections.ConfigDict, hardware: str) -> ml_collections.ConfigDict:
    """`config` on one of HARDWARE's machines: its mesh and cache rows, and micro-batches of one row
    per device."""
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}: use FILE.py:HARDWARE with HARDWARE in {sorted(HARDWARE)}")
    mesh, cache_rows = HARDWARE[hardware]
    config.mesh = ml_collections.ConfigDict(mesh)
    config.model.max_cache_rows = cache_rows
    devices = 1
    for size in mesh.values():
        devices *= size
    config.rl.micro_batch_rows = devices
    return config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    workdir = FieldReference("runs/flow_grpo")   # every path the run writes derives from it
    config.workdir = workdir
    config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}   # FSDP over every device

    config.model = ml_collections.ConfigDict()
    config.model.path = "/models/Qwen2.5-7B-Instruct"   # local HF directory (never downloaded)
    config.model.tokenizer = "qwen2.5"                  # offline Qwen2.5 BPE ("" = the model directory's)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"                # float32 master weights, bf16 compute
    config.model.remat = True                           # gradient checkpointing
    config.model.max_cache_length = 18_432 + 2_048      # max prompt + max response per call
    config.model.max_cache_rows = 0                     # sequences per sampler call (0: all of a call's)

    # Who serves the frozen modules and the judge: an OpenAI-compatible server (vLLM or SGLang beside
    # the trainer, see BUILD_NOTES.md "Run the paper's config on a pod"), or "reference" (the planner's
    # initial weights, in-process; per role: config.engines.roles = {"verifier": SPEC, ...}).
    config.engines = ml_collections.ConfigDict()
    config.engines.frozen = FROZEN_SERVER
    config.engines.roles = ml_collections.ConfigDict()
    config.engines.judge = FROZEN_SERVER   # the paper's judge is GPT-4o: any OpenAI-compatible endpoint

    config.data = ml_collections.ConfigDict()
    config.data.train_path = "/data/nq_deepmath_train.jsonl"   # NQ (79,168) + DeepMath-103K, shuffled
    config.data.eval_path = "/data/aime24.jsonl"               # AIME 2024 (30 problems)
    config.data.batch_size = 32                                # queries per step

    config.tools = ml_collections.ConfigDict()
    config.tools.names = ("generalist", "python", "google", "wikipedia", "web_rag")
    config.tools.settings = ml_collections.ConfigDict()
    config.tools.settings.call_timeout_s = 120.0
    # require="full": the sandbox refuses to start on a host that lacks an isolation layer (the model
    # under training writes the programs); "best_effort" runs with what the host has and says what is missing.
    config.tools.settings.python = {"wall_timeout_s": 60.0, "max_new_tokens": 2048, "require": "full"}
    config.tools.settings.generalist = {"max_new_tokens": 2048}

    config.rollout = ml_collections.ConfigDict()
    config.rollout.max_turns = 3
    config.rollout.max_time_s = 500.0
    config.rollout.planner_temperature = 0.7
    config.rollout.planner_top_p = 0.99
    config.rollout.planner_max_new_tokens = 2048
    config.rollout.planner_frequency_penalty = 1.2   # (ref) vLLM's frequency penalty on planner rollouts
    config.rollout.frozen_max_new_tokens = 2048
    config.rollout.memory_budget_chars = 12_000
    config.rollout.compact_tools = False

    config.rl = ml_collections.ConfigDict()
    config.rl.group_size = 8
    config.rl.estimator = "grpo"
    config.rl.grouping = "trajectory"     # the paper; "turn" reproduces the reference code
    config.rl.ppo_epochs = 1
    config.rl.num_minibatches = 4         # ~64 trajectories per update (ref: mini-batch of 64 rows)
    config.rl.micro_batch_rows = 4
    config.rl.length_bucket = 1024
    config.rl.loss = ml_collections.ConfigDict()
    config.rl.loss.clip_low = 0.2
    config.rl.loss.clip_high = 0.3         # (ref) asymmetric clip
    config.rl.loss.dual_clip = 3.0         # (ref)
    config.rl.loss.log_ratio_clamp = 20.0  # (ref)
    config.rl.loss.kl_coef = 0.001
    config.rl.loss.kl_estimator = "k3"     # (ref) low-variance KL
    config.rl.loss.kl_in_reward = False
    config.rl.loss.entropy_coef = 0.0
    config.rl.loss.aggregation = "token-mean"   # (ref); "flow" is the paper's formula
    config.rl.loss.logits_chunk_size = 512

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-6
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.weight_decay = 0.01
    config.optim.grad_clip = 1.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.optim.end_lr_fraction = 0.0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 100
    config.train.save_every = 2
    config.train.keep_checkpoints = 3
    config.train.log_trajectories = 4
    config.train.progress_bar = True
    config.train.export_hf = True

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 2
    config.eval.at_start = True
    config.eval.num_queries = 30
    config.eval.batch_size = 30
    config.eval.planner_temperature = 0.0
    config.eval.max_turns = 3
    config.eval.max_time_s = 500.0
    return config
