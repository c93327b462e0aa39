"""The CPU toy world: world -> tokenizer -> warm start (SFT) -> Flow-GRPO -> evaluation on 2 cores.

    python -m agentflow_jax.sft --config=experiments/configs/tiny_cpu.py            # warm start only
    python -m agentflow_jax.train --config=experiments/configs/tiny_cpu.py          # builds it if missing
    python -m agentflow_jax.train --config=experiments/configs/tiny_cpu.py \
        --config.workdir=runs/tiny_cpu_lr0 --config.optim.learning_rate=0.0          # the untrained control

Sections read by the warm start (agentflow_jax.sft): world, agent, demos, tokenizer, model, sft;
by Flow-GRPO (agentflow_jax.train): model, data, tools, mesh, rollout, rl, optim, train, eval.
Values that shape the prompts (max turns, memory budget, compact tools, search top-k) are
FieldReferences shared with the rollout / tools sections, so the RL prompts are exactly the
demonstrations' prompts; override them in the `agent` section.
"""

import ml_collections
from ml_collections import FieldReference


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.workdir = "runs/tiny_cpu"
    out = FieldReference("runs/tiny_cpu/warm_start")  # sft.output_dir; every path below follows it

    # -- the world (agentflow_jax/data/toy_world.py: WorldConfig) ---------------------------------
    config.world = ml_collections.ConfigDict()
    config.world.seed = 0
    config.world.num_entities = 300
    config.world.near_duplicate_fraction = 0.2
    config.world.heldout_entity_fraction = 0.2   # held-out questions are about 60 cities never in training
    config.world.train_questions = {"lookup": 400, "arithmetic": 300, "composition": 300}
    config.world.heldout_questions = {"lookup": 100, "arithmetic": 100, "composition": 100}

    # -- how the agent runs (data/demonstrations.py: AgentSettings); shared with rollout/tools ------
    max_turns = FieldReference(3)
    memory_budget_chars = FieldReference(1500)
    compact_tools = FieldReference(True)
    search_topk = FieldReference(2)
    config.agent = ml_collections.ConfigDict()
    config.agent.max_turns = max_turns
    config.agent.memory_budget_chars = memory_budget_chars
    config.agent.compact_tools = compact_tools
    config.agent.search_topk = search_topk
    config.agent.call_timeout_s = 30.0
    config.agent.python_wall_timeout_s = 10.0
    # The frozen roles: "ideal" = demonstrations.IdealFrozenEngine (exact; the tiny model cannot learn
    # to copy names and numbers in minutes), "model" = the warm-started model serves them too.
    config.agent.frozen = "ideal"
    # Caps per role; the longest demonstration reply is about half of each (planner: 22 tokens).
    config.agent.max_new_tokens = {"query_analysis": 32, "planner": 48, "executor": 48, "verifier": 32,
                                   "generator": 32, "python_coder": 32, "generalist": 32}

    # -- demonstrations (data/demonstrations.py) ---------------------------------------------------
    config.demos = ml_collections.ConfigDict()
    config.demos.first_step = (0.15, 0.8)   # P(generalist) at step 1: (plain, tempting phrasing)
    config.demos.later_steps = (0.1, 0.5)   # steps 2-3 of composition questions
    config.demos.corruption_seed = 0
    config.demos.passes = 1                 # oracle replays over the training questions
    # Demonstrations per role used for SFT (-1: all). The planner keeps all of its own.
    config.demos.role_limits = {"query_analysis": 150, "planner": -1, "executor": 500, "verifier": 500,
                                "generator": 450, "python_coder": -1, "generalist": 250}
    config.demos.heldout_questions = 150    # held-out questions replayed for the per-role report

    # -- tokenizer (SentencePiece BPE) -------------------------------------------------------------
    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.vocab_size = 2560
    config.tokenizer.max_piece_length = 32
    config.tokenizer.max_texts = 4000
    config.tokenizer.seed = 0

    # -- model: a tiny Qwen2 (vocab = the tokenizer's); path/tokenizer are what train.py loads ------
    config.model = ml_collections.ConfigDict()
    config.model.hidden_size = 128
    config.model.intermediate_size = 384
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.head_dim = 0                # 0: hidden_size // num_heads
    config.model.tie_word_embeddings = True
    config.model.rope_theta = 10000.0
    config.model.rms_norm_eps = 1e-6
    config.model.path = out + "/model"
    config.model.tokenizer = out + "/tokenizer.model"
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.max_cache_length = 1024
    config.model.init_embed_std = 0.1        # Qwen's 0.02 is for width ~3584; see sft.scale_init
    config.model.init_attn_scale = 2.0

    # -- supervised warm start ---------------------------------------------------------------------
    config.sft = ml_collections.ConfigDict()
    config.sft.output_dir = out
    config.sft.roles = ("planner",)          # roles trained; all of demonstrations.ROLES for agent.frozen="model"
    config.sft.steps = 160
    config.sft.learning_rate = 3e-3
    config.sft.warmup_steps = 30
    config.sft.end_lr_fraction = 0.05
    config.sft.weight_decay = 0.01
    config.sft.grad_clip = 1.0
    config.sft.b1 = 0.9
    config.sft.b2 = 0.98
    config.sft.tokens_per_batch = 3072
    config.sft.length_buckets = (128, 160, 192, 256)   # planner rows: 100-175 tokens
    config.sft.prompt_loss_weight = 0.0
    config.sft.chunk_size = 512
    config.sft.seed = 0
    config.sft.log_every = 25
    config.sft.eval_per_role = 64
    config.sft.eval_sampled_n = 4
    config.sft.eval_agent_questions = 150   # the whole agent, greedy and T=1 planner (cheap with agent.frozen="ideal")
    config.sft.eval_batch_size = 64

    # -- what the RL pipeline reads (train.py) -----------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.train_path = out + "/world/train_queries.jsonl"
    config.data.eval_path = out + "/world/heldout_queries.jsonl"

    config.tools = ml_collections.ConfigDict()
    config.tools.names = ("search", "python", "generalist")
    config.tools.settings = ml_collections.ConfigDict()
    config.tools.settings.call_timeout_s = 30.0
    config.tools.settings.search = {"corpus_path": out + "/world/corpus.jsonl", "topk": search_topk}
    config.tools.settings.python = {"wall_timeout_s": 10.0, "max_new_tokens": 32}
    config.tools.settings.generalist = {"max_new_tokens": 32}

    config.data.batch_size = 16             # queries per step (x rl.group_size trajectories)

    config.mesh = ml_collections.ConfigDict()  # empty: one device, no mesh

    config.rollout = ml_collections.ConfigDict()
    config.rollout.max_turns = max_turns
    config.rollout.max_time_s = 120.0
    config.rollout.planner_temperature = 1.0   # exploration; the warm start is greedy-biased
    config.rollout.planner_top_p = 1.0
    config.rollout.planner_max_new_tokens = 48
    config.rollout.frozen_max_new_tokens = 48  # used when agent.frozen = "model"
    config.rollout.memory_budget_chars = memory_budget_chars
    config.rollout.compact_tools = compact_tools

    # -- Flow-GRPO (the paper's estimator and loss; a larger learning rate for a 1M-parameter model) --
    config.rl = ml_collections.ConfigDict()
    config.rl.group_size = 8
    config.rl.estimator = "grpo"
    config.rl.grouping = "trajectory"
    config.rl.ppo_epochs = 1
    config.rl.num_minibatches = 1
    config.rl.micro_batch_rows = 32
    config.rl.length_bucket = 64
    config.rl.loss = ml_collections.ConfigDict()
    config.rl.loss.clip_low = 0.2
    config.rl.loss.clip_high = 0.3
    config.rl.loss.dual_clip = 3.0
    config.rl.loss.log_ratio_clamp = 20.0
    config.rl.loss.kl_coef = 0.001
    config.rl.loss.kl_estimator = "k3"
    config.rl.loss.kl_in_reward = False
    config.rl.loss.entropy_coef = 0.0
    config.rl.loss.aggregation = "token-mean"
    config.rl.loss.logits_chunk_size = 256

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.weight_decay = 0.01
    config.optim.grad_clip = 1.0
    config.optim.warmup_steps = 0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 12
    config.train.save_every = 4
    config.train.keep_checkpoints = 2
    config.train.log_trajectories = 8
    config.train.progress_bar = True
    config.train.export_hf = True

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 4
    config.eval.at_start = True
    config.eval.num_queries = 300            # every held-out question (100 per kind)
    config.eval.batch_size = 150
    config.eval.planner_temperature = 0.0
    config.eval.max_turns = max_turns
    config.eval.max_time_s = 120.0
    return config
