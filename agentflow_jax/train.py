"""Flow-GRPO training entry point.

    python -m agentflow_jax.train --config=experiments/configs/tiny_cpu.py
    python -m agentflow_jax.train --config=experiments/configs/tiny_cpu.py --config.optim.learning_rate=0.0

Each step: a batch of queries from grain -> rollouts (planner on the policy, the other modules and
the tools' LLM on the frozen initial weights, n per query) -> rewards -> advantages -> old and
reference log-probs -> mini-batch updates -> metrics -> checkpoint -> periodic evaluation.

The config is an ml_collections file (see experiments/configs/); a wrong key or type fails before
any compute. A config with a `world` section (the CPU toy world) first builds the world and the
supervised warm start (`agentflow_jax.sft`) when they are not in the work directory yet.
The run resumes automatically from the latest checkpoint in `workdir/checkpoints`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from agentflow_jax import checkpoint as checkpoint_lib
from agentflow_jax import sharding
from agentflow_jax.engines import Engine
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams
from agentflow_jax.data.pipeline import load_queries, make_query_iterator
from agentflow_jax.evaluate import evaluate_queries
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.observability import RunLogger, plot_curves
from agentflow_jax.rl.loss import LossConfig
from agentflow_jax.rl.trainer import FlowGRPOTrainer, TrainerConfig, make_optimizer
from agentflow_jax.tools import build_toolbox

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)


# ------------------------------------------------------------------------------------------------
# Config -> objects
# ------------------------------------------------------------------------------------------------


# Keys `train.py` reads, by section, with their types; a missing or misspelt key, or a value of
# the wrong type, is reported before any compute starts.
CONFIG_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "model": {"path": str, "tokenizer": str, "dtype": str, "param_dtype": str, "remat": bool,
              "max_cache_length": int},
    "data": {"train_path": str, "eval_path": str, "batch_size": int},
    "tools": {"names": (tuple, list), "settings": ml_collections.ConfigDict},
    "rollout": {"max_turns": int, "max_time_s": (int, float), "planner_temperature": (int, float),
                "planner_top_p": (int, float), "planner_max_new_tokens": int, "frozen_max_new_tokens": int,
                "memory_budget_chars": int, "compact_tools": bool},
    "rl": {"group_size": int, "estimator": str, "grouping": str, "ppo_epochs": int, "num_minibatches": int,
           "micro_batch_rows": int, "length_bucket": int, "loss": ml_collections.ConfigDict},
    "optim": {"learning_rate": (int, float), "b1": (int, float), "b2": (int, float), "weight_decay": (int, float),
              "grad_clip": (int, float), "warmup_steps": int},
    "train": {"steps": int, "save_every": int, "keep_checkpoints": int, "log_trajectories": int,
              "progress_bar": bool, "export_hf": bool},
    "eval": {"every": int, "at_start": bool, "num_queries": int, "batch_size": int,
             "planner_temperature": (int, float), "max_turns": int, "max_time_s": (int, float)},
}


# Counts that must be at least 1 (the dataclasses check the rl section's).
_POSITIVE = (("data", "batch_size"), ("train", "steps"), ("train", "save_every"), ("train", "keep_checkpoints"),
             ("eval", "every"), ("eval", "num_queries"), ("eval", "batch_size"), ("rollout", "max_turns"),
             ("rollout", "planner_max_new_tokens"), ("rollout", "frozen_max_new_tokens"), ("eval", "max_turns"))


def _has_type(value, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the sections train.py reads (CONFIG_SCHEMA) and builds the dataclasses once.

    Raises:
      ValueError naming the first problem: a missing section or key, an unknown key, a wrong type,
      or a value the trainer / loss / rollout dataclasses reject.
    """
    problems = []
    for top in ("seed", "workdir", "mesh"):
        if top not in config:
            problems.append(f"config lacks top-level key {top!r}")
    # The warm start of a toy-world config also reads the model's architecture keys (it builds the model).
    warm_start_keys = {"model": set(_warm_start().MODEL_KEYS)} if "world" in config else {}
    for section, keys in CONFIG_SCHEMA.items():
        if section not in config:
            problems.append(f"config lacks section {section!r} (keys {sorted(keys)})")
            continue
        present = set(config[section].keys())
        valid = set(keys) | warm_start_keys.get(section, set())
        problems += [f"config.{section} lacks key {k!r}" for k in sorted(set(keys) - present)]
        problems += [f"config.{section} has unknown key {k!r}; valid keys: {sorted(valid)}"
                     for k in sorted(present - valid)]
        for key, kind in keys.items():
            if key in present and not _has_type(config[section][key], kind):
                problems.append(f"config.{section}.{key} = {config[section][key]!r} should be of type {kind}")
    if not problems:
        problems += [f"config.{section}.{key} = {config[section][key]} must be >= 1" for section, key in _POSITIVE
                     if config[section][key] < 1]
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    unknown_loss = sorted(set(config.rl.loss.keys()) - {f.name for f in dataclasses.fields(LossConfig)} - {"temperature"})
    if unknown_loss:
        raise ValueError(f"config.rl.loss has unknown key(s) {unknown_loss}; valid keys: "
                         f"{sorted(f.name for f in dataclasses.fields(LossConfig) if f.name != 'temperature')}")
    if "temperature" in config.rl.loss:
        raise ValueError("config.rl.loss.temperature is set from config.rollout.planner_temperature; remove it")
    trainer_config(config)
    rollout_config(config)
    rollout_config(config, evaluation=True)
    if "world" in config:
        _warm_start().validate_config(config)


