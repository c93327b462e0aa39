"""Supervised fine-tuning of a local Hugging Face Qwen2 / Qwen2.5 checkpoint on chats.

    python -m agentflow_jax.sft --config=experiments/configs/qwen2_5_sft.py:1.5b \\
        --config.model.path=/models/Qwen2.5-1.5B-Instruct \\
        --config.data.train_path=runs/flow_grpo/trajectories.jsonl

Data (`data.format`, read by `data.chats`): a chat file (JSON lines of {"messages": [...]}; the loss
covers the assistant messages only, tokenised through the chat template), or a run's
`trajectories.jsonl`, whose planner calls become chats (a warm start of the planner from recorded
rollouts; `data.correct_only` keeps the correctly answered trajectories, scored against
`data.queries_path`). Everything else is the Flow-GRPO run's: the device mesh and sharding rules,
Orbax checkpoints of a `TrainState` in `<workdir>/checkpoints` (a rerun resumes from the newest),
`metrics.jsonl`, TensorBoard events and `curves.png`, and the trained model in HF format in
`<workdir>/model_hf`, with the tokenizer's files, for `solve --model=` or `train`.

Config sections (experiments/configs/qwen2_5_sft.py; every key checked before any compute):

  seed, workdir, mesh   as in a training config (`experiment.read_run_keys`)
  model                 the checkpoint and its tokenizer (`experiment.ModelSection`; its
                        max_cache_length is the sampler's and unused here)
  data                  `SFTDataSection`
  batch                 `BatchSection`: length buckets, tokens per batch, LM-head chunk
  optim                 `optim.OptimConfig`
  train                 `SFTTrainSection`: steps, console log, checkpoints, HF export
  eval                  `SFTEvalSection`: held-out NLL per target token
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app

import agentflow_jax
from agentflow_jax import checkpoint as checkpoint_lib
from agentflow_jax import cli, sharding
from agentflow_jax.config_reader import ConfigError, check_fields, read_section, setting
from agentflow_jax.data.chats import ASSISTANT_TURNS, TRAJECTORY_SPLITS, read_chat_file, read_trajectory_file
from agentflow_jax.data.pipeline import load_queries
from agentflow_jax.experiment import ModelSection, read_run_keys
from agentflow_jax.models import hf_io
from agentflow_jax.models.tokenizer import Tokenizer, load_tokenizer
from agentflow_jax.observability import RunLogger, plot_curves
from agentflow_jax.optim import OptimConfig, learning_rate_schedule, make_optimizer
from agentflow_jax.supervised import (Example, SFTTrainer, bucket_of, chat_examples, check_batching, mean_nll,
                                      train_supervised)
from agentflow_jax.train import spread_subset

_CONFIG = cli.config_flag()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Files of a Hugging Face tokenizer directory copied next to the exported weights."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTDataSection:
    """What to train on (`data.chats` describes both formats).

    Attributes:
      train_path: the training file (JSON lines).
      format: "chat" (a chat file) or "trajectories" (a run's trajectories.jsonl: its planner calls).
      eval_path: a held-out file of the same format ("": no held-out loss).
      assistant_turns: chat files: "all" assistant messages carry loss, or the "last" of each chat.
      splits: trajectories: the logged splits used ("train", "eval").
      correct_only: trajectories: only those whose answer scores 1 against `queries_path`.
      queries_path: the query file (pid, query, answer, kind) giving the gold answers.
      skip_too_long: drop examples longer than the longest length bucket (False: an error).
    """

    train_path: str
    format: str = setting("chat", choices=("chat", "trajectories"))
    eval_path: str = ""
    assistant_turns: str = setting("all", choices=ASSISTANT_TURNS)
    splits: tuple[str, ...] = ("train",)
    correct_only: bool = False
    queries_path: str = ""
    skip_too_long: bool = False

    def __post_init__(self):
        check_fields(self)
        unknown = sorted(set(self.splits) - set(TRAJECTORY_SPLITS))
        if unknown or not self.splits:
            raise ValueError(f"splits must name some of {list(TRAJECTORY_SPLITS)}, got {list(self.splits)}")
        if self.correct_only and (self.format != "trajectories" or not self.queries_path):
            raise ValueError("correct_only needs format 'trajectories' and queries_path (the gold answers)")


@dataclasses.dataclass(frozen=True)
class BatchSection:
    """Rows of a bucket's length: `tokens_per_batch // length` per optimizer step (padded up to a
    multiple of the mesh's batch shards); `chunk_size` positions per LM-head chunk."""

    length_buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    tokens_per_batch: int = setting(16_384, min=1)
    chunk_size: int = setting(512, min=1)

    def __post_init__(self):
        check_fields(self)
        check_batching(self.length_buckets, self.tokens_per_batch)


@dataclasses.dataclass(frozen=True)
class SFTTrainSection:
    """Optimizer steps; a console line every `log_every` steps (metrics.jsonl gets every step);
    checkpoints every `save_every` steps (the newest `keep_checkpoints` and the best by held-out
    NLL kept); HF export at the end, in `export_dtype` ("" = the parameters' dtype)."""

    steps: int = setting(1000, min=1)
    log_every: int = setting(10, min=1)
    save_every: int = setting(200, min=1)
    keep_checkpoints: int = setting(2, min=1)
    progress_bar: bool = True
    export_hf: bool = True
    export_dtype: str = setting("", choices=("", "float32", "bfloat16"))

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class SFTEvalSection:
    """Held-out NLL per target token every `every` steps, at the start (`at_start`) and at the end,
    on at most `max_examples` evenly spread held-out examples."""

    every: int = setting(100, min=1)
    at_start: bool = True
    max_examples: int = setting(512, min=1)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class SFTRun:
    """A checked SFT config (module docstring)."""

    seed: int
    workdir: str
    mesh: dict[str, int]
    model: ModelSection
    data: SFTDataSection
    batch: BatchSection
    optim: OptimConfig
    train: SFTTrainSection
    eval: SFTEvalSection
    source: str | None = None

    def path(self, *parts: str) -> str:
        """A path under the run's workdir (every file the run writes goes there)."""
        return os.path.join(self.workdir, *parts)


TOP_LEVEL = ("seed", "workdir", "mesh", "model", "data", "batch", "optim", "train", "eval")


def read_sft(config: Any, *, source: str | None = None) -> SFTRun:
    """Checks every section of an SFT config and returns them typed (raises ConfigError)."""
    seed, workdir, mesh = read_run_keys(config, TOP_LEVEL, source=source)
    sections = {"model": ModelSection, "data": SFTDataSection, "batch": BatchSection, "optim": OptimConfig,
                "train": SFTTrainSection, "eval": SFTEvalSection}
    return SFTRun(seed=seed, workdir=workdir, mesh=mesh, source=source,
                  **{name: read_section(config, name, cls, source=source, required=name in ("model", "data"))
                     for name, cls in sections.items()})


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def open_tokenizer(run: SFTRun) -> Tokenizer:
    """The run's tokenizer, after checking that the data files and the model directory exist (before
    anything is read); ConfigError or FileNotFoundError naming what is missing."""
    where = f"{run.source}: " if run.source else ""
    data = run.data
    for key, path in (("data.train_path", data.train_path), ("data.eval_path", data.eval_path),
                      ("data.queries_path", data.queries_path if data.correct_only else "")):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{where}config.{key} = {path!r}: no such file")
    if not os.path.isdir(run.model.path):
        raise FileNotFoundError(f"model directory {run.model.path!r} does not exist (weights load only from local "
                                "directories; set config.model.path)")
    try:
        return load_tokenizer(run.model.tokenizer_spec)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{where}config.model.tokenizer = {run.model.tokenizer!r}: {e}") from e


def load_examples(run: SFTRun, tokenizer: Tokenizer, path: str) -> tuple[list[Example], dict[str, int]]:
    """The distinct examples of a data file and what was counted: chats or trajectories read,
    examples, duplicates dropped, examples too long (dropped when `data.skip_too_long`, else a
    ConfigError)."""
    data = run.data
    where = f"{run.source}: " if run.source else ""
    if data.format == "chat":
        chats = read_chat_file(path, assistant_turns=data.assistant_turns)
        counts = {"chats": len(chats)}
    else:
        queries = load_queries(data.queries_path).records if data.correct_only else None
        read = read_trajectory_file(path, splits=data.splits, queries=queries)
        chats, counts = read.chats, dict(read.counts)
    unique: dict[tuple[tuple[int, ...], tuple[int, ...]], Example] = {}
    for chat in chats:
        for example in chat_examples(tokenizer, chat.messages, chat.trained, group=data.format):
            unique.setdefault((example.prompt_ids, example.target_ids), example)
    examples = list(unique.values())
    longest = run.batch.length_buckets[-1]
    fitting = [e for e in examples if bucket_of(e.length, run.batch.length_buckets) is not None]
    if len(fitting) < len(examples) and not data.skip_too_long:
        raise ConfigError(f"{where}{len(examples) - len(fitting)} of the {len(examples)} examples of {path} are longer "
                          f"than the longest length bucket ({longest} tokens; longest example "
                          f"{max(e.length for e in examples)}): add a bucket to config.batch.length_buckets or set "
                          "config.data.skip_too_long = True")
    if not fitting:
        raise ConfigError(f"{where}every example of {path} is longer than {longest} tokens")
    counts.update(examples=len(fitting), duplicates=sum(len(c.trained) for c in chats) - len(examples),
                  too_long=len(examples) - len(fitting))
    return fitting, counts


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTSummary:
    """What a finished run reports (also written to workdir/summary.json)."""

    steps: int
    first_nll: float
    last_nll: float
    initial_eval_nll: float | None
    final_eval_nll: float | None
    data: dict[str, int]
    tokens_per_s: float
    seconds: float
    workdir: str
    model_hf: str | None


def run(config: SFTRun) -> SFTSummary:
    """Fine-tunes the checkpoint as the checked config says; returns the summary."""
    start = time.perf_counter()
    c = config
    tokenizer = open_tokenizer(c)
    mesh = sharding.make_mesh(c.mesh) if c.mesh else None
    examples, counts = load_examples(c, tokenizer, c.data.train_path)
    eval_examples = []
    if c.data.eval_path:
        eval_examples, _ = load_examples(c, tokenizer, c.data.eval_path)
        eval_examples = spread_subset(eval_examples, c.eval.max_examples)
    model = hf_io.load_pretrained(c.model.path, dtype=jnp.dtype(c.model.dtype),
                                  param_dtype=jnp.dtype(c.model.storage_dtype), mesh=mesh, remat=c.model.remat)
    largest_id = max(max(e.prompt_ids + e.target_ids) for e in examples + eval_examples)
    if largest_id >= model.config.vocab_size:
        raise ConfigError(f"token id {largest_id} of tokenizer {c.model.tokenizer_spec!r} is outside the vocabulary of "
                          f"the model in {c.model.path} ({model.config.vocab_size}); use the model's own tokenizer")
    trainer = SFTTrainer(model, make_optimizer(c.optim, total_steps=c.train.steps), chunk_size=c.batch.chunk_size,
                         mesh=mesh, seed=c.seed, loss_positions_only=True)
    checkpointer = checkpoint_lib.TrainCheckpointer(
        c.path("checkpoints"), max_to_keep=c.train.keep_checkpoints,
        best_metric="eval_nll" if eval_examples else None, best_mode="min", save_interval_steps=1)
    resumed = checkpointer.latest_step() is not None
    if resumed:
        trainer.state = checkpointer.restore_state(trainer.state)
    logger = RunLogger(c.workdir, total_steps=c.train.steps, initial_step=trainer.state.step,
                       progress=c.train.progress_bar, description="SFT")
    metadata = {"config": dataclasses.asdict(c), "data": counts, "agentflow_jax": agentflow_jax.__version__,
                "jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "processes": jax.process_count()}
    if resumed:
        logger.message(f"resumed from the checkpoint of step {trainer.state.step} in {checkpointer.directory}")
    logger.message(f"{counts['examples']} training examples from {c.data.train_path} ({counts}); "
                   f"{len(eval_examples)} held-out")
    if logger.primary:
        with open(c.path("run_metadata.json"), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1, default=str)

    schedule = learning_rate_schedule(c.optim, c.train.steps)
    evals: dict[int, float] = {}

    def evaluate(step: int) -> None:
        evals[step] = mean_nll(trainer, eval_examples, buckets=c.batch.length_buckets,
                               tokens_per_batch=c.batch.tokens_per_batch, pad_id=tokenizer.pad_token_id)
        logger.log(step, {"eval_nll": evals[step]})
        logger.message(f"step {step}: held-out NLL {evals[step]:.4f} per target token ({len(eval_examples)} examples)")

    losses: list[float] = []

    def after_step(step: int, info: dict[str, Any]) -> None:
        losses.append(float(info["nll"]))
        logger.log(step, {"nll": losses[-1], "grad_norm": float(info["grad_norm"]),
                          "learning_rate": float(schedule(step - 1)), "tokens": info["tokens"],
                          "target_tokens": info["target_tokens"], "epoch": info["epoch"]}, advance=True)
        is_last = step == c.train.steps
        if eval_examples and (step % c.eval.every == 0 or is_last):
            evaluate(step)
        if step % c.train.save_every == 0 or is_last:
            metrics = {"eval_nll": evals[max(evals)]} if evals else None
            checkpointer.save_state(trainer.state, force=True, metadata=metadata, metrics=metrics)

    if eval_examples and c.eval.at_start and not resumed:
        evaluate(0)
    stats = train_supervised(trainer, examples, steps=c.train.steps, buckets=c.batch.length_buckets,
                             tokens_per_batch=c.batch.tokens_per_batch, pad_id=tokenizer.pad_token_id, seed=c.seed,
                             log_every=c.train.log_every, log=logger.message, after_step=after_step)
    checkpointer.wait_until_finished()
    logger.close()
    model_hf = c.path("model_hf") if c.train.export_hf else None
    if model_hf:
        export_dtype = jnp.dtype(c.train.export_dtype) if c.train.export_dtype else None
        hf_io.save_pretrained(trainer.model(), model_hf, dtype=export_dtype)
        if logger.primary:
            copy_tokenizer_files(c.model.tokenizer_spec, model_hf)
    summary = SFTSummary(steps=trainer.state.step, first_nll=losses[0] if losses else math.nan,
                         last_nll=losses[-1] if losses else math.nan,
                         initial_eval_nll=evals.get(0), final_eval_nll=evals[max(evals)] if evals else None,
                         data=counts, tokens_per_s=stats["tokens_per_s"], seconds=time.perf_counter() - start,
                         workdir=c.workdir, model_hf=model_hf)
    if logger.primary:
        if os.path.exists(logger.metrics_path):
            plot_curves(logger.metrics_path, c.path("curves.png"), keys=("nll", "eval_nll", "grad_norm"), title="SFT")
        with open(c.path("summary.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(summary), f, indent=2)
        logger.message(format_summary(summary))
    return summary


def copy_tokenizer_files(spec: str, directory: str) -> list[str]:
    """Copies a tokenizer's files next to exported weights, so the directory loads on its own: a
    Hugging Face tokenizer directory's `TOKENIZER_FILES`, or a SentencePiece model as
    `tokenizer.model`. The offline "qwen2.5" tokenizer has no files (pass tokenizer "qwen2.5" when
    loading). Returns the names copied."""
    if os.path.isfile(spec):
        shutil.copyfile(spec, os.path.join(directory, "tokenizer.model"))
        return ["tokenizer.model"]
    if not os.path.isdir(spec):
        return []
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(spec, name))]
    for name in copied:
        shutil.copyfile(os.path.join(spec, name), os.path.join(directory, name))
    return copied


def format_summary(summary: SFTSummary) -> str:
    lines = [f"{summary.steps} SFT steps in {summary.seconds / 60:.1f} min ({summary.tokens_per_s:.0f} tokens/s); "
             f"training NLL {summary.first_nll:.4f} -> {summary.last_nll:.4f}"]
    if summary.initial_eval_nll is not None and summary.final_eval_nll is not None:
        lines.append(f"held-out NLL {summary.initial_eval_nll:.4f} -> {summary.final_eval_nll:.4f}")
    if summary.model_hf:
        lines.append(f"model in HF format: {summary.model_hf}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
    config, source = cli.load_config(_CONFIG)
    if os.environ.get("AGENTFLOW_DISTRIBUTED"):
        jax.distributed.initialize()
    run(read_sft(config, source=source))


if __name__ == "__main__":
    cli.run(main)
