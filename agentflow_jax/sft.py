"""Supervised warm start of the CPU toy world: world -> demonstrations -> tokenizer -> SFT -> report.

    python -m agentflow_jax.sft --config=experiments/configs/tiny_cpu.py
    python -m agentflow_jax.sft --config=experiments/configs/tiny_cpu.py --config.sft.steps=50

Stages (each timed in `sft_report.json`):

1. **world**: `data.toy_world.generate_world(config.world)`, saved under `<output_dir>/world/`
   together with the query files the RL pipeline reads (`train_queries.jsonl`,
   `heldout_queries.jsonl`: `{"pid", "query", "answer", "kind": "exact", "qtype", "tools"}`).
2. **demos**: `data.demonstrations.record_demonstrations` replays the (corrupted) oracle planner and
   the ideal frozen model through the real rollout loop and tools, on the training questions
   (`demos_train.jsonl`) and on a share of the held-out questions (`demos_heldout.jsonl`, for the
   report only, never trained on).
3. **tokenizer**: SentencePiece BPE trained on the corpus and demonstration texts; city and tool
   names and digit pairs are single pieces, whole phrases may be pieces (see `train_tokenizer`).
   Written to `<output_dir>/tokenizer.model`.
4. **sft**: a tiny Qwen2 (config.model, initialised by `scale_init`) trained with AdamW on the
   demonstrations of `sft.roles` (default: the planner; the frozen roles are
   `demonstrations.IdealFrozenEngine` unless `agent.frozen = "model"`); the loss is the mean
   negative log-likelihood of the target tokens (the reply and its final <|im_end|>), computed with
   `rl.logprobs.token_logprobs`. Rows are grouped in length buckets with a constant token budget
   per batch; the jitted step compiles once per bucket. The HF-format checkpoint goes to
   `<output_dir>/model/` (with a copy of the tokenizer).
5. **eval**: greedy decoding of held-out demonstrations of the trained roles (exact match of the
   reply and of its parsed decision), the planner's tool-choice accuracy (greedy and T = 1), and
   the whole agent on held-out questions with the warm-started planner (greedy and T = 1).

`ensure_warm_start(config)` runs all this unless `<output_dir>/warm_start.json` records a finished
run of the same configuration.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from typing import Any, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from ml_collections import config_flags

from agentflow_jax.agent import modules
from agentflow_jax.config_sections import as_dict, check_keys
from agentflow_jax.data import demonstrations as demos_lib
from agentflow_jax.data import toy_world
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.config import Qwen2Config
from agentflow_jax.models.tokenizer import SENTENCEPIECE_MARKERS, SentencePieceTokenizer
from agentflow_jax.rl.logprobs import token_logprobs

MANIFEST = "warm_start.json"
REPORT = "sft_report.json"
_SECTIONS = ("world", "agent", "demos", "tokenizer", "model", "sft")
_MODEL_ARCH_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "tie_word_embeddings", "rope_theta", "rms_norm_eps")


def _log(message: str) -> None:
    print(f"[sft {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _section(config: Any, name: str) -> dict[str, Any]:
    if name not in config:
        raise ValueError(f"the config has no {name!r} section; expected sections {_SECTIONS} "
                         "(see experiments/configs/tiny_cpu.py)")
    return as_dict(config[name])


_DEMOS_KEYS = ("first_step", "later_steps", "corruption_seed", "passes", "role_limits", "heldout_questions")
_TOKENIZER_KEYS = ("vocab_size", "max_piece_length", "max_texts", "seed")
MODEL_KEYS = _MODEL_ARCH_KEYS + ("path", "tokenizer", "dtype", "param_dtype", "remat", "max_cache_length",
                                  "init_embed_std", "init_attn_scale")
_SFT_KEYS = ("output_dir", "roles", "steps", "learning_rate", "warmup_steps", "end_lr_fraction", "weight_decay",
             "grad_clip", "b1", "b2", "tokens_per_batch", "length_buckets", "prompt_loss_weight", "chunk_size", "seed",
             "log_every", "eval_per_role", "eval_sampled_n", "eval_agent_questions", "eval_batch_size")


def validate_config(config: Any) -> None:
    """Checks every section this stage reads (unknown keys, bad values) before any compute."""
    toy_world.WorldConfig.from_mapping(_section(config, "world"))
    demos_lib.AgentSettings.from_mapping(_section(config, "agent"))
    check_keys("demos", _section(config, "demos"), _DEMOS_KEYS)
    demos_cfg = _section(config, "demos")
    unknown_roles = sorted(set(demos_cfg.get("role_limits", {})) - set(demos_lib.ROLES))
    if unknown_roles:
        raise ValueError(f"demos.role_limits names unknown role(s) {unknown_roles}; roles: {demos_lib.ROLES}")
    check_keys("tokenizer", _section(config, "tokenizer"), _TOKENIZER_KEYS)
    check_keys("model", _section(config, "model"), MODEL_KEYS)
    sft = _section(config, "sft")
    check_keys("sft", sft, _SFT_KEYS)
    bad_roles = sorted(set(sft["roles"]) - set(demos_lib.ROLES))
    if bad_roles or not sft["roles"]:
        raise ValueError(f"sft.roles must name roles among {demos_lib.ROLES}, got {list(sft['roles'])}")
    agent = demos_lib.AgentSettings.from_mapping(_section(config, "agent"))
    untrained = sorted(set(demos_lib.ROLES) - set(sft["roles"]))
    if agent.frozen == "model" and untrained:
        raise ValueError(f"agent.frozen='model' makes the warm-started model serve every role, but sft.roles "
                         f"leaves {untrained} untrained; set sft.roles to all of {demos_lib.ROLES}")
    if sft["steps"] < 0:
        raise ValueError(f"sft.steps must be >= 0, got {sft['steps']}")
    buckets = list(sft["length_buckets"])
    if not buckets or buckets != sorted(buckets) or buckets[0] < 8:
        raise ValueError(f"sft.length_buckets must be increasing lengths >= 8, got {buckets}")
    if sft["tokens_per_batch"] < buckets[-1]:
        raise ValueError(f"sft.tokens_per_batch ({sft['tokens_per_batch']}) must hold at least one row of the "
                         f"longest bucket ({buckets[-1]})")


def model_config(config: Any, vocab_size: int) -> Qwen2Config:
    m = _section(config, "model")
    return Qwen2Config(vocab_size=vocab_size, hidden_size=m["hidden_size"],
                             intermediate_size=m["intermediate_size"], num_layers=m["num_layers"],
                             num_heads=m["num_heads"], num_kv_heads=m["num_kv_heads"],
                             head_dim=m["head_dim"] or None, rope_theta=m["rope_theta"],
                             rms_norm_eps=m["rms_norm_eps"], tie_word_embeddings=m["tie_word_embeddings"],
                             max_position_embeddings=m["max_cache_length"])


def config_fingerprint(config: Any) -> str:
    """Hash of everything that determines the warm start (not eval-only settings)."""
    sections = {name: _section(config, name) for name in _SECTIONS}
    for key in ("log_every", "eval_per_role", "eval_sampled_n", "eval_agent_questions", "eval_batch_size",
                "output_dir"):
        sections["sft"].pop(key, None)
    for key in ("path", "tokenizer", "max_cache_length", "remat"):
        sections["model"].pop(key, None)
    text = json.dumps(sections, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the warm start writes its files."""

    root: str

    @property
    def world(self) -> str:
        return os.path.join(self.root, "world")

    @property
    def corpus(self) -> str:
        return os.path.join(self.world, "corpus.jsonl")

    @property
    def demos_train(self) -> str:
        return os.path.join(self.root, "demos_train.jsonl")

    @property
    def demos_heldout(self) -> str:
        return os.path.join(self.root, "demos_heldout.jsonl")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "tokenizer.model")

    @property
    def model(self) -> str:
        return os.path.join(self.root, "model")

    @property
    def agent_settings(self) -> str:
        return os.path.join(self.root, "agent_settings.json")

    def queries(self, split: str) -> str:
        return os.path.join(self.world, f"{split}_queries.jsonl")


