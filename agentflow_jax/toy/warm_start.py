"""The toy world's supervised warm start: world -> demonstrations -> tokenizer -> SFT -> report.

Stages (each timed in `warm_start_report.json`), all written under `<workdir>/warm_start`:

1. **world**: `toy.world.generate_world`, saved in `world/` with the query files training and
   evaluation read (`train_queries.jsonl`, `heldout_queries.jsonl`).
2. **demos**: `toy.demonstrations.record_demonstrations` replays the (corrupted) oracle planner and
   the ideal frozen model through the real rollout loop and the run's toolbox, on the training
   questions (`demos_train.jsonl`) and on a share of the held-out ones (`demos_heldout.jsonl`, for
   the report only, never trained on).
3. **tokenizer**: SentencePiece BPE (`toy.tokenizer`), `tokenizer.model`.
4. **sft**: a tiny Qwen2 (`toy.architecture`, initialised by `scale_init`) trained on the
   demonstrations of `toy.warm_start.roles` (default: the planner) with `supervised.SFTTrainer`;
   saved in HF format in `model/` with a copy of the tokenizer.
5. **report**: held-out demonstrations per role and the whole agent (`toy.report`).

`ensure_warm_start(toy)` runs all this unless `warm_start.json` records a finished warm start of
the same configuration.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from agentflow_jax.engines import Engine
from agentflow_jax.engines.jax_engine import JaxEngine
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.optim import make_optimizer
from agentflow_jax.sampling import Sampler
from agentflow_jax.supervised import Example, SFTTrainer, chat_examples, train_supervised
from agentflow_jax.toy import report as report_lib
from agentflow_jax.toy.config import ToyConfig, WarmStartPaths
from agentflow_jax.toy.demonstrations import Corruption, Demo, record_demonstrations, save_demos, summarize
from agentflow_jax.toy.frozen import ROLES, IdealFrozenEngine
from agentflow_jax.toy.tokenizer import tokenizer_texts, train_tokenizer
from agentflow_jax.toy.world import World, generate_world, query_records, spread_sample

_EVAL_ONLY_KEYS = ("log_every", "eval_per_role", "eval_sampled_n", "eval_agent_questions", "eval_batch_size")


def _log(message: str) -> None:
    print(f"[warm start {time.strftime('%H:%M:%S')}] {message}", flush=True)


def config_fingerprint(toy: ToyConfig) -> str:
    """Hash of everything that determines the warm start's files (not report-only settings): the toy
    sections, the prompt shape (rollout), the tools, and the model's dtypes and positions."""
    e = toy.experiment
    parts = {"world": toy.world.to_dict(), "demos": dataclasses.asdict(toy.demos),
             "tokenizer": dataclasses.asdict(toy.tokenizer), "architecture": dataclasses.asdict(toy.architecture),
             "warm_start": {k: v for k, v in dataclasses.asdict(toy.warm_start).items() if k not in _EVAL_ONLY_KEYS},
             "rollout": {k: getattr(e.rollout, k) for k in ("max_turns", "memory_budget_chars", "compact_tools")},
             "tools": {"names": list(e.tools.names), "settings": dict(e.tools.settings)},
             "model": {"dtype": e.model.dtype, "param_dtype": e.model.storage_dtype,
                       "max_cache_length": e.model.max_cache_length}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def build_world(toy: ToyConfig) -> World:
    """Generates and saves the world and its query files."""
    paths = toy.paths
    world = generate_world(toy.world)
    world.save(paths.world)
    for split in ("train", "heldout"):
        with open(paths.queries(split), "w", encoding="utf-8") as f:
            for record in query_records(world.questions(split)):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return world


def build_demos(toy: ToyConfig, world: World) -> tuple[list[Demo], list[Demo]]:
    """Training demonstrations (`passes` replays) and held-out ones, with the run's toolbox and prompts."""
    d = toy.demos
    corruption = Corruption(first_step=d.first_step, later_steps=d.later_steps, seed=d.corruption_seed)
    options = dict(toolbox_factory=toy.experiment.tools.build, rollout=toy.experiment.rollout_config(),
                   corruption=corruption)
    train: list[Demo] = []
    for pass_index in range(d.passes):
        train.extend(record_demonstrations(world.train, pass_index=pass_index, **options).demos)
    heldout = list(record_demonstrations(spread_sample(world.heldout, d.heldout_questions), **options).demos)
    save_demos(toy.paths.demos_train, train)
    save_demos(toy.paths.demos_heldout, heldout)
    return train, heldout


def select_demos(demos: Sequence[Demo], role_limits: Mapping[str, int], seed: int) -> list[Demo]:
    """At most role_limits[role] demonstrations of each role (a seeded random subset; all when absent or < 0).

    Duplicates (same prompt and target, e.g. query analyses repeated over passes) are dropped first.
    """
    unique = list({(d.role, tuple((m["role"], m["content"]) for m in d.messages), d.target): d
                   for d in demos}.values())
    rng = random.Random(seed)
    chosen = []
    for role in ROLES:
        rows = [d for d in unique if d.role == role]
        limit = role_limits.get(role, -1)
        if 0 <= limit < len(rows):
            rows = rng.sample(rows, limit)
        chosen.extend(rows)
    return chosen


def encode_demo(tokenizer: SentencePieceTokenizer, demo: Demo) -> Example:
    """The chat prompt's ids, and the reply's ids followed by <|im_end|> (the loss covers those)."""
    chat = [*demo.messages, {"role": "assistant", "content": demo.target}]
    (example,) = chat_examples(tokenizer, chat, [len(demo.messages)], group=demo.role)
    return example


def scale_init(model: qwen2.Qwen2ForCausalLM, *, embed_std: float, attn_scale: float) -> qwen2.Qwen2ForCausalLM:
    """Re-scales the N(0, 0.02) initialisation for a narrow model.

    0.02 suits Qwen's widths (|embedding| = 0.02 * sqrt(3584) ~ 1.2); at width 128 it leaves the
    token identity tiny against the layers' outputs and the tied logits flat, and attention learns
    very slowly: copying a token from a fixed position was not learned in 200 steps at 0.02, and in
    50 at embedding std 0.1 with attention kernels x2 (BUILD_NOTES.md, "Toy world").
    """
    model.embed_tokens[...] = model.embed_tokens[...] * (embed_std / 0.02)
    attention = model.layers.attn
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"):
        getattr(attention, name)[...] = getattr(attention, name)[...] * attn_scale
    return model


def train_model(toy: ToyConfig, examples: Sequence[Example], vocab_size: int,
                pad_id: int) -> tuple[qwen2.Qwen2ForCausalLM, dict[str, Any]]:
    """The tiny Qwen2, initialised and trained on `examples`; returns it and the training statistics."""
    e, ws, arch = toy.experiment, toy.warm_start, toy.architecture
    config = arch.model_config(vocab_size, e.model.max_cache_length)
    model = scale_init(qwen2.init_random(config, seed=ws.seed, dtype=jnp.dtype(e.model.dtype),
                                         param_dtype=jnp.dtype(e.model.storage_dtype)),
                       embed_std=arch.init_embed_std, attn_scale=arch.init_attn_scale)
    _log(f"model: {config.num_params / 1e6:.2f}M parameters; training {len(examples)} demonstrations for "
         f"{ws.steps} steps")
    trainer = SFTTrainer(model, make_optimizer(ws.optim, total_steps=ws.steps), chunk_size=ws.chunk_size)
    stats = train_supervised(trainer, examples, steps=ws.steps, buckets=ws.length_buckets,
                             tokens_per_batch=ws.tokens_per_batch, pad_id=pad_id, seed=ws.seed,
                             log_every=ws.log_every, log=_log)
    return trainer.model(), {"params": config.num_params, **dataclasses.asdict(config), **stats}


def write_report(toy: ToyConfig, model: qwen2.Qwen2ForCausalLM, tokenizer: SentencePieceTokenizer, world: World,
                 heldout_demos: Sequence[Demo], report: dict[str, Any]) -> None:
    """Held-out per-role decoding and whole-agent accuracy of the warm-started model, into `report`."""
    e, ws = toy.experiment, toy.warm_start
    engine = JaxEngine(Sampler(model, max_cache_length=e.model.max_cache_length), tokenizer, seed=0)
    if ws.eval_per_role > 0:
        caps = {role: e.rollout.planner_max_new_tokens if role == "planner" else e.rollout.frozen_max_new_tokens
                for role in ROLES}
        report["heldout_roles"] = report_lib.evaluate_roles(
            engine, heldout_demos, world, max_new_tokens=caps, per_role=ws.eval_per_role,
            sampled_n=ws.eval_sampled_n, batch_size=ws.eval_batch_size, roles=ws.roles)
        _log("held-out per-role accuracy: " + json.dumps(
            {r: {k: v for k, v in x.items() if k != "examples_wrong"} for r, x in report["heldout_roles"].items()}))
    if ws.eval_agent_questions > 0:
        report["heldout_agent"] = {}
        for temperature in (0.0, 1.0):
            planner = JaxEngine(engine.sampler, tokenizer, seed=0)
            frozen: Engine = planner if toy.frozen_is_the_model else IdealFrozenEngine(world.train + world.heldout)
            report["heldout_agent"][f"planner_t{temperature:g}"] = report_lib.evaluate_agent(
                world, planner=planner, frozen=frozen, toolbox=e.tools.build(frozen),
                rollout=e.rollout_config(evaluation=True), num_questions=ws.eval_agent_questions,
                planner_temperature=temperature)
        _log(f"held-out agent: {json.dumps(report['heldout_agent'])}")


def _token_stats(examples: Sequence[Example]) -> dict[str, Any]:
    stats = {}
    for role in ROLES:
        rows = [ex for ex in examples if ex.group == role]
        if rows:
            prompt = [len(ex.prompt_ids) for ex in rows]
            target = [len(ex.target_ids) for ex in rows]
            stats[role] = {"n": len(rows), "prompt_mean": round(float(np.mean(prompt)), 1), "prompt_max": max(prompt),
                           "target_mean": round(float(np.mean(target)), 1), "target_max": max(target)}
    return stats


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def run_warm_start(toy: ToyConfig) -> dict[str, Any]:
    """All stages; returns (and writes) the report."""
    paths = toy.paths
    os.makedirs(paths.root, exist_ok=True)
    if os.path.exists(paths.manifest):
        os.remove(paths.manifest)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"timings_s": timings}
    total_start = start = time.perf_counter()

    world = build_world(toy)
    timings["world"] = round(time.perf_counter() - start, 2)
    _log(f"world: {len(world.entities)} cities, {len(world.corpus)} passages, {len(world.train)} train / "
         f"{len(world.heldout)} held-out questions ({timings['world']} s)")

    start = time.perf_counter()
    train_demos, heldout_demos = build_demos(toy, world)
    timings["demos"] = round(time.perf_counter() - start, 2)
    report["demos_train"], report["demos_heldout"] = summarize(train_demos), summarize(heldout_demos)
    _log(f"demos: {report['demos_train']} ({timings['demos']} s)")

    start = time.perf_counter()
    tokenizer = train_tokenizer(toy.tokenizer, world, tokenizer_texts(
        world, train_demos, max_texts=toy.tokenizer.max_texts, seed=toy.tokenizer.seed), paths.tokenizer)
    timings["tokenizer"] = round(time.perf_counter() - start, 2)
    selected = [d for d in select_demos(train_demos, toy.demos.role_limits, toy.warm_start.seed)
                if d.role in toy.warm_start.roles]
    examples = [encode_demo(tokenizer, d) for d in selected]
    report["tokens"] = _token_stats(examples)
    report["training_demos"] = dict(collections.Counter(ex.group for ex in examples))
    _log(f"tokenizer: vocab {tokenizer.vocab_size} ({timings['tokenizer']} s); tokens per role: {report['tokens']}")

    start = time.perf_counter()
    model, report["sft"] = train_model(toy, examples, tokenizer.vocab_size, tokenizer.pad_token_id)
    hf_io.save_pretrained(model, paths.model, dtype=jnp.float32)
    shutil.copyfile(paths.tokenizer, os.path.join(paths.model, "tokenizer.model"))
    timings["sft"] = round(time.perf_counter() - start, 2)
    timings["pipeline_before_eval"] = round(time.perf_counter() - total_start, 2)

    start = time.perf_counter()
    write_report(toy, model, tokenizer, world, heldout_demos, report)
    timings["eval"] = round(time.perf_counter() - start, 2)
    timings["total"] = round(time.perf_counter() - total_start, 2)
    with open(paths.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths.manifest, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": config_fingerprint(toy), "model": paths.model, "tokenizer": paths.tokenizer,
                   "world": paths.world, "report": paths.report}, f, indent=1)
    _log(f"done in {timings['total']:.0f} s: {paths.root}")
    return report


def ensure_warm_start(toy: ToyConfig) -> WarmStartPaths:
    """Builds the warm start unless `warm_start.json` records one of the same configuration."""
    paths = toy.paths
    if os.path.exists(paths.manifest):
        with open(paths.manifest, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") == config_fingerprint(toy) and os.path.isdir(paths.model):
            _log(f"warm start found in {paths.root} (same configuration); skipping")
            return paths
    run_warm_start(toy)
    return paths
