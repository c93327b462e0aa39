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
from typing import Any, Mapping

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from agentflow_jax import checkpoint as checkpoint_lib
from agentflow_jax import sharding
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams
from agentflow_jax.data.pipeline import load_queries, make_query_iterator
from agentflow_jax.evaluate import evaluate_queries
from agentflow_jax.models import qwen2
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
    return qwen2.from_pretrained(config.model.path, dtype=jnp.dtype(config.model.dtype),
                                 param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype),
                                 mesh=mesh, remat=config.model.remat)


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


def prepare(config: ml_collections.ConfigDict) -> None:
    """Builds what the config's pipeline needs before RL (the toy world's warm start)."""
    if "world" in config:
        from agentflow_jax import sft

        sft.ensure_warm_start(config)


def run(config: ml_collections.ConfigDict) -> RunSummary:
    """Trains the planner as `config` says; returns the initial and final evaluation."""
    start = time.perf_counter()
    prepare(config)
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
        max_cache_length=config.model.max_cache_length, seed=config.seed)

    train_data = load_queries(config.data.train_path)
    eval_records = load_queries(config.data.eval_path).records[:config.eval.num_queries]
    iterator = make_query_iterator(train_data.records, batch_size=config.data.batch_size, seed=config.seed)
    checkpointer = checkpoint_lib.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
        best_metric="eval_accuracy", best_mode="max", save_interval_steps=1)
    restored = checkpointer.restore_latest(params=trainer.params, opt_state=trainer.opt_state,
                                           data_iterator=iterator)
    if restored is not None:
        trainer.restore({"params": restored.params, "opt_state": restored.opt_state, "step": restored.step})
        logging.info("resumed from step %d", restored.step)

    logger = RunLogger(workdir, total_steps=config.train.steps, initial_step=trainer.step,
                       progress=config.train.progress_bar)
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
        checkpoint_lib.export_hf(nnx.merge(graphdef, trainer.params), os.path.join(config.workdir, "planner_hf"))
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
    if os.environ.get("AGENTFLOW_DISTRIBUTED"):
        jax.distributed.initialize()
    summary = run(_CONFIG.value)
    del summary


if __name__ == "__main__":
    app.run(main)