# ----------------------------------------------------------------------------------------------
# Stages 1-2: world and demonstrations
# ----------------------------------------------------------------------------------------------


def query_records(questions: Sequence[toy_world.Question]) -> list[dict[str, Any]]:
    """Questions in the RL pipeline's record format (data/pipeline.py, evaluate.py)."""
    return [{"pid": q.id, "query": q.text, "answer": q.answer, "kind": "exact", "qtype": q.kind,
             "tools": [s.tool_name for s in q.plan], "subtype": q.subtype, "tempting": q.tempting}
            for q in questions]


def build_world(config: Any, paths: Paths) -> toy_world.World:
    world = toy_world.generate_world(toy_world.WorldConfig.from_mapping(_section(config, "world")))
    world.save(paths.world)
    for split in ("train", "heldout"):
        with open(paths.queries(split), "w", encoding="utf-8") as f:
            for record in query_records(world.questions(split)):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return world


def _corruption(config: Any) -> demos_lib.Corruption:
    d = _section(config, "demos")
    return demos_lib.Corruption(first_step=tuple(d["first_step"]), later_steps=tuple(d["later_steps"]),
                                seed=d["corruption_seed"])


def _heldout_sample(world: toy_world.World, count: int) -> list[toy_world.Question]:
    """Up to `count` held-out questions, spread evenly over kinds (deterministic)."""
    by_kind = {k: [q for q in world.heldout if q.kind == k] for k in toy_world.KINDS}
    chosen, index = [], 0
    while len(chosen) < min(count, len(world.heldout)):
        for kind in toy_world.KINDS:
            if index < len(by_kind[kind]) and len(chosen) < count:
                chosen.append(by_kind[kind][index])
        index += 1
    return chosen


