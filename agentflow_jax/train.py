"""Flow-GRPO training entry point.

    python -m agentflow_jax.train --config=experiments/configs/qwen2_5_7b_flow_grpo.py \
        --config.model.path=/models/Qwen2.5-7B-Instruct --config.optim.learning_rate=1e-6

Each step: a batch of queries from grain -> rollouts (planner on the policy, the other modules and
the tools' LLM on the frozen engine, n per query) -> rewards -> advantages -> old and reference
log-probs -> mini-batch updates -> metrics -> checkpoint -> periodic evaluation.

The config is an ml_collections file (experiments/configs/); every section is checked before any
compute (`experiment.read_experiment`). The planner loads from a local HF directory; the frozen
modules and the judge are engines named by spec (`engines.registry`). Everything the run writes
goes under `workdir`, and the run resumes from the latest checkpoint in `workdir/checkpoints`.
(The CPU toy world builds its planner and world first: `python -m agentflow_jax.toy`.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from absl import app

import agentflow_jax
from agentflow_jax import checkpoint as checkpoint_lib
from agentflow_jax import cli, distributed, sharding
from agentflow_jax.config_reader import ConfigError
from agentflow_jax.data.pipeline import load_queries, make_query_iterator
from agentflow_jax.evaluate import evaluate_queries, metrics_from_outcomes, record_outcomes
from agentflow_jax.experiment import Experiment, frozen_engines, read_experiment, reward_judge
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.observability import RunLogger, plot_curves
from agentflow_jax.optim import make_optimizer
from agentflow_jax.rl.trainer import FlowGRPOTrainer

_CONFIG = cli.config_flag()


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


def run(experiment: Experiment) -> RunSummary:
    """Trains the planner as the checked config says; returns the initial and final evaluation."""
    start = time.perf_counter()
    e = experiment
    mesh = sharding.make_mesh(e.mesh) if e.mesh else None
    if e.data.batch_size % jax.process_count():
        raise ConfigError(f"{e.source or 'config'}: config.data.batch_size = {e.data.batch_size} queries cannot be "
                          f"shared by {jax.process_count()} processes; make it a multiple of {jax.process_count()}")
    tokenizer = load_tokenizer(e.model.tokenizer_spec)
    model = hf_io.load_pretrained(e.model.path, dtype=jnp.dtype(e.model.dtype),
                                  param_dtype=jnp.dtype(e.model.storage_dtype), mesh=mesh, remat=e.model.remat)
    graphdef, params = nnx.split(model)
    train_data = load_queries(e.data.train_path)
    eval_records = spread_subset(load_queries(e.data.eval_path).records, e.eval.num_queries)
    judge = reward_judge(e, train_data.records + tuple(eval_records))
    iterator = make_query_iterator(train_data.records, batch_size=e.data.batch_size, seed=e.seed)
    trainer = FlowGRPOTrainer(
        graphdef, params, tokenizer=tokenizer, toolbox_factory=e.tools.build,
        optimizer=make_optimizer(e.optim, total_steps=e.train.steps), config=e.rl, rollout=e.rollout_config(),
        max_cache_length=e.model.max_cache_length, max_cache_rows=e.model.max_cache_rows or None, seed=e.seed,
        frozen_engines=frozen_engines(e), judge=judge, data_iterator=iterator, mesh=mesh)
    # Several processes save synchronously: Orbax's asynchronous save waits at barriers that are device
    # collectives, and from its thread they can interleave with the next step's collectives in another
    # order on each process (a deadlock, seen with 2 CPU processes).
    checkpointer = checkpoint_lib.TrainCheckpointer(
        e.path("checkpoints"), max_to_keep=e.train.keep_checkpoints, best_metric="eval_accuracy", best_mode="max",
        save_interval_steps=1, async_save=jax.process_count() == 1)
    resumed = checkpointer.latest_step() is not None
    if resumed:
        trainer.state = checkpointer.restore_state(trainer.state)
    metadata = run_metadata(e, trainer)

    logger = RunLogger(e.workdir, total_steps=e.train.steps, initial_step=trainer.step, progress=e.train.progress_bar)
    if resumed:
        logger.message(f"resumed from the checkpoint of step {trainer.step} in {checkpointer.directory}")
    if train_data.skipped_without_answer:
        logger.message(f"skipped {train_data.skipped_without_answer} training rows without an answer")
    if logger.primary:
        with open(e.path("run_metadata.json"), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1, default=str)

    mine = np.array_split(np.arange(len(eval_records)), jax.process_count())[jax.process_index()]

    def evaluate(step: int) -> dict[str, float]:
        """Each process evaluates its share of the held-out queries; the metrics are over all of them."""
        result = evaluate_queries([eval_records[i] for i in mine], planner=trainer.planner_engine(seed=e.seed),
                                  frozen=trainer.frozen_engines, toolbox=trainer.toolbox,
                                  rollout=e.rollout_config(evaluation=True), batch_size=e.eval.batch_size, judge=judge,
                                  first_sample_id=int(mine[0]) if len(mine) else 0)
        outcomes = record_outcomes([eval_records[i] for i in mine], result.trajectories, result.rewards)
        metrics = {f"eval_{k}": v for k, v in
                   metrics_from_outcomes(eval_records, distributed.gather_ragged(outcomes)).items()}
        logger.log(step, metrics)
        logger.log_trajectories(step, "eval", [t.to_json() for t in result.trajectories[:e.train.log_trajectories]])
        logger.message(f"step {step}: eval accuracy {metrics['eval_accuracy']:.3f} "
                       f"(turns {metrics['eval_turns']:.2f}) on {len(eval_records)} held-out queries")
        return metrics

    initial_eval = evaluate(trainer.step) if not resumed and e.eval.at_start else {}
    last_eval = initial_eval
    while trainer.step < e.train.steps:
        result = trainer.train_step(next(iterator))
        step = trainer.step
        if result.metrics.get("skipped_updates"):
            logger.message(f"step {step}: skipped {int(result.metrics['skipped_updates'])} update(s) with a "
                           "non-finite loss or gradient")
        logger.log(step, result.metrics, advance=True)
        logger.log_trajectories(step, "train", [t.to_json() for t in result.trajectories[:e.train.log_trajectories]])
        is_last = step == e.train.steps
        if step % e.eval.every == 0 or is_last:
            last_eval = evaluate(step)
        if step % e.train.save_every == 0 or is_last:
            checkpointer.save_state(trainer.state, force=True, metadata=metadata,
                                    metrics={"eval_accuracy": last_eval.get("eval_accuracy", float("nan"))})
    checkpointer.wait_until_finished()
    logger.close()
    summary = RunSummary(steps=trainer.step, initial_eval=initial_eval, final_eval=last_eval,
                         seconds=time.perf_counter() - start, workdir=e.workdir)
    finish(e, trainer, logger, summary)
    return summary


def run_metadata(experiment: Experiment, trainer: FlowGRPOTrainer) -> dict[str, Any]:
    """What the run records beside its results (run_metadata.json, every checkpoint): the checked config,
    versions, devices, and each tool's own record (the Python sandbox's isolation in force)."""
    return {"config": dataclasses.asdict(experiment), "agentflow_jax": agentflow_jax.__version__,
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
            "tools": trainer.toolbox.run_metadata()}


def finish(experiment: Experiment, trainer: FlowGRPOTrainer, logger: RunLogger, summary: RunSummary) -> None:
    """Curves, the trained planner in HF format, and summary.json (the primary process writes)."""
    if os.path.exists(logger.metrics_path) and logger.primary:
        plot_curves(logger.metrics_path, experiment.path("curves.png"), keys=("reward", "eval_accuracy", "kl", "turns"))
    if experiment.train.export_hf:
        hf_io.save_pretrained(nnx.merge(trainer.graphdef, trainer.params), experiment.path("planner_hf"))
    if logger.primary:
        with open(experiment.path("summary.json"), "w", encoding="utf-8") as f:
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
    config, source = cli.load_config(_CONFIG)
    experiment = read_experiment(config, source=source)
    cli.initialize_distributed()
    run(experiment)


if __name__ == "__main__":
    cli.run(main)
