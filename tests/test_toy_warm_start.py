"""The toy world's warm start and pipeline: config checks, supervised batching, one compile per
bucket, a smoke run end to end, and the toy plugged into Flow-GRPO through a model directory and an
engine spec only."""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agentflow_jax import supervised, train
from agentflow_jax.config_reader import ConfigError
from agentflow_jax.engines import engine_from_spec
from agentflow_jax.experiment import read_experiment
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.config import Qwen2Config
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.optim import OptimConfig, make_optimizer
from agentflow_jax.toy import warm_start
from agentflow_jax.toy.config import read_toy
from agentflow_jax.toy.frozen import IdealFrozenEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(ROOT, "experiments", "configs", "tiny_cpu.py")


def tiny_cpu_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_cpu", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def read(config):
    experiment = read_experiment(config, source=CONFIG_PATH, extra_sections=("toy",))
    return read_toy(config, experiment)


def smoke_config(workdir: str) -> ml_collections.ConfigDict:
    """A few seconds' worth: 40 cities, 24 questions, a 1-layer 32-wide model, 12 steps."""
    config = tiny_cpu_config()
    config.workdir = str(workdir)
    toy = config.toy
    toy.world.num_entities = 40
    toy.world.train_questions = {"lookup": 8, "arithmetic": 8, "composition": 8}
    toy.world.heldout_questions = {"lookup": 3, "arithmetic": 3, "composition": 3}
    toy.demos.heldout_questions = 3
    toy.tokenizer.vocab_size = 900
    toy.architecture.hidden_size = 32
    toy.architecture.intermediate_size = 64
    toy.architecture.num_layers = 1
    toy.architecture.num_heads = 2
    toy.architecture.num_kv_heads = 1
    toy.warm_start.steps = 12
    toy.warm_start.optim.warmup_steps = 2
    toy.warm_start.optim.learning_rate = 1e-2
    toy.warm_start.length_buckets = (512, 1024)
    toy.warm_start.tokens_per_batch = 4096
    toy.warm_start.log_every = 4
    toy.warm_start.eval_per_role = 0
    toy.warm_start.eval_agent_questions = 0
    return config


def test_every_path_follows_the_workdir():
    config = tiny_cpu_config()
    config.workdir = "/somewhere"
    toy = read(config)
    assert toy.paths.root == "/somewhere/warm_start"
    assert config.model.path == toy.paths.model and config.model.tokenizer == toy.paths.tokenizer
    assert config.tools.settings.search.corpus_path == toy.paths.corpus
    assert config.data.train_path == toy.paths.queries("train")
    assert config.engines.frozen == "toy:ideal,/somewhere/warm_start/world"


def test_a_training_section_that_misses_the_warm_start_is_rejected():
    config = tiny_cpu_config()
    config.model.path = "/elsewhere/model"
    with pytest.raises(ConfigError, match=r"config.model.path = '/elsewhere/model': .*set it to 'runs/tiny_cpu/"):
        read(config)


@pytest.mark.parametrize("section,key", [("warm_start", "stpes"), ("world", "num_cities"), ("architecture", "hidden"),
                                         ("tokenizer", "vocab"), ("demos", "corruption")])
def test_unknown_toy_keys_fail_before_any_compute(section, key):
    config = tiny_cpu_config()
    config.toy[section].unlock()
    config.toy[section][key] = 1
    with pytest.raises(ConfigError, match=f"tiny_cpu.py: config.toy.{section} has unknown key '{key}'"):
        read(config)


def test_unknown_role_bad_buckets_and_an_untrained_frozen_model_are_clear_errors():
    config = tiny_cpu_config()
    config.toy.demos.role_limits = {"oracle": 3}
    with pytest.raises(ConfigError, match="unknown role"):
        read(config)
    config = tiny_cpu_config()
    config.toy.warm_start.length_buckets = (256, 128)
    with pytest.raises(ConfigError, match="increasing"):
        read(config)
    config = tiny_cpu_config()
    config.engines.frozen = "reference"
    with pytest.raises(ConfigError, match="leaves .* untrained"):
        read(config)


def test_packed_examples_put_the_loss_on_the_target_tokens_only():
    example = supervised.Example(prompt_ids=(5, 6, 7), target_ids=(8, 9, 2))
    batch = supervised.pack_examples([example], length=8, rows=2, pad_id=0)
    np.testing.assert_array_equal(batch.input_ids[0], [5, 6, 7, 8, 9, 2, 0, 0])
    np.testing.assert_array_equal(batch.targets[0], [6, 7, 8, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 1, 1, 1, 0, 0, 0])  # predicts 8, 9, <|im_end|>
    assert batch.attention_mask[1].sum() == 0 and batch.loss_mask[1].sum() == 0  # a padding row