def build_demos(config: Any, world: toy_world.World, paths: Paths) -> tuple[list[demos_lib.Demo], list[demos_lib.Demo]]:
    settings = demos_lib.AgentSettings.from_mapping(_section(config, "agent"))
    d = _section(config, "demos")
    train: list[demos_lib.Demo] = []
    for pass_index in range(d["passes"]):
        recording = demos_lib.record_demonstrations(world.train, paths.corpus, settings=settings,
                                                    corruption=_corruption(config), pass_index=pass_index)
        train.extend(recording.demos)
    heldout = demos_lib.record_demonstrations(_heldout_sample(world, d["heldout_questions"]), paths.corpus,
                                              settings=settings, corruption=_corruption(config)).demos
    demos_lib.save_demos(paths.demos_train, train)
    demos_lib.save_demos(paths.demos_heldout, heldout)
    with open(paths.agent_settings, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(settings), f, indent=1, default=dict)
    return train, list(heldout)


def select_demos(demos: Sequence[demos_lib.Demo], role_limits: Mapping[str, int], seed: int) -> list[demos_lib.Demo]:
    """At most role_limits[role] demonstrations of each role (a seeded random subset; all when absent or < 0).

    Duplicates (same prompt and target, e.g. query analyses repeated over passes) are dropped first.
    """
    unique = list({(d.role, tuple((m["role"], m["content"]) for m in d.messages), d.target): d
                   for d in demos}.values())
    rng = random.Random(seed)
    chosen = []
    for role in demos_lib.ROLES:
        rows = [d for d in unique if d.role == role]
        limit = role_limits.get(role, -1)
        if 0 <= limit < len(rows):
            rows = rng.sample(rows, limit)
        chosen.extend(rows)
    return chosen


# ----------------------------------------------------------------------------------------------
# Stage 3: tokenizer
# ----------------------------------------------------------------------------------------------

TOOL_PIECES = (toy_world.SEARCH_TOOL, toy_world.PYTHON_TOOL, toy_world.GENERALIST_TOOL)


