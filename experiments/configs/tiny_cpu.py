"""The CPU toy world: world -> tokenizer -> warm start (SFT) -> Flow-GRPO -> evaluation on 2 cores.

    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py                   # the whole pipeline
    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py --warm_start_only
    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py \\
        --config.workdir=runs/tiny_cpu_lr0 --config.optim.learning_rate=0.0              # the untrained control

Everything is written under `workdir` (the warm start under `<workdir>/warm_start`): the planner's
model directory, its tokenizer, the query files, the search corpus and the frozen engine's world
all follow `--config.workdir`. The agent is described once, by the ordinary training sections
(rollout, tools): the warm start's demonstrations use the same prompts and tools as the RL
rollouts. The toy's own sections are under `toy` (agentflow_jax/toy/config.py). Values not set
here are the paper's (base.py); the RL learning rate is larger for a 1.1M-parameter model.
"""

import ml_collections

from agentflow_jax.config_reader import load_config_module

base = load_config_module("base.py", relative_to=__file__)


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.workdir = "runs/tiny_cpu"
    out = config.get_ref("workdir") + "/warm_start"   # what the warm start writes
    config.mesh = ml_collections.ConfigDict()          # one device, no mesh

    # -- the planner: the warm start's model; the frozen roles: the toy's exact scripted model ------
    config.model.path = out + "/model"
    config.model.tokenizer = out + "/tokenizer.model"
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.max_cache_length = 1024
    # "toy:ideal,<world dir>" (agentflow_jax/toy/frozen.py): exact, since the tiny model cannot learn to
    # copy names and numbers in minutes; "reference" makes the warm-started model serve every role
    # (then set toy.warm_start.roles to all roles).
    config.engines.frozen = "toy:ideal," + out + "/world"
    config.engines.judge = ""                 # exact-match rewards: no judge

    config.data.train_path = out + "/world/train_queries.jsonl"
    config.data.eval_path = out + "/world/heldout_queries.jsonl"
    config.data.batch_size = 16              # queries per step (x rl.group_size trajectories)

    config.tools.names = ("search", "python", "generalist")
    config.tools.settings = ml_collections.ConfigDict()
    config.tools.settings.call_timeout_s = 30.0
    config.tools.settings.search = {"corpus_path": out + "/world/corpus.jsonl", "topk": 2}
    # The toy's programs come from the scripted frozen model, not from the planner: best_effort lets the
    # demo run on hosts without root or cgroups (the missing layers are logged and recorded in run_metadata.json).
    config.tools.settings.python = {"wall_timeout_s": 10.0, "max_new_tokens": 32, "require": "best_effort"}
    config.tools.settings.generalist = {"max_new_tokens": 32}

    config.rollout.max_turns = 3
    config.rollout.max_time_s = 120.0
    config.rollout.planner_temperature = 1.0   # exploration; the warm start is greedy-biased
    config.rollout.planner_top_p = 1.0
    config.rollout.planner_max_new_tokens = 48
    config.rollout.planner_frequency_penalty = 0.0
    config.rollout.frozen_max_new_tokens = 48  # used when the model itself serves the frozen roles
    config.rollout.memory_budget_chars = 1500
    config.rollout.compact_tools = True

    # -- Flow-GRPO: the paper's estimator and loss; a larger learning rate for a 1M-parameter model --
    config.rl.num_minibatches = 1
    config.rl.micro_batch_rows = 32
    config.rl.length_bucket = 64
    config.rl.loss.logits_chunk_size = 256
    config.optim.learning_rate = 1e-4

    config.train.steps = 12
    config.train.save_every = 4
    config.train.keep_checkpoints = 2
    config.train.log_trajectories = 8

    config.eval.every = 4
    config.eval.num_queries = 300            # every held-out question (100 per kind)
    config.eval.batch_size = 150
    config.eval.max_turns = 3
    config.eval.max_time_s = 120.0

    # -- the toy world's own sections (agentflow_jax/toy/config.py) --------------------------------
    toy = config.toy = ml_collections.ConfigDict()
    toy.world = ml_collections.ConfigDict()
    toy.world.seed = 0
    toy.world.num_entities = 300
    toy.world.near_duplicate_fraction = 0.2
    toy.world.heldout_entity_fraction = 0.2   # held-out questions are about 60 cities never in training
    toy.world.train_questions = {"lookup": 400, "arithmetic": 300, "composition": 300}
    toy.world.heldout_questions = {"lookup": 100, "arithmetic": 100, "composition": 100}

    toy.demos = ml_collections.ConfigDict()
    toy.demos.first_step = (0.15, 0.8)   # P(generalist) at step 1: (plain, tempting phrasing)
    toy.demos.later_steps = (0.1, 0.5)   # steps 2-3 of composition questions
    toy.demos.corruption_seed = 0
    toy.demos.passes = 1                 # oracle replays over the training questions
    # Demonstrations per role used for SFT (-1: all). The planner keeps all of its own.
    toy.demos.role_limits = {"query_analysis": 150, "planner": -1, "executor": 500, "verifier": 500,
                             "generator": 450, "python_coder": -1, "generalist": 250}
    toy.demos.heldout_questions = 150    # held-out questions replayed for the per-role report

    toy.tokenizer = ml_collections.ConfigDict()
    toy.tokenizer.vocab_size = 2560
    toy.tokenizer.max_piece_length = 32
    toy.tokenizer.max_texts = 4000
    toy.tokenizer.seed = 0

    toy.architecture = ml_collections.ConfigDict()
    toy.architecture.hidden_size = 128
    toy.architecture.intermediate_size = 384
    toy.architecture.num_layers = 4
    toy.architecture.num_heads = 4
    toy.architecture.num_kv_heads = 2
    toy.architecture.head_dim = 0                # 0: hidden_size // num_heads
    toy.architecture.tie_word_embeddings = True
    toy.architecture.rope_theta = 10000.0
    toy.architecture.rms_norm_eps = 1e-6
    toy.architecture.init_embed_std = 0.1        # Qwen's 0.02 is for width ~3584; see toy.warm_start.scale_init
    toy.architecture.init_attn_scale = 2.0

    toy.warm_start = ml_collections.ConfigDict()
    toy.warm_start.roles = ("planner",)          # every role of toy.frozen.ROLES for engines.frozen = "reference"
    toy.warm_start.steps = 160
    toy.warm_start.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, b1=0.9, b2=0.98, weight_decay=0.01, grad_clip=1.0, warmup_steps=30, schedule="cosine",
        end_lr_fraction=0.05))
    toy.warm_start.tokens_per_batch = 3072
    toy.warm_start.length_buckets = (128, 160, 192, 256)   # planner rows: 100-175 tokens
    toy.warm_start.chunk_size = 512
    toy.warm_start.seed = 0
    toy.warm_start.log_every = 25
    toy.warm_start.eval_per_role = 64
    toy.warm_start.eval_sampled_n = 4
    toy.warm_start.eval_agent_questions = 150   # the whole agent, greedy and T=1 planner
    toy.warm_start.eval_batch_size = 64
    return config
