"""The supervised warm start: config checks, batching, one compile per bucket, a smoke run end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agentflow_jax import sft
from agentflow_jax.models import config as model_config, hf_io, qwen2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(ROOT, "experiments", "configs", "tiny_cpu.py")


def tiny_cpu_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_cpu", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def smoke_config(output_dir: str) -> ml_collections.ConfigDict:
    """A few seconds' worth: 40 cities, 24 questions, a 1-layer 32-wide model, 12 steps."""
    config = tiny_cpu_config()
    config.sft.output_dir = str(output_dir)
    config.world.num_entities = 40
    config.world.train_questions = {"lookup": 8, "arithmetic": 8, "composition": 8}
    config.world.heldout_questions = {"lookup": 3, "arithmetic": 3, "composition": 3}
    config.demos.heldout_questions = 3
    config.tokenizer.vocab_size = 900
    config.model.hidden_size = 32
    config.model.intermediate_size = 64
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.sft.steps = 12
    config.sft.warmup_steps = 2
    config.sft.learning_rate = 1e-2
    config.sft.length_buckets = (512, 1024)
    config.sft.tokens_per_batch = 4096
    config.sft.log_every = 4
    config.sft.eval_per_role = 0
    config.sft.eval_agent_questions = 0
    return config


def test_config_file_paths_follow_output_dir():
    config = tiny_cpu_config()
    config.sft.output_dir = "/somewhere"
    assert config.model.path == "/somewhere/model"
    assert config.model.tokenizer == "/somewhere/tokenizer.model"
    assert config.tools.settings.search.corpus_path == "/somewhere/world/corpus.jsonl"
    assert config.data.train_path == "/somewhere/world/train_queries.jsonl"
    config.agent.search_topk = 3
    config.agent.max_turns = 4
    assert config.tools.settings.search.topk == 3 and config.rollout.max_turns == 4
    sft.validate_config(config)


@pytest.mark.parametrize("section,key", [("sft", "stpes"), ("world", "num_cities"), ("agent", "turns"),
                                         ("model", "hidden"), ("tokenizer", "vocab"), ("demos", "corruption")])
def test_unknown_config_keys_fail_before_any_compute(section, key):
    config = tiny_cpu_config()
    config[section].unlock()
    config[section][key] = 1
    with pytest.raises(ValueError, match=f"unknown.*{key}"):
        sft.validate_config(config)


def test_unknown_role_and_bad_buckets_are_clear_errors():
    config = tiny_cpu_config()
    config.demos.role_limits = {"oracle": 3}
    with pytest.raises(ValueError, match="unknown role"):
        sft.validate_config(config)
    config = tiny_cpu_config()
    config.sft.length_buckets = (256, 128)
    with pytest.raises(ValueError, match="increasing"):
        sft.validate_config(config)