def test_train_step_compiles_once_per_length_bucket_and_learns():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=2, schedule="cosine", end_lr_fraction=0.1, weight_decay=0.0,
                        b2=0.98)
    trainer = supervised.SFTTrainer(qwen2.init_random(config), make_optimizer(optim, total_steps=20), chunk_size=512)
    rng = np.random.default_rng(0)
    short = [supervised.Example(tuple(rng.integers(4, 64, 5).tolist()), (10, 11, 12, 2)) for _ in range(8)]
    longer = [supervised.Example(tuple(rng.integers(4, 64, 20).tolist()), (10, 11, 12, 2)) for _ in range(8)]
    losses = []
    for step in range(12):
        rows, length = (short, 16) if step % 2 else (longer, 32)
        nll, _ = trainer.step(supervised.pack_examples(rows, length=length, rows=8, pad_id=0))
        losses.append(float(nll))
    assert dict(trainer.trace_counts) == {16: 1, 32: 1}
    assert losses[-1] < 0.5 * losses[0]


def test_smoke_warm_start_writes_a_loadable_model_and_is_reused(tmp_path):
    toy = read(smoke_config(tmp_path))
    report = warm_start.run_warm_start(toy)
    history = report["sft"]["history"]
    assert history[-1]["target_nll"] < history[0]["target_nll"]
    assert set(report["sft"]["compiles_per_bucket"].values()) == {1}
    assert set(report["timings_s"]) >= {"world", "demos", "tokenizer", "sft", "total"}
    paths = toy.paths
    model = hf_io.load_pretrained(paths.model, dtype=jnp.float32)
    tokenizer = SentencePieceTokenizer.load(paths.tokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size
    assert os.path.isfile(os.path.join(paths.model, "tokenizer.model"))
    logits = model(jnp.asarray([tokenizer.encode("Query: When was")], jnp.int32))
    assert bool(jnp.isfinite(logits).all())
    with open(paths.queries("heldout"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 9 and {"pid", "query", "answer", "kind", "qtype", "tools"} <= set(records[0])
    with open(paths.manifest, encoding="utf-8") as f:
        assert json.load(f)["fingerprint"] == warm_start.config_fingerprint(toy)
    mtime = os.path.getmtime(os.path.join(paths.model, "config.json"))
    warm_start.ensure_warm_start(toy)  # same configuration: nothing is rebuilt
    assert os.path.getmtime(os.path.join(paths.model, "config.json")) == mtime


def test_toy_config_runs_two_flow_grpo_steps_end_to_end(tmp_path):
    """world -> tokenizer -> warm start -> 2 Flow-GRPO steps -> evaluation -> curves, on the shipped config;
    training sees the toy only as a model directory, query files and the "toy:ideal,DIR" engine spec."""
    config = smoke_config(tmp_path)
    config.data.batch_size = 2
    config.rl.group_size = 2
    config.rl.micro_batch_rows = 4
    config.train.steps = 2
    config.train.save_every = 1
    config.train.progress_bar = False
    config.eval.every = 2
    config.eval.num_queries = 9              # every held-out question, so the evaluate command sees the same items
    config.eval.batch_size = 6
    toy = read(config)
    warm_start.ensure_warm_start(toy)
    summary = train.run(toy.experiment)

    assert summary.steps == 2
    assert isinstance(engine_from_spec(config.engines.frozen), IdealFrozenEngine)  # an entry point of the registry
    with open(os.path.join(config.workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "loss" in r or "skipped_updates" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["reward"]) and r["planner_calls"] > 0 for r in steps)
    # Held-out records keep their question type and oracle tools, so the breakdowns are logged.
    for metrics in (summary.initial_eval, summary.final_eval):
        assert metrics["eval_count"] == 9
        assert {"eval_accuracy/lookup", "eval_accuracy/arithmetic", "eval_accuracy/composition",
                "eval_tool_choice"} <= set(metrics)
    assert os.path.isfile(os.path.join(config.workdir, "curves.png"))
    exported = hf_io.load_pretrained(os.path.join(config.workdir, "planner_hf"), dtype=jnp.float32)
    assert exported.config.vocab_size == hf_io.load_pretrained(config.model.path).config.vocab_size

    # The evaluate command on the held-out questions (a custom benchmark: rows carry their scorer kind),
    # from the trained checkpoint, with the demo's engines and loop limits: the demo's accuracy again.
    out = os.path.join(config.workdir, "table1")
    command = [sys.executable, "-m", "agentflow_jax.evaluate", f"--config={CONFIG_PATH}",
               f"--config.workdir={config.workdir}", "--config.eval.batch_size=6", "--benchmark=custom",
               f"--data={toy.paths.queries('heldout')}", f"--checkpoint={config.workdir}/checkpoints",
               f"--max_turns={config.eval.max_turns}", f"--max_time_s={config.eval.max_time_s}",
               f"--output_dir={out}", "--noprogress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "heldout_queries", "summary.json"), encoding="utf-8") as f:
        evaluated = json.load(f)
    assert evaluated["items"] == 9
    assert evaluated["accuracy"] == pytest.approx(summary.final_eval["eval_accuracy"])
    for qtype in ("lookup", "arithmetic", "composition"):
        assert evaluated[f"accuracy/{qtype}"] == pytest.approx(summary.final_eval[f"eval_accuracy/{qtype}"])
    assert evaluated["tool_choice/lookup"] == pytest.approx(summary.final_eval["eval_tool_choice/lookup"])
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert f"| **ours (this run)** | {100 * evaluated['accuracy']:.1f} |" in table
    assert os.path.isfile(os.path.join(out, "chart.png"))