def tokenizer_texts(world: toy_world.World, demos: Sequence[demos_lib.Demo], *, max_texts: int,
                    seed: int) -> list[str]:
    """Corpus passages and distinct demonstration texts: a seeded sample of at most `max_texts`,
    taken in equal shares per (role, tool) so every prompt shape's fixed text gets merged pieces."""
    groups: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for d in demos:
        tool = re.search(r"^Tool: (\S+)$", d.messages[-1]["content"], re.MULTILINE) if d.role == "executor" else None
        key = (d.role, tool.group(1) if tool else "")
        groups[key].add(d.target)
        for m in d.messages:
            groups[key].add(m["content"])
    rng = random.Random(seed)
    share = max(1, max_texts // max(1, len(groups)))
    texts = []
    for key in sorted(groups):
        rows = sorted(groups[key])
        texts.extend(rng.sample(rows, share) if len(rows) > share else rows)
    return [r["contents"] for r in world.corpus] + texts


DIGIT_PAIRS = tuple(f"{i:02d}" for i in range(100))


def single_pieces(world: toy_world.World) -> list[str]:
    """Strings that are always one token: the ChatML markers, the tool names, the city names and
    the 100 digit pairs."""
    return list(SENTENCEPIECE_MARKERS) + list(TOOL_PIECES) + [e.name for e in world.entities] + list(DIGIT_PAIRS)


def train_tokenizer(config: Any, world: toy_world.World, texts: Sequence[str], path: str) -> SentencePieceTokenizer:
    """SentencePiece BPE for the toy world.

    * City and tool names are single pieces, and numbers are digit pairs read from the left plus a
      last single digit ("94214" -> 94|21|4): a name or number is always the same few tokens,
      whatever surrounds it (what copying it from prompt to reply needs), and prompts stay short.
    * Pieces may span spaces (`split_by_whitespace=False`): the fixed prompt text (tool list,
      instructions) shrinks to a few long pieces, and prompts to ~150 tokens.
    """
    t = _section(config, "tokenizer")
    return SentencePieceTokenizer.train(
        texts, vocab_size=t["vocab_size"], model_path=path, user_defined_symbols=single_pieces(world),
        split_by_whitespace=False, split_by_unicode_script=False, split_digits=True,
        max_sentencepiece_length=t["max_piece_length"])


# ----------------------------------------------------------------------------------------------
# Stage 4: supervised training
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenised demonstration: the chat prompt ids and the target ids (ending with <|im_end|>)."""

    role: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def encode_demo(tokenizer: SentencePieceTokenizer, demo: demos_lib.Demo) -> Example:
    im_end = tokenizer.special_tokens["<|im_end|>"]
    return Example(role=demo.role, prompt_ids=tuple(tokenizer.encode_chat(demo.messages)),
                   target_ids=tuple(tokenizer.encode(demo.target, allow_special=False)) + (im_end,))


@dataclasses.dataclass(frozen=True)
class Batch:
    """[B, T] arrays: ids, attention mask, next-token targets, loss weights (targets 1, prompt w, pads 0)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    target_mask: np.ndarray


def bucket_of(length: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if length <= b:
            return b
    return None


def make_batch(examples: Sequence[Example], length: int, rows: int, pad_id: int,
               prompt_loss_weight: float = 0.0) -> Batch:
    """Right-padded rows; position p predicts token p+1; loss on target tokens (and prompt tokens
    with `prompt_loss_weight`). Missing rows are all padding (weight 0)."""
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    target_mask = np.zeros((rows, length), np.float32)
    weights = np.zeros((rows, length), np.float32)
    for r, ex in enumerate(examples):
        p, t = len(ex.prompt_ids), len(ex.target_ids)
        ids[r, :p + t] = ex.prompt_ids + ex.target_ids
        mask[r, :p + t] = 1
        target_mask[r, p - 1:p + t - 1] = 1.0
        weights[r, :p - 1] = prompt_loss_weight
        weights[r, p - 1:p + t - 1] = 1.0
    targets = np.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]
    return Batch(ids, mask, targets, weights, target_mask)


def batch_plan(examples: Sequence[Example], buckets: Sequence[int], tokens_per_batch: int,
               rng: random.Random) -> list[tuple[int, list[Example]]]:
    """One epoch: (bucket length, rows) batches, each bucket's rows = tokens_per_batch // length, shuffled."""
    by_bucket: dict[int, list[Example]] = collections.defaultdict(list)
    for ex in examples:
        by_bucket[bucket_of(ex.length, buckets)].append(ex)
    plan = []
    for length, rows in sorted(by_bucket.items()):
        rng.shuffle(rows)
        size = max(1, tokens_per_batch // length)
        plan.extend((length, rows[i:i + size]) for i in range(0, len(rows), size))
    rng.shuffle(plan)
    return plan


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


class SFTTrainer:
    """AdamW on the masked token NLL; one compiled step per length bucket (`trace_counts`)."""

    def __init__(self, model: qwen2.Qwen2ForCausalLM, *, learning_rate: float, steps: int, warmup_steps: int,
                 end_lr_fraction: float, weight_decay: float, grad_clip: float, b1: float, b2: float,
                 chunk_size: int):
        self.graphdef, params = nnx.split(model)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(1, min(warmup_steps, steps)), max(steps, warmup_steps + 1),
            end_value=learning_rate * end_lr_fraction)
        self.optimizer = optax.chain(optax.clip_by_global_norm(grad_clip),
                                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
        self.params = params
        self.opt_state = self.optimizer.init(params)
        self.trace_counts: collections.Counter[int] = collections.Counter()
        self._chunk_size = chunk_size
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(self, params, opt_state, input_ids, attention_mask, targets, weights, target_mask):
        self.trace_counts[input_ids.shape[1]] += 1

        def loss_fn(p):
            logp, _ = token_logprobs(self.graphdef, p, input_ids, attention_mask, targets,
                                     chunk_size=min(self._chunk_size, input_ids.shape[1]))
            denominator = jnp.maximum(target_mask.sum(), 1.0)
            loss = -(logp * weights).sum() / denominator
            target_nll = -(logp * target_mask).sum() / denominator
            return loss, target_nll

        (loss, target_nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, target_nll, optax.tree.norm(grads)

    def step(self, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        self.params, self.opt_state, loss, nll, gnorm = self._step(
            self.params, self.opt_state, batch.input_ids, batch.attention_mask, batch.targets, batch.weights,
            batch.target_mask)
        return loss, nll, gnorm

    def model(self) -> qwen2.Qwen2ForCausalLM:
        return nnx.merge(self.graphdef, self.params)


def train(config: Any, model: qwen2.Qwen2ForCausalLM, examples: Sequence[Example],
          pad_id: int) -> tuple[qwen2.Qwen2ForCausalLM, dict[str, Any]]:
    """Runs config.sft.steps optimizer steps over `examples`; returns the model and training stats."""
    s = _section(config, "sft")
    buckets = list(s["length_buckets"])
    too_long = [ex for ex in examples if bucket_of(ex.length, buckets) is None]
    if too_long:
        raise ValueError(f"{len(too_long)} demonstrations are longer than the largest length bucket "
                         f"({buckets[-1]}; longest {max(ex.length for ex in too_long)} tokens): add a bucket "
                         "to sft.length_buckets or lower agent.memory_budget_chars")
    trainer = SFTTrainer(model, learning_rate=s["learning_rate"], steps=s["steps"], warmup_steps=s["warmup_steps"],
                         end_lr_fraction=s["end_lr_fraction"], weight_decay=s["weight_decay"],
                         grad_clip=s["grad_clip"], b1=s["b1"], b2=s["b2"], chunk_size=s["chunk_size"])
    rng = random.Random(s["seed"])
    plan: list[tuple[int, list[Example]]] = []
    history = []
    start = time.perf_counter()
    tokens = target_tokens = 0
    epochs = 0
    window: list[tuple[jax.Array, jax.Array]] = []
    for step in range(1, s["steps"] + 1):
        if not plan:
            plan = batch_plan(examples, buckets, s["tokens_per_batch"], rng)
            epochs += 1
        length, rows = plan.pop()
        batch = make_batch(rows, length, max(1, s["tokens_per_batch"] // length), pad_id, s["prompt_loss_weight"])
        loss, nll, gnorm = trainer.step(batch)
        tokens += int(batch.attention_mask.sum())
        target_tokens += int(batch.target_mask.sum())
        window.append((nll, gnorm))
        if step % s["log_every"] == 0 or step == s["steps"]:
            nlls = [float(x) for x, _ in window]
            elapsed = time.perf_counter() - start
            history.append({"step": step, "target_nll": float(np.mean(nlls)), "grad_norm": float(window[-1][1]),
                            "elapsed_s": round(elapsed, 1)})
            _log(f"step {step}/{s['steps']} epoch {epochs}: target nll {np.mean(nlls):.4f} "
                 f"grad norm {float(window[-1][1]):.2f}  {tokens / elapsed:.0f} tok/s  {elapsed:.0f}s")
            window = []
    elapsed = time.perf_counter() - start
    stats = {"steps": s["steps"], "epochs_started": epochs, "tokens": tokens, "target_tokens": target_tokens,
             "seconds": round(elapsed, 1), "tokens_per_s": round(tokens / max(elapsed, 1e-9)),
             "compiles_per_bucket": dict(trainer.trace_counts), "history": history}
    return trainer.model(), stats


# ----------------------------------------------------------------------------------------------
# Stage 5: evaluation
# ----------------------------------------------------------------------------------------------


def _decode(sampler: Any, tokenizer: SentencePieceTokenizer, prompts: Sequence[Sequence[int]], *,
            max_new_tokens: int, temperature: float, n: int, seed: int, batch_size: int) -> list[str]:
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i:i + batch_size]]
        out = sampler.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature, n=n,
                               stop_token_ids=tokenizer.eos_token_ids, seed=seed + i)
        for tokens, reason in zip(out.tokens, out.finish_reason):
            texts.append(tokenizer.decode(tokens[:-1] if reason == "stop" else tokens))
    return texts


def _decision(role: str, text: str, demo: demos_lib.Demo, tools: Any) -> Any:
    """The parsed decision of a reply (what the agent acts on)."""
    if role == "planner":
        step = modules.parse_planner_output(text, tools)
        return (step.tool_name, step.sub_goal, step.context)
    if role == "executor":
        tool = re.search(r"^Tool: (\S+)$", demo.messages[-1]["content"], re.MULTILINE).group(1)
        call = modules.parse_executor_output(text, expected_tool=tool).tool_call
        return None if call is None else (call.tool_name, json.dumps(dict(call.arguments), sort_keys=True))
    if role == "verifier":
        return modules.parse_verifier_output(text).stop
    if role == "generator":
        return modules.parse_generator_output(text).answer
    return text.strip()


def evaluate_roles(model: qwen2.Qwen2ForCausalLM, tokenizer: SentencePieceTokenizer,
                   demos: Sequence[demos_lib.Demo], world: toy_world.World, settings: demos_lib.AgentSettings, *,
                   per_role: int, sampled_n: int, batch_size: int, max_cache_length: int,
                   roles: Sequence[str] = demos_lib.ROLES, seed: int = 0) -> dict[str, Any]:
    """Greedy exact match per role on held-out demonstrations; planner tool choice greedy and sampled."""
    from agentflow_jax.sampling import Sampler

    sampler = Sampler(model, max_cache_length=max_cache_length)
    tool_meta = [_tool_metadata(name) for name in TOOL_PIECES]
    questions = {q.id: q for q in world.heldout}
    rng = random.Random(seed)
    report: dict[str, Any] = {}
    for role in roles:
        rows = sorted((d for d in demos if d.role == role), key=lambda d: (d.question_id, d.step))
        # The planner gets twice the budget: its tool choice is the number RL starts from.
        limit = per_role * (2 if role == "planner" else 1)
        if len(rows) > limit:
            rows = rng.sample(rows, limit)
        if not rows:
            continue
        prompts = [encode_demo(tokenizer, d).prompt_ids for d in rows]
        texts = _decode(sampler, tokenizer, prompts, max_new_tokens=settings.max_new_tokens[role], temperature=0.0,
                        n=1, seed=seed, batch_size=batch_size)
        exact = [t == d.target for t, d in zip(texts, rows)]
        entry: dict[str, Any] = {"n": len(rows), "exact_match": round(float(np.mean(exact)), 3)}
        if role != "planner":
            oracle_rows = [(t, d) for t, d in zip(texts, rows)]
            decisions = [_decision(role, t, d, tool_meta) == _decision(role, d.target, d, tool_meta)
                         for t, d in oracle_rows]
            entry["decision_match"] = round(float(np.mean(decisions)), 3)
            entry["examples_wrong"] = [{"target": d.target, "output": t} for t, d in oracle_rows
                                       if t != d.target][:3]
        else:
            entry.update(_planner_report(texts, rows, questions, tool_meta))
            if sampled_n > 0:
                sampled = _decode(sampler, tokenizer, prompts, max_new_tokens=settings.max_new_tokens[role],
                                  temperature=1.0, n=sampled_n, seed=seed + 1,
                                  batch_size=max(1, batch_size // sampled_n))
                expanded = [d for d in rows for _ in range(sampled_n)]
                sampled_report = _planner_report(sampled, expanded, questions, tool_meta)
                entry["sampled_t1"] = {k: v for k, v in sampled_report.items() if k.startswith("tool")}
        report[role] = entry
    return report


def _tool_metadata(name: str):
    from agentflow_jax.tools.generator import GENERALIST_METADATA
    from agentflow_jax.tools.python_coder import PYTHON_CODER_METADATA
    from agentflow_jax.tools.search import LOCAL_SEARCH_METADATA

    return {toy_world.SEARCH_TOOL: LOCAL_SEARCH_METADATA, toy_world.PYTHON_TOOL: PYTHON_CODER_METADATA,
            toy_world.GENERALIST_TOOL: GENERALIST_METADATA}[name]


def _planner_report(texts: Sequence[str], rows: Sequence[demos_lib.Demo], questions: Mapping[str, Any],
                    tool_meta: Any) -> dict[str, Any]:
    steps = [modules.parse_planner_output(t, tool_meta) for t in texts]
    right = [s.tool_name == d.oracle_tool for s, d in zip(steps, rows)]
    by: dict[str, list[bool]] = collections.defaultdict(list)
    fields_ok = []
    for s, d, ok in zip(steps, rows, right):
        q = questions[d.question_id]
        by[f"tool_choice/{q.kind}"].append(ok)
        by[f"tool_choice/{'tempting' if q.tempting else 'plain'}"].append(ok)
        by[f"tool_choice/step{d.step}"].append(ok)
        if ok:
            oracle = q.plan[d.step - 1]
            fields_ok.append(s.sub_goal == oracle.sub_goal and s.context == oracle.context)
    return {"parse_ok": round(float(np.mean([s.parse_error is None and s.tool_name is not None for s in steps])), 3),
            "tool_choice": round(float(np.mean(right)), 3),
            **{k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())},
            "fields_match_when_tool_right": round(float(np.mean(fields_ok)), 3) if fields_ok else None}


def evaluate_agent(model: qwen2.Qwen2ForCausalLM, tokenizer: SentencePieceTokenizer, world: toy_world.World,
                   settings: demos_lib.AgentSettings, paths: Paths, *, num_questions: int, max_cache_length: int,
                   planner_temperature: float) -> dict[str, Any]:
    """The whole agent on held-out questions: the warm-started planner (this model) and the frozen
    roles of `settings.frozen` ("ideal": `IdealFrozenEngine`; "model": this model too)."""
    from agentflow_jax.engines.jax_engine import JaxEngine
    from agentflow_jax.agent.rollout import rollout_batch
    from agentflow_jax.sampling import Sampler

    questions = _heldout_sample(world, num_questions)
    engine = JaxEngine(Sampler(model, max_cache_length=max_cache_length), tokenizer, seed=0)
    frozen = demos_lib.frozen_engine(settings, world, engine)
    toolbox = demos_lib.build_toy_toolbox(paths.corpus, frozen, settings)
    rollout = settings.rollout_config(planner_temperature=planner_temperature)
    start = time.perf_counter()
    trajectories = rollout_batch([q.text for q in questions], n=1, planner=engine, frozen=frozen, toolbox=toolbox,
                                 config=rollout)
    seconds = time.perf_counter() - start
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    oracle_path = []
    for q, t in zip(questions, trajectories):
        ok = float(toy_world.exact_match(t.answer, q.answer))
        by_kind[q.kind].append(ok)
        by_kind["tempting" if q.tempting else "plain"].append(ok)
        tools = [turn.planner.step.tool_name for turn in t.turns]
        if tools == [s.tool_name for s in q.plan]:
            oracle_path.append(ok)
    all_ok = [v for k in toy_world.KINDS for v in by_kind[k]]
    return {"questions": len(questions), "planner_temperature": planner_temperature,
            "accuracy": round(float(np.mean(all_ok)), 3),
            **{f"accuracy/{k}": round(float(np.mean(v)), 3) for k, v in sorted(by_kind.items())},
            "accuracy_when_oracle_tools": round(float(np.mean(oracle_path)), 3) if oracle_path else None,
            "oracle_tool_paths": len(oracle_path),
            "turns": round(float(np.mean([len(t.turns) for t in trajectories])), 2),
            "seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _token_stats(examples: Sequence[Example]) -> dict[str, Any]:
    stats = {}
    for role in demos_lib.ROLES:
        rows = [ex for ex in examples if ex.role == role]
        if rows:
            prompt = [len(ex.prompt_ids) for ex in rows]
            target = [len(ex.target_ids) for ex in rows]
            stats[role] = {"n": len(rows), "prompt_mean": round(float(np.mean(prompt)), 1), "prompt_max": max(prompt),
                           "target_mean": round(float(np.mean(target)), 1), "target_max": max(target)}
    return stats


def run_warm_start(config: Any) -> dict[str, Any]:
    """All stages; returns (and writes) the report."""
    validate_config(config)
    s = _section(config, "sft")
    paths = Paths(s["output_dir"])
    os.makedirs(paths.root, exist_ok=True)
    manifest_path = os.path.join(paths.root, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"timings_s": timings}
    total_start = time.perf_counter()

    start = time.perf_counter()
    world = build_world(config, paths)
    timings["world"] = round(time.perf_counter() - start, 2)
    _log(f"world: {len(world.entities)} cities, {len(world.corpus)} passages, {len(world.train)} train / "
         f"{len(world.heldout)} held-out questions ({timings['world']} s)")

    start = time.perf_counter()
    train_demos, heldout_demos = build_demos(config, world, paths)
    timings["demos"] = round(time.perf_counter() - start, 2)
    report["demos_train"] = demos_lib.summarize(train_demos)
    report["demos_heldout"] = demos_lib.summarize(heldout_demos)
    _log(f"demos: {report['demos_train']} ({timings['demos']} s)")

    start = time.perf_counter()
    t = _section(config, "tokenizer")
    tokenizer = train_tokenizer(config, world, tokenizer_texts(world, train_demos, max_texts=t["max_texts"],
                                                                seed=t["seed"]), paths.tokenizer)
    timings["tokenizer"] = round(time.perf_counter() - start, 2)

    d = _section(config, "demos")
    selected = [demo for demo in select_demos(train_demos, d["role_limits"], s["seed"]) if demo.role in s["roles"]]
    examples = [encode_demo(tokenizer, demo) for demo in selected]
    report["tokens"] = _token_stats(examples)
    report["training_demos"] = dict(collections.Counter(ex.role for ex in examples))
    _log(f"tokenizer: vocab {tokenizer.vocab_size} ({timings['tokenizer']} s); tokens per role: {report['tokens']}")

    start = time.perf_counter()
    m = _section(config, "model")
    mcfg = model_config(config, tokenizer.vocab_size)
    model = scale_init(qwen2.init_random(mcfg, seed=s["seed"], dtype=jnp.dtype(m["dtype"]),
                                         param_dtype=jnp.dtype(m["param_dtype"] or "float32")),
                       embed_std=m["init_embed_std"], attn_scale=m["init_attn_scale"])
    report["model"] = {"params": mcfg.num_params, **dataclasses.asdict(mcfg)}
    _log(f"model: {mcfg.num_params / 1e6:.2f}M parameters; training {len(examples)} demonstrations for "
         f"{s['steps']} steps")
    model, report["sft"] = train(config, model, examples, tokenizer.pad_token_id)
    hf_io.save_pretrained(model, paths.model, dtype=jnp.float32)
    shutil.copyfile(paths.tokenizer, os.path.join(paths.model, "tokenizer.model"))
    timings["sft"] = round(time.perf_counter() - start, 2)
    timings["pipeline_before_eval"] = round(time.perf_counter() - total_start, 2)

    start = time.perf_counter()
    settings = demos_lib.AgentSettings.from_mapping(_section(config, "agent"))
    if s["eval_per_role"] > 0:
        report["heldout_roles"] = evaluate_roles(
            model, tokenizer, heldout_demos, world, settings, per_role=s["eval_per_role"],
            sampled_n=s["eval_sampled_n"], batch_size=s["eval_batch_size"], max_cache_length=m["max_cache_length"],
            roles=tuple(s["roles"]))
        _log("held-out per-role accuracy: " + json.dumps(
            {r: {k: v for k, v in e.items() if k != "examples_wrong"} for r, e in report["heldout_roles"].items()}))
    timings["eval_roles"] = round(time.perf_counter() - start, 2)
    if s["eval_agent_questions"] > 0:
        start = time.perf_counter()
        report["heldout_agent"] = {
            f"planner_t{temperature:g}": evaluate_agent(
                model, tokenizer, world, settings, paths, num_questions=s["eval_agent_questions"],
                max_cache_length=m["max_cache_length"], planner_temperature=temperature)
            for temperature in (0.0, 1.0)}
        timings["eval_agent"] = round(time.perf_counter() - start, 2)
        _log(f"held-out agent: {json.dumps(report['heldout_agent'])}")
    timings["total"] = round(time.perf_counter() - total_start, 2)
    with open(os.path.join(paths.root, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": config_fingerprint(config), "model": paths.model, "tokenizer": paths.tokenizer,
                   "world": paths.world, "report": os.path.join(paths.root, REPORT)}, f, indent=1)
    _log(f"done in {timings['total']:.0f} s: {paths.root}")
    return report


def ensure_warm_start(config: Any) -> Paths:
    """Builds the warm start unless `<sft.output_dir>/warm_start.json` records this configuration."""
    validate_config(config)
    paths = Paths(_section(config, "sft")["output_dir"])
    manifest_path = os.path.join(paths.root, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") == config_fingerprint(config) and os.path.isdir(paths.model):
            _log(f"warm start found in {paths.root} (same configuration); skipping")
            return paths
    run_warm_start(config)
    return paths


def rl_frozen_engine(config: Any) -> demos_lib.IdealFrozenEngine | None:
    """The engine of the frozen roles and tools for Flow-GRPO on the toy world.

    `IdealFrozenEngine` over the saved world's questions when `agent.frozen == "ideal"`; None when
    it is "model" (the trainer's default then serves them: the warm-started reference model).
    """
    settings = demos_lib.AgentSettings.from_mapping(_section(config, "agent"))
    if settings.frozen != "ideal":
        return None
    world = toy_world.World.load(Paths(_section(config, "sft")["output_dir"]).world)
    return demos_lib.frozen_engine(settings, world, model_engine=None)


_CONFIG: Any = None


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=experiments/configs/tiny_cpu.py")
    run_warm_start(_CONFIG.value)


if __name__ == "__main__":
    # Defined here, not at import: agentflow_jax.train imports this module and defines its own --config.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                              lock_config=True)
    app.run(main)