def _warm_start():
    """`agentflow_jax.sft`, imported only for toy-world configs (it pulls in the world generator)."""
    from agentflow_jax import sft

    return sft


def rollout_config(config: ml_collections.ConfigDict, *, evaluation: bool = False) -> RolloutConfig:
    """The loop limits and per-module sampling of `config.rollout` (greedy planner when evaluating)."""
    r = config.rollout
    frozen = SamplingParams(max_new_tokens=r.frozen_max_new_tokens)
    planner_temperature = config.eval.planner_temperature if evaluation else r.planner_temperature
    planner = SamplingParams(max_new_tokens=r.planner_max_new_tokens, temperature=planner_temperature,
                             top_p=r.planner_top_p if planner_temperature > 0 else 1.0)
    return RolloutConfig(max_turns=config.eval.max_turns if evaluation else r.max_turns,
                         max_time_s=config.eval.max_time_s if evaluation else r.max_time_s,
                         planner=planner, analysis=frozen, executor=frozen, verifier=frozen, generator=frozen,
                         memory_budget_chars=r.memory_budget_chars, compact_tools=r.compact_tools)


def trainer_config(config: ml_collections.ConfigDict) -> TrainerConfig:
    loss = LossConfig(**dict(config.rl.loss), temperature=config.rollout.planner_temperature)
    return TrainerConfig(group_size=config.rl.group_size, estimator=config.rl.estimator,
                         grouping=config.rl.grouping, loss=loss, ppo_epochs=config.rl.ppo_epochs,
                         num_minibatches=config.rl.num_minibatches, micro_batch_rows=config.rl.micro_batch_rows,
                         length_bucket=config.rl.length_bucket)


def toolbox_factory(config: ml_collections.ConfigDict):
    settings = config.tools.settings.to_dict()
    return lambda engine: build_toolbox(list(config.tools.names), engine=engine, config=settings)


def load_policy(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> qwen2.Qwen2ForCausalLM:
    return hf_io.load_pretrained(config.model.path, dtype=jnp.dtype(config.model.dtype),
                                 param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype),
                                 mesh=mesh, remat=config.model.remat)


def spread_subset(records: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """`count` records at evenly spaced positions (all when count >= len): files grouped by
    question type still give every type its share."""
    if count >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records), count, endpoint=False).astype(int)]


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSummary:
    """What a finished run reports (also written to workdir/summary.json)."""

    steps: int
    initial_eval: dict[str, float]
    final_eval: dict[str, float]
    seconds: float
    workdir: str


def prepare(config: ml_collections.ConfigDict) -> Engine | None:
    """Builds what the config's pipeline needs before RL; returns the frozen modules' engine when
    it is not the reference model (None: the trainer's default).

    A toy-world config (one with a `world` section) first gets its world, tokenizer and
    warm-started planner (`agentflow_jax.sft`, skipped when already built with this config), and
    its frozen roles are served as `agent.frozen` says.
    """
    if "world" not in config:
        return None
    sft = _warm_start()
    sft.ensure_warm_start(config)
    return sft.rl_frozen_engine(config)