def test_command_line_rejects_a_misspelt_key():
    result = subprocess.run([sys.executable, "-m", "agentflow_jax.sft", f"--config={CONFIG_PATH}",
                             "--config.sft.stpes=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stpes" in result.stderr


def test_make_batch_puts_the_loss_on_the_target_tokens_only():
    example = sft.Example(role="planner", prompt_ids=(5, 6, 7), target_ids=(8, 9, 2))
    batch = sft.make_batch([example], length=8, rows=2, pad_id=0, prompt_loss_weight=0.25)
    np.testing.assert_array_equal(batch.input_ids[0], [5, 6, 7, 8, 9, 2, 0, 0])
    np.testing.assert_array_equal(batch.targets[0], [6, 7, 8, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch.target_mask[0], [0, 0, 1, 1, 1, 0, 0, 0])  # predicts 8, 9, <|im_end|>
    np.testing.assert_array_equal(batch.weights[0], [0.25, 0.25, 1, 1, 1, 0, 0, 0])
    assert batch.attention_mask[1].sum() == 0 and batch.weights[1].sum() == 0  # a padding row


def test_train_step_compiles_once_per_length_bucket_and_learns():
    config = model_config.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                               num_kv_heads=1)
    trainer = sft.SFTTrainer(qwen2.init_random(config), learning_rate=1e-2, steps=20, warmup_steps=2,
                             end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.98, chunk_size=512)
    rng = np.random.default_rng(0)
    examples = [sft.Example("planner", tuple(rng.integers(4, 64, 5).tolist()), (10, 11, 12, 2)) for _ in range(8)]
    longer = [sft.Example("planner", tuple(rng.integers(4, 64, 20).tolist()), (10, 11, 12, 2)) for _ in range(8)]
    losses = []
    for step in range(12):
        rows, length = (examples, 16) if step % 2 else (longer, 32)
        loss, nll, _ = trainer.step(sft.make_batch(rows, length, 8, pad_id=0))
        losses.append(float(nll))
    assert dict(trainer.trace_counts) == {16: 1, 32: 1}
    assert losses[-1] < 0.5 * losses[0]


def test_smoke_run_writes_a_loadable_warm_start_and_is_reused(tmp_path):
    config = smoke_config(tmp_path / "ws")
    report = sft.run_warm_start(config)
    history = report["sft"]["history"]
    assert history[-1]["target_nll"] < history[0]["target_nll"]
    assert set(report["sft"]["compiles_per_bucket"].values()) == {1}
    assert set(report["timings_s"]) >= {"world", "demos", "tokenizer", "sft", "total"}
    paths = sft.Paths(str(tmp_path / "ws"))
    model = hf_io.load_pretrained(paths.model, dtype=jnp.float32)
    tokenizer = sft.SentencePieceTokenizer.load(paths.tokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size
    assert os.path.isfile(os.path.join(paths.model, "tokenizer.model"))
    logits = model(jnp.asarray([tokenizer.encode("Query: When was")], jnp.int32))
    assert bool(jnp.isfinite(logits).all())
    with open(paths.queries("heldout"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 9 and {"pid", "query", "answer", "kind", "qtype", "tools"} <= set(records[0])
    with open(os.path.join(paths.root, sft.MANIFEST), encoding="utf-8") as f:
        assert json.load(f)["fingerprint"] == sft.config_fingerprint(config)
    mtime = os.path.getmtime(os.path.join(paths.model, "config.json"))
    sft.ensure_warm_start(config)  # same configuration: nothing is rebuilt
    assert os.path.getmtime(os.path.join(paths.model, "config.json")) == mtime


def test_toy_config_runs_two_flow_grpo_steps_end_to_end(tmp_path):
    """world -> tokenizer -> warm start -> 2 Flow-GRPO steps -> evaluation -> curves, on the shipped config."""
    from agentflow_jax import train
    from agentflow_jax.data.demonstrations import IdealFrozenEngine

    config = smoke_config(tmp_path / "ws")
    config.workdir = str(tmp_path / "rl")
    config.data.batch_size = 2
    config.rl.group_size = 2
    config.rl.micro_batch_rows = 4
    config.train.steps = 2
    config.train.save_every = 1
    config.train.progress_bar = False
    config.eval.every = 2
    config.eval.num_queries = 6
    config.eval.batch_size = 6
    summary = train.run(config)

    assert summary.steps == 2
    assert isinstance(train.prepare(config), IdealFrozenEngine)  # agent.frozen = "ideal" (the warm start is reused)
    with open(os.path.join(config.workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "loss" in r or "skipped_updates" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["reward"]) and r["planner_calls"] > 0 for r in steps)
    # Held-out records keep their question type and oracle tools, so the breakdowns are logged.
    for metrics in (summary.initial_eval, summary.final_eval):
        assert metrics["eval_count"] == 6
        assert {"eval_accuracy/lookup", "eval_accuracy/arithmetic", "eval_accuracy/composition",
                "eval_tool_choice"} <= set(metrics)
    assert os.path.isfile(os.path.join(config.workdir, "curves.png"))
    exported = hf_io.load_pretrained(os.path.join(config.workdir, "planner_hf"), dtype=jnp.float32)
    assert exported.config.vocab_size == hf_io.load_pretrained(config.model.path).config.vocab_size
    config.agent.frozen = "model"  # the warm-started reference model serves the frozen roles
    assert sft.rl_frozen_engine(config) is None
