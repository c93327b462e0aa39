"""A tiny training run for the tests: a random 2-layer Qwen2 with a SentencePiece tokenizer, query
files, and a complete training config over them (every section spelt out, as a user's file would)."""

import json
import pathlib

import ml_collections

from agentflow_jax.agent import prompts
from agentflow_jax.agent.memory import Memory
from agentflow_jax.models import config as model_config
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.tools import build_toolbox

QUERIES = [{"pid": f"q{i}", "query": f"What is {i} plus {i + 3}?", "answer": str(2 * i + 3), "kind": "exact"}
           for i in range(12)]


def build_tiny_run(root: pathlib.Path) -> pathlib.Path:
    """Writes the model directory, tokenizer and train / eval query files under `root`."""
    toolbox = build_toolbox(["generalist"], engine=object())
    texts = [m["content"] for q in QUERIES for m in prompts.build_planner_prompt(
        Memory(q["query"]), toolbox, step=1, max_steps=2, compact_tools=True)]
    tokenizer = SentencePieceTokenizer.train(texts * 3, vocab_size=400, model_path=root / "tokenizer.model")
    config = model_config.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    hf_io.save_pretrained(qwen2.init_random(config, seed=0), root / "model")
    for name, rows in (("train.jsonl", QUERIES), ("eval.jsonl", QUERIES[:4])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_yes_queries(root)
    return root


def make_config(root, workdir, *, steps=3, learning_rate=1e-3):
    """A whole training config of the tiny run (every section spelt out, as a user's file would)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = str(workdir)
    c.mesh = {}
    c.model = dict(path=str(root / "model"), tokenizer=str(root / "tokenizer.model"), dtype="float32",
                   param_dtype="float32", remat=False, max_cache_length=1024)
    c.data = dict(train_path=str(root / "train.jsonl"), eval_path=str(root / "eval.jsonl"), batch_size=2)
    c.tools = ml_collections.ConfigDict(dict(names=("generalist",),
                                             settings=dict(call_timeout_s=30.0, generalist={"max_new_tokens": 4})))
    c.rollout = dict(max_turns=2, max_time_s=600.0, planner_temperature=1.0, planner_top_p=1.0,
                     planner_max_new_tokens=6, frozen_max_new_tokens=4, memory_budget_chars=400, compact_tools=True)
    c.rl = ml_collections.ConfigDict(dict(group_size=3, estimator="grpo", grouping="trajectory", ppo_epochs=1,
                                          num_minibatches=2, micro_batch_rows=4, length_bucket=64,
                                          loss=dict(kl_coef=0.001, aggregation="flow")))
    c.optim = dict(learning_rate=learning_rate, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0, warmup_steps=0)
    c.train = dict(steps=steps, save_every=1, keep_checkpoints=5, log_trajectories=2, progress_bar=False,
                   export_hf=False)
    c.eval = dict(every=100, num_queries=2, batch_size=2, planner_temperature=0.0, max_turns=2, max_time_s=600.0,
                  at_start=False)
    return c


def parity_reply(request) -> str:
    """A scripted frozen model whose verdicts and answers depend on the trajectory (its sample id), so
    rewards, turns and advantages vary within every group: what a test needs to compare runs whose
    only difference is where (on which devices, in which processes) they run."""
    system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
    if system == prompts.GENERATOR_SYSTEM:
        return f"Done.\n<answer>{'yes' if request.sample_id % 2 == 0 else 'no'}</answer>"
    if system == prompts.VERIFIER_SYSTEM:
        return "Conclusion: STOP" if request.sample_id % 3 else "Conclusion: CONTINUE"
    return "noted"


def register_parity_engine() -> str:
    """Registers the "parity" engine kind (`parity_reply`); returns its spec for `engines.frozen`."""
    from agentflow_jax.engines import ScriptedEngine, register_engine_kind

    register_engine_kind("parity", lambda args, options: ScriptedEngine(parity_reply))
    return "parity:"


def parity_config(root, workdir, *, steps=2, mesh=None):
    """The tiny run with the parity frozen engine, "yes" as every gold answer, and micro-batches of 8
    rows (a multiple of every mesh's batch shards)."""
    config = make_config(root, workdir, steps=steps)
    config.mesh = mesh or {}
    config.engines = dict(frozen=register_parity_engine(), roles={}, judge="")
    config.data.train_path = str(root / "train_yes.jsonl")
    config.data.eval_path = str(root / "train_yes.jsonl")
    config.rl.micro_batch_rows = 8
    return config


def write_yes_queries(root) -> None:
    rows = [dict(q, answer="yes") for q in QUERIES]
    (root / "train_yes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