def run(config: ml_collections.ConfigDict) -> RunSummary:
    """Trains the planner as `config` says; returns the initial and final evaluation."""
    start = time.perf_counter()
    validate_config(config)
    frozen_engine = prepare(config)
    workdir = config.workdir
    mesh = sharding.make_mesh(config.mesh.to_dict()) if config.mesh.to_dict() else None
    tokenizer = load_tokenizer(config.model.tokenizer)
    graphdef, params = nnx.split(load_policy(config, mesh))
    trainer = FlowGRPOTrainer(
        graphdef, params, tokenizer=tokenizer, toolbox_factory=toolbox_factory(config),
        optimizer=make_optimizer(config.optim.learning_rate, b1=config.optim.b1, b2=config.optim.b2,
                                 weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip,
                                 warmup_steps=config.optim.warmup_steps),
        config=trainer_config(config), rollout=rollout_config(config),
        max_cache_length=config.model.max_cache_length, seed=config.seed, frozen_engine=frozen_engine)

    train_data = load_queries(config.data.train_path)
    eval_records = spread_subset(load_queries(config.data.eval_path).records, config.eval.num_queries)
    iterator = make_query_iterator(train_data.records, batch_size=config.data.batch_size, seed=config.seed)
    checkpointer = checkpoint_lib.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
        best_metric="eval_accuracy", best_mode="max", save_interval_steps=1)
    restored = checkpointer.restore_latest(params=trainer.params, opt_state=trainer.opt_state,
                                           data_iterator=iterator)
    if restored is not None:
        trainer.restore({"params": restored.params, "opt_state": restored.opt_state, "step": restored.step})

    logger = RunLogger(workdir, total_steps=config.train.steps, initial_step=trainer.step,
                       progress=config.train.progress_bar)
    if restored is not None:
        logger.message(f"resumed from the checkpoint of step {restored.step} in {checkpointer.directory}")
    if train_data.skipped_without_answer:
        logger.message(f"skipped {train_data.skipped_without_answer} training rows without an answer")

    def evaluate(step: int) -> dict[str, float]:
        engine = trainer.planner_engine(seed=config.seed)
        result = evaluate_queries(eval_records, planner=engine, frozen=trainer.frozen_engine,
                                  toolbox=trainer.toolbox, rollout=rollout_config(config, evaluation=True),
                                  batch_size=config.eval.batch_size)
        metrics = {f"eval_{k}": v for k, v in result.metrics.items()}
        logger.log(step, metrics)
        logger.log_trajectories(step, "eval", [t.to_json() for t in result.trajectories[:config.train.log_trajectories]])
        logger.message(f"step {step}: eval accuracy {metrics['eval_accuracy']:.3f} "
                       f"(turns {metrics['eval_turns']:.2f}) on {len(eval_records)} held-out queries")
        return metrics

    initial_eval = evaluate(trainer.step) if restored is None and config.eval.at_start else {}
    last_eval = initial_eval
    while trainer.step < config.train.steps:
        queries = next(iterator)
        result = trainer.train_step(queries)
        step = trainer.step
        if result.metrics.get("skipped_updates"):
            logger.message(f"step {step}: skipped {int(result.metrics['skipped_updates'])} update(s) with a "
                           "non-finite loss or gradient")
        logger.log(step, result.metrics, advance=True)
        logger.log_trajectories(step, "train", [t.to_json() for t in result.trajectories[:config.train.log_trajectories]])
        is_last = step == config.train.steps
        if step % config.eval.every == 0 or is_last:
            last_eval = evaluate(step)
        if step % config.train.save_every == 0 or is_last:
            checkpointer.save(step, params=trainer.params, opt_state=trainer.opt_state, data_iterator=iterator,
                              metrics={"eval_accuracy": last_eval.get("eval_accuracy", float("nan"))},
                              force=True)
    checkpointer.wait_until_finished()
    logger.close()
    summary = RunSummary(steps=trainer.step, initial_eval=initial_eval, final_eval=last_eval,
                         seconds=time.perf_counter() - start, workdir=workdir)
    finish(config, trainer, graphdef, logger, summary)
    return summary


def finish(config: ml_collections.ConfigDict, trainer: FlowGRPOTrainer, graphdef: nnx.GraphDef,
           logger: RunLogger, summary: RunSummary) -> None:
    """Curves, the trained planner in HF format, and summary.json (primary process writes)."""
    if os.path.exists(logger.metrics_path) and logger.primary:
        plot_curves(logger.metrics_path, os.path.join(config.workdir, "curves.png"),
                    keys=("reward", "eval_accuracy", "kl", "turns"))
    if config.train.export_hf:
        hf_io.save_pretrained(nnx.merge(graphdef, trainer.params), os.path.join(config.workdir, "planner_hf"))
    if logger.primary:
        import json

        with open(os.path.join(config.workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(summary), f, indent=2)
        logger.message(format_summary(summary))


def format_summary(summary: RunSummary) -> str:
    before = summary.initial_eval.get("eval_accuracy")
    after = summary.final_eval.get("eval_accuracy")
    lines = [f"{summary.steps} steps in {summary.seconds / 60:.1f} min; results in {summary.workdir}"]
    if before is not None and after is not None:
        lines.append(f"held-out accuracy: warm-started planner {before:.3f} -> after Flow-GRPO {after:.3f} "
                     f"({100 * (after - before):+.1f} points)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=experiments/configs/<name>.py (e.g. tiny_cpu.py)")
    if not flags.FLAGS["verbosity"].present:  # library INFO lines (Orbax, XLA) drown the run's own messages
        logging.set_verbosity(logging.WARNING)
    if os.environ.get("AGENTFLOW_DISTRIBUTED"):
        jax.distributed.initialize()
    summary = run(_CONFIG.value)
    del summary


if __name__ == "__main__":
    app.run(main)
