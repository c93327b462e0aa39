"""The Flow-GRPO trainer and the train entry point on a tiny random model (CPU, seconds)."""

import json
import os

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agentflow_jax import train as train_lib
from agentflow_jax.agent import prompts
from agentflow_jax.agent.memory import Memory
from agentflow_jax.models import config as model_config, hf_io, qwen2
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.rl.batch import TurnRecord
from agentflow_jax.rl.trainer import trajectory_minibatches
from agentflow_jax.tools import build_toolbox

QUERIES = [{"pid": f"q{i}", "query": f"What is {i} plus {i + 3}?", "answer": str(2 * i + 3), "kind": "exact"}
           for i in range(12)]


def _record(query_id, trajectory_id, reward=1.0):
    return TurnRecord(query_id, trajectory_id, (1, 2), (3,), (-0.5,), reward)


def test_minibatches_hold_whole_trajectories():
    records = [_record(0, 0), _record(0, 0), _record(0, 1), _record(1, 2), _record(1, 2), _record(1, 2),
               _record(1, 3)]
    groups = trajectory_minibatches(records, 2)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [g.tolist() for g in trajectory_minibatches(records, 10)] == [[0, 1], [2], [3, 4, 5], [6]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A model directory (random tiny Qwen2 + SentencePiece tokenizer) and train/eval query files."""
    root = tmp_path_factory.mktemp("tiny_run")
    toolbox = build_toolbox(["generalist"], engine=object())
    texts = [m["content"] for q in QUERIES for m in prompts.build_planner_prompt(
        Memory(q["query"]), toolbox, step=1, max_steps=2, compact_tools=True)]
    tokenizer = SentencePieceTokenizer.train(texts * 3, vocab_size=400, model_path=root / "tokenizer.model")
    config = model_config.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    hf_io.save_pretrained(qwen2.init_random(config, seed=0), root / "model")
    for name, rows in (("train.jsonl", QUERIES), ("eval.jsonl", QUERIES[:4])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_config(root, workdir, *, steps=3, learning_rate=1e-3):
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


DETERMINISTIC = ("reward", "accuracy", "turns", "planner_calls", "planner_tokens", "loss", "kl", "ratio_mean",
                 "sampler_old_abs_gap", "advantage_std", "grad_norm")


def _train_metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: {k: r[k] for k in DETERMINISTIC if k in r} for r in rows if "reward" in r}


def test_resumed_run_matches_uninterrupted_run(tiny_run, tmp_path):
    full = train_lib.run(make_config(tiny_run, tmp_path / "full", steps=3))
    assert full.steps == 3
    train_lib.run(make_config(tiny_run, tmp_path / "resumed", steps=2))
    resumed = train_lib.run(make_config(tiny_run, tmp_path / "resumed", steps=3))
    assert resumed.steps == 3
    a, b = _train_metrics(tmp_path / "full"), _train_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (3,):
        assert a[step].keys() == b[step].keys() and "loss" in a[step]
        for key in a[step]:
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, atol=1e-7, err_msg=f"{step} {key}")
    assert os.path.exists(tmp_path / "full" / "curves.png")
    assert os.path.exists(tmp_path / "full" / "trajectories.jsonl")


def test_zero_learning_rate_keeps_parameters(tiny_run, tmp_path):
    config = make_config(tiny_run, tmp_path / "lr0", steps=1, learning_rate=0.0)
    train_lib.run(config)
    from agentflow_jax.checkpoint import TrainCheckpointer

    model = hf_io.load_pretrained(tiny_run / "model")
    before = nnx.state(model)
    restored = TrainCheckpointer(str(tmp_path / "lr0" / "checkpoints")).restore_latest(params=before)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_skips_update(tiny_run):
    config = make_config(tiny_run, "/unused")
    model = train_lib.load_policy(config, None)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim == 2 else x, params)
    trainer = train_lib.FlowGRPOTrainer(
        graphdef, params, tokenizer=train_lib.load_tokenizer(config.model.tokenizer),
        toolbox_factory=train_lib.toolbox_factory(config), optimizer=train_lib.make_optimizer(1e-3),
        config=train_lib.trainer_config(config), rollout=train_lib.rollout_config(config))
    records = [TurnRecord(q, t, (5, 6, 7), (8, 9), (-1.0, -2.0), float(t % 2)) for q in range(2) for t in (2 * q, 2 * q + 1)]
    opt_before = jax.tree.leaves(trainer.opt_state)
    metrics = trainer.update(records)
    assert metrics["skipped_updates"] == 2.0 and metrics["updates"] == 0.0
    for x, y in zip(opt_before, jax.tree.leaves(trainer.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_config_fails_before_compute(tiny_run, tmp_path):
    config = make_config(tiny_run, tmp_path / "bad")
    config.rl.loss.aggregation = "per-token-vibes"
    with pytest.raises(ValueError, match="unknown aggregation"):
        train_lib.trainer_config(config)
    config = make_config(tiny_run, tmp_path / "bad2")
    config.rl.estimator = "ppo"
    with pytest.raises(ValueError, match="unknown estimator"):
        train_lib.trainer_config(config)


def _load_config_file(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join("experiments", "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["qwen2_5_7b_flow_grpo.py", "tiny_cpu.py"])
def test_shipped_configs_validate(name):
    train_lib.validate_config(_load_config_file(name))


def test_config_validation_names_the_problem(tiny_run, tmp_path):
    config = make_config(tiny_run, tmp_path)
    config.rollout = dict(config.rollout.to_dict(), max_turns="three")  # ConfigDict checks types on assignment
    config.optim = dict(config.optim.to_dict(), learning_rate=True)
    config.train = {k: v for k, v in config.train.to_dict().items() if k != "export_hf"}
    with pytest.raises(ValueError) as info:
        train_lib.validate_config(config)
    message = str(info.value)
    assert "config.rollout.max_turns = 'three' should be of type" in message
    assert "config.optim.learning_rate = True" in message
    assert "config.train lacks key 'export_hf'" in message


def test_zero_counts_are_rejected_before_compute(tiny_run, tmp_path):
    config = make_config(tiny_run, tmp_path)
    config.eval.num_queries = 0
    config.data.batch_size = 0
    with pytest.raises(ValueError) as info:
        train_lib.validate_config(config)
    assert "config.eval.num_queries = 0 must be >= 1" in str(info.value)
    assert "config.data.batch_size = 0 must be >= 1" in str(info.value)
